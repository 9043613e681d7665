"""Gated feed-forward network (Shazeer, 2020; Llama's MLP):

    y = (SiLU(x W_gate) * (x W_up)) W_down,      SiLU(z) = z sigmoid(z)

Params: {"gate": linear (D, F), "up": linear (D, F), "down": linear (F, D)}, with or
without biases. Three matrices where GELU's MLP has two, so models of about equal
size take F = 8 D / 3 (`config.default_d_ff`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minitx_fn.layers import linear


def init(key: jax.Array, *, d_model: int, d_ff: int, std: float = 0.02, out_std: float | None = None,
         dtype=jnp.float32, bias: bool = True) -> dict:
    """`out_std` initialises the down projection (default `std`), as in `feedforward.init`.

    Example:
        >>> p = init(jax.random.key(0), d_model=4, d_ff=12, bias=False)
        >>> {name: layer["w"].shape for name, layer in p.items()}
        {'gate': (4, 12), 'up': (4, 12), 'down': (12, 4)}
    """
    k_gate, k_up, k_down = jax.random.split(key, 3)
    return {
        "gate": linear.init(k_gate, d_in=d_model, d_out=d_ff, std=std, dtype=dtype, bias=bias),
        "up": linear.init(k_up, d_in=d_model, d_out=d_ff, std=std, dtype=dtype, bias=bias),
        "down": linear.init(k_down, d_in=d_ff, d_out=d_model, std=out_std or std, dtype=dtype, bias=bias),
    }


def apply(params: dict, x: jax.Array, *, dtype=None) -> jax.Array:
    """(..., D) -> (..., D). Each position is transformed on its own.

    Example:
        >>> p = init(jax.random.key(0), d_model=4, d_ff=12)
        >>> apply(p, jnp.ones((2, 3, 4))).shape
        (2, 3, 4)
    """
    gate = jax.nn.silu(linear.apply(params["gate"], x, dtype=dtype))          # (..., F)
    return linear.apply(params["down"], gate * linear.apply(params["up"], x, dtype=dtype), dtype=dtype)
