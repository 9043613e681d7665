"""Layer normalisation over the last axis.

    y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias

Params: {"scale": (D,), "bias": (D,)}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minitx_fn.layers.dtypes import at_least_float32


def init(key: jax.Array | None = None, *, d_model: int, dtype=jnp.float32) -> dict:
    """scale = 1, bias = 0. The key is unused (kept for the shared init signature).

    Example:
        >>> init(d_model=4)["scale"]
        Array([1., 1., 1., 1.], dtype=float32)
    """
    del key
    return {"scale": jnp.ones((d_model,), dtype), "bias": jnp.zeros((d_model,), dtype)}


def apply(params: dict, x: jax.Array, *, eps: float = 1e-5) -> jax.Array:
    """(..., D) -> (..., D) in at least float32, whatever the dtype of x.

    The statistics are computed in float32 even for bfloat16 input: a variance of
    small differences is where low precision loses most. The variance is the mean
    of squared deviations from the mean (two passes), which does not cancel
    catastrophically the way E[x^2] - E[x]^2 can.

    Example:
        >>> y = apply(init(d_model=4), jnp.array([1.0, 2.0, 3.0, 4.0]))
        >>> bool(abs(y.mean()) < 1e-6)
        True
    """
    work = at_least_float32(x.dtype)
    x = x.astype(work)
    mean = x.mean(axis=-1, keepdims=True)                        # (..., 1)
    var = jnp.square(x - mean).mean(axis=-1, keepdims=True)      # (..., 1)
    y = (x - mean) * jax.lax.rsqrt(var + eps)                    # (..., D)
    lead = tuple(range(x.ndim - 1))                              # broadcast (D,) explicitly
    return y * jnp.expand_dims(params["scale"].astype(work), lead) + jnp.expand_dims(params["bias"].astype(work), lead)
