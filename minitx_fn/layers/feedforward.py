"""Position-wise feed-forward network: y = GELU(x W1 + b1) W2 + b2.

Params: {"up": linear (D, F), "down": linear (F, D)}, with or without biases. GELU
is the tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as in
GPT-2 and as `jax.nn.gelu` and Flax's `nn.gelu` compute by default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minitx_fn.layers import linear


def init(key: jax.Array, *, d_model: int, d_ff: int, std: float = 0.02, out_std: float | None = None,
         dtype=jnp.float32, bias: bool = True) -> dict:
    """`out_std` initialises the down projection (default `std`); GPT-2 shrinks it
    by 1/sqrt(2 L) because every block adds its output to the residual stream.

    Example:
        >>> p = init(jax.random.key(0), d_model=4, d_ff=16)
        >>> p["up"]["w"].shape, p["down"]["w"].shape
        ((4, 16), (16, 4))
    """
    k_up, k_down = jax.random.split(key)
    return {
        "up": linear.init(k_up, d_in=d_model, d_out=d_ff, std=std, dtype=dtype, bias=bias),
        "down": linear.init(k_down, d_in=d_ff, d_out=d_model, std=out_std or std, dtype=dtype, bias=bias),
    }


def apply(params: dict, x: jax.Array, *, dtype=None) -> jax.Array:
    """(..., D) -> (..., D). Each position is transformed on its own.

    Example:
        >>> p = init(jax.random.key(0), d_model=4, d_ff=16)
        >>> apply(p, jnp.ones((2, 3, 4))).shape
        (2, 3, 4)
    """
    h = jax.nn.gelu(linear.apply(params["up"], x, dtype=dtype), approximate=True)   # (..., F)
    return linear.apply(params["down"], h, dtype=dtype)                             # (..., D)
