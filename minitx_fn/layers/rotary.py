"""Rotary position embedding (RoPE; Su et al., 2021, "RoFormer"), applied to queries and keys.

No parameters, so no `init`: like the sinusoidal table, a pure function of the
positions (`apply`). Each head's K features form K / 2 pairs, feature i with feature
i + K / 2 (the "rotate half" layout of Llama's checkpoints), and pair i at position
m is turned by the angle m theta_i, theta_i = rope_theta^(-2i / K):

    [x_i, x_{i+K/2}] -> [x_i cos(m theta_i) - x_{i+K/2} sin(m theta_i),
                         x_{i+K/2} cos(m theta_i) + x_i sin(m theta_i)]

A rotation keeps each pair's length, and turning q by m and k by n turns their dot
product by m - n only: q_m . k_n depends on the offset m - n, never on m and n
themselves (both tested as laws). Keys are rotated before they enter the KV cache,
so a cached key keeps its position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minitx_fn.layers import at_least_float32


def angles(positions: jax.Array, head_dim: int, *, rope_theta: float = 10000.0, dtype=jnp.float32) -> jax.Array:
    """positions (...,) int -> (..., K / 2): m theta_i for every pair i, in at least float32.

    Example:
        >>> angles(jnp.array([0, 2]), 4, rope_theta=100.0).tolist()     # theta_i = 100^(-2i/4): 1, 0.1
        [[0.0, 0.0], [2.0, 0.20000000298023224]]
    """
    work = at_least_float32(dtype)
    i = jnp.arange(head_dim // 2, dtype=work)                                  # (K/2,)
    inv_freq = 1.0 / (jnp.asarray(rope_theta, work) ** (2.0 * i / head_dim))  # (K/2,)
    return positions.astype(work)[..., None] * inv_freq.reshape((1,) * positions.ndim + inv_freq.shape)


def apply(x: jax.Array, positions: jax.Array, *, rope_theta: float = 10000.0) -> jax.Array:
    """x (B, T, H, K), positions (B|1, T) int -> x rotated, (B, T, H, K) in x's dtype.
    ValueError for other ranks, or an odd K (its features must pair up).

    The sines and cosines are computed in at least float32 (positions in the
    thousands times frequencies near 1 lose their digits in bfloat16).

    Example:
        >>> x = jnp.array([[[[1.0, 0.0]]]])                             # B = T = H = 1, K = 2
        >>> [round(float(v), 4) for v in apply(x, jnp.array([[1]]))[0, 0, 0]]   # turned by 1 radian
        [0.5403, 0.8415]
    """
    if x.ndim != 4 or positions.ndim != 2 or positions.shape[1] != x.shape[1]:
        raise ValueError(f"rotary.apply takes x (B, T, H, K) and positions (B|1, T); got x {tuple(x.shape)} and "
                         f"positions {tuple(positions.shape)} (split the heads first: attention.split_heads)")
    if x.shape[-1] % 2:
        raise ValueError(f"rotary positions turn pairs of features: the head width K={x.shape[-1]} must be even")
    work = at_least_float32(x.dtype)
    a = angles(positions, x.shape[-1], rope_theta=rope_theta, dtype=work)[:, :, None, :]   # (B|1, T, 1, K/2)
    cos, sin = jnp.cos(a), jnp.sin(a)
    first, second = jnp.split(x.astype(work), 2, axis=-1)                       # 2 x (B, T, H, K/2)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
