"""Dropout: each entry is zeroed with probability p, and the kept ones are scaled by
1 / (1 - p), so the expectation is unchanged:

    y = x * m / (1 - p),   m ~ Bernoulli(1 - p), one draw per entry

No parameters. Pure: the mask comes from the key given. Without a key, or at p = 0,
it is the identity, so evaluation and generation (which pass no key) are
deterministic, and a model with p = 0 computes bit for bit what it would without
this layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply(x: jax.Array, *, rate: float, key: jax.Array | None) -> jax.Array:
    """(...) -> (...): x with entries dropped at `rate` and the rest scaled by 1 / (1 - rate).

    Example:
        >>> x = jnp.ones((2, 4))
        >>> bool((apply(x, rate=0.5, key=None) == x).all())           # no key: the identity
        True
        >>> sorted(set(apply(x, rate=0.5, key=jax.random.key(0)).ravel().tolist()))   # 0 or 1 / 0.5
        [0.0, 2.0]
    """
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))
