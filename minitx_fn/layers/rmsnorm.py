"""Root-mean-square normalisation over the last axis (Zhang and Sennrich, 2019; Llama's norm).

    y = x / sqrt(mean(x^2) + eps) * scale

No centring and no bias: LayerNorm without the mean, so on inputs of zero mean it
is LayerNorm with bias 0 (tested).

Params: {"scale": (D,)}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minitx_fn.layers.dtypes import at_least_float32


def init(key: jax.Array | None = None, *, d_model: int, dtype=jnp.float32) -> dict:
    """scale = 1. The key is unused (kept for the shared init signature).

    Example:
        >>> init(d_model=3)
        {'scale': Array([1., 1., 1.], dtype=float32)}
    """
    del key
    return {"scale": jnp.ones((d_model,), dtype)}


def apply(params: dict, x: jax.Array, *, eps: float = 1e-5) -> jax.Array:
    """(..., D) -> (..., D) in at least float32, whatever the dtype of x (as `norm.apply`).

    Example:
        >>> y = apply(init(d_model=2), jnp.array([3.0, 4.0]), eps=0.0)   # rms = sqrt(12.5)
        >>> [round(float(v), 4) for v in y]
        [0.8485, 1.1314]
    """
    work = at_least_float32(x.dtype)
    x = x.astype(work)
    mean_square = jnp.square(x).mean(axis=-1, keepdims=True)     # (..., 1)
    lead = tuple(range(x.ndim - 1))
    return x * jax.lax.rsqrt(mean_square + eps) * jnp.expand_dims(params["scale"].astype(work), lead)
