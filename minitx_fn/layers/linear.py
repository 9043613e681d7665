"""Dense projection: y = x W + b, or y = x W without a bias.

Params: {"w": (D_in, D_out), "b": (D_out,)}; {"w"} alone when made with bias=False.
Quantized (`quantize.py`): {"wq": (D_out, D_in) int8 or bfloat16, "scale": (D_out,)
float32, "b"}, W = (wq * scale[:, None])^T. Stored a row per output, so XLA:CPU
converts each row inside the matrix-vector product's loop instead of writing a float32
copy of W first (the other way round it did, five times slower than float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init(key: jax.Array, *, d_in: int, d_out: int, std: float = 0.02, dtype=jnp.float32, bias: bool = True) -> dict:
    """W ~ Normal(0, std^2), b = 0 (no b with bias=False).

    Example:
        >>> p = init(jax.random.key(0), d_in=3, d_out=5)
        >>> p["w"].shape, p["b"].shape, sorted(init(jax.random.key(0), d_in=3, d_out=5, bias=False))
        ((3, 5), (5,), ['w'])
    """
    w = std * jax.random.normal(key, (d_in, d_out), dtype)
    return {"w": w, "b": jnp.zeros((d_out,), dtype)} if bias else {"w": w}


def apply(params: dict, x: jax.Array, *, dtype=None) -> jax.Array:
    """(..., D_in) -> (..., D_out): y = x W + b.

    `dtype` is the compute dtype; the parameters are cast to it, so float32
    parameters can drive a bfloat16 matmul. None keeps the parameters' dtype.

    Example:
        >>> p = init(jax.random.key(0), d_in=3, d_out=5)
        >>> apply(p, jnp.ones((2, 7, 3))).shape
        (2, 7, 5)
    """
    if "wq" in params:                                    # quantized: (x wq^T) * scale, per output
        dtype = dtype or params["scale"].dtype
        y = x.astype(dtype) @ params["wq"].astype(dtype).T
        y = y * jnp.expand_dims(params["scale"].astype(dtype), tuple(range(y.ndim - 1)))
    else:
        dtype = dtype or params["w"].dtype
        y = x.astype(dtype) @ params["w"].astype(dtype)                   # (..., D_out)
    if "b" not in params:
        return y
    # Explicit broadcast of b over the leading axes (no implicit rank promotion).
    return y + jnp.expand_dims(params["b"].astype(dtype), tuple(range(y.ndim - 1)))


def d_out(params: dict) -> int:
    """D_out of a linear layer's parameters, quantized or not.

    Example:
        >>> d_out(init(jax.random.key(0), d_in=3, d_out=5)), d_out({"wq": jnp.zeros((5, 3), jnp.int8)})
        (5, 5)
    """
    return params["wq"].shape[-2] if "wq" in params else params["w"].shape[-1]
