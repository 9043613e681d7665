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
so a cached key keeps its position. `scaling` (`config.RopeScaling`: linear,
Llama 3.1's, YaRN) changes the frequencies theta_i, and YaRN the length of q and k,
never the pairing: the offset law holds for every kind.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from minitx_fn.specs import RopeScaling
from minitx_fn.layers.dtypes import at_least_float32


def frequencies(head_dim: int, *, rope_theta: float = 10000.0, scaling: RopeScaling | None = None,
                dtype=jnp.float32) -> jax.Array:
    """(K / 2,): theta_i = rope_theta^(-2i / K) of every pair i, stretched by `scaling`
    (`config.RopeScaling`, whose docstring says what each kind does), in at least float32.

    Example:
        >>> frequencies(4, rope_theta=100.0).tolist(), frequencies(4, rope_theta=100.0,
        ...     scaling=RopeScaling(kind="linear", factor=2.0)).tolist()
        ([1.0, 0.10000000149011612], [0.5, 0.05000000074505806])
    """
    work = at_least_float32(dtype)
    i = jnp.arange(head_dim // 2, dtype=work)                                  # (K/2,)
    inv_freq = 1.0 / (jnp.asarray(rope_theta, work) ** (2.0 * i / head_dim))  # (K/2,)
    if scaling is None:
        return inv_freq
    s = scaling
    if s.kind == "linear":
        return inv_freq / s.factor
    if s.kind == "llama3":
        wavelength = 2 * math.pi / inv_freq
        # 1 where the wavelength is at most original / high_freq_factor, 0 where it is
        # at least original / low_freq_factor, and linear in 1 / wavelength between.
        smooth = (s.original_max_len / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        kept = jnp.clip(smooth, 0, 1)
    else:
        # yarn: pair i turns original_max_len theta_i / (2 pi) times over the original
        # context, and the pair that turns r times is pair(r) below. Pairs up to
        # pair(beta_fast) are kept, pairs from pair(beta_slow) on are divided, and a
        # linear ramp joins them.
        def pair(turns: float) -> float:
            return head_dim * math.log(s.original_max_len / (turns * 2 * math.pi)) / (2 * math.log(rope_theta))
        low, high = pair(s.beta_fast), pair(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        kept = 1 - jnp.clip((i - low) / (high - low if high != low else 0.001), 0, 1)
    return (1 - kept) * inv_freq / s.factor + kept * inv_freq


def angles(positions: jax.Array, head_dim: int, *, rope_theta: float = 10000.0, scaling: RopeScaling | None = None,
           dtype=jnp.float32) -> jax.Array:
    """positions (...,) int -> (..., K / 2): m theta_i for every pair i (`frequencies`), in at least float32.

    Example:
        >>> angles(jnp.array([0, 2]), 4, rope_theta=100.0).tolist()     # theta_i = 100^(-2i/4): 1, 0.1
        [[0.0, 0.0], [2.0, 0.20000000298023224]]
    """
    work = at_least_float32(dtype)
    inv_freq = frequencies(head_dim, rope_theta=rope_theta, scaling=scaling, dtype=work)   # (K/2,)
    return positions.astype(work)[..., None] * inv_freq.reshape((1,) * positions.ndim + inv_freq.shape)


def apply(x: jax.Array, positions: jax.Array, *, rope_theta: float = 10000.0, scaling: RopeScaling | None = None
          ) -> jax.Array:
    """x (B, T, H, K), positions (B|1, T) int -> x rotated, (B, T, H, K) in x's dtype,
    and times `scaling.attention_factor` where YaRN sets one. ValueError for other
    ranks, or an odd K (its features must pair up).

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
    a = angles(positions, x.shape[-1], rope_theta=rope_theta, scaling=scaling, dtype=work)[:, :, None, :]
    cos, sin = jnp.cos(a), jnp.sin(a)                                           # (B|1, T, 1, K/2)
    if scaling is not None and scaling.attention_factor is not None:
        cos, sin = cos * scaling.attention_factor, sin * scaling.attention_factor
    first, second = jnp.split(x.astype(work), 2, axis=-1)                       # 2 x (B, T, H, K/2)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
