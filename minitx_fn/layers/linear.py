"""Dense projection: y = x W + b.

Params: {"w": (D_in, D_out), "b": (D_out,)}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init(key: jax.Array, *, d_in: int, d_out: int, std: float = 0.02, dtype=jnp.float32) -> dict:
    """W ~ Normal(0, std^2), b = 0.

    Example:
        >>> p = init(jax.random.key(0), d_in=3, d_out=5)
        >>> p["w"].shape, p["b"].shape
        ((3, 5), (5,))
    """
    return {
        "w": std * jax.random.normal(key, (d_in, d_out), dtype),
        "b": jnp.zeros((d_out,), dtype),
    }


def apply(params: dict, x: jax.Array, *, dtype=None) -> jax.Array:
    """(..., D_in) -> (..., D_out): y = x W + b.

    `dtype` is the compute dtype; the parameters are cast to it, so float32
    parameters can drive a bfloat16 matmul. None keeps the parameters' dtype.

    Example:
        >>> p = init(jax.random.key(0), d_in=3, d_out=5)
        >>> apply(p, jnp.ones((2, 7, 3))).shape
        (2, 7, 5)
    """
    dtype = dtype or params["w"].dtype
    y = x.astype(dtype) @ params["w"].astype(dtype)                       # (..., D_out)
    # Explicit broadcast of b over the leading axes (no implicit rank promotion).
    return y + jnp.expand_dims(params["b"].astype(dtype), tuple(range(y.ndim - 1)))
