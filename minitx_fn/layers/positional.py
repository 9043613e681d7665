"""Fixed sinusoidal positional encoding ("Attention Is All You Need", section 3.5).

No parameters: a pure function of the positions and the width D. Features are
interleaved: for i = 0 .. ceil(D/2) - 1,

    PE[pos, 2i]     = sin(pos / 10000^(2i / D))
    PE[pos, 2i + 1] = cos(pos / 10000^(2i / D))

The encoding is added to the token embeddings. It is defined for any position, so
it has no length limit of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minitx_fn.layers.dtypes import at_least_float32


def encode(positions: jax.Array, d_model: int, *, dtype=jnp.float32) -> jax.Array:
    """positions (...,) int -> (..., D): the table rows for these positions.

    Computed in at least float32 (positions up to a few thousand times frequencies
    near 1 lose digits in bfloat16), then cast to `dtype`.

    Example:
        >>> encode(jnp.array([0]), 4).tolist()          # sin 0, cos 0, sin 0, cos 0
        [[0.0, 1.0, 0.0, 1.0]]
        >>> encode(jnp.arange(6).reshape(2, 3), 8).shape
        (2, 3, 8)
    """
    work = at_least_float32(dtype)
    i = jnp.arange((d_model + 1) // 2, dtype=work)             # (ceil(D/2),)
    inv_freq = 1.0 / (10000.0 ** (2.0 * i / d_model))          # (ceil(D/2),)
    inv_freq = inv_freq.reshape((1,) * positions.ndim + inv_freq.shape)   # explicit broadcast
    angles = positions.astype(work)[..., None] * inv_freq      # (..., ceil(D/2))
    # Interleave: stack sin and cos on a new last axis, then flatten pairs -> (..., 2*ceil(D/2)).
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    pe = pe.reshape(*angles.shape[:-1], -1)[..., :d_model]     # (..., D)
    return pe.astype(dtype)


def table(length: int, d_model: int, *, dtype=jnp.float32) -> jax.Array:
    """(length, D): the encoding of positions 0 .. length - 1.

    Example:
        >>> table(5, 8).shape
        (5, 8)
    """
    return encode(jnp.arange(length), d_model, dtype=dtype)
