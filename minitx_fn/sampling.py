"""Sampling rules: every one is a function `(logits, key) -> token ids`.

logits: (B, V) float; key: a PRNG key; returns (B,) int32. The sampler knows
nothing of the model. `Sampler` is a frozen dataclass, so it hashes by value and
can be a static argument of the jitted decode loop: equal settings reuse one
compiled loop.

Truncations act on logits, setting the dropped entries to -inf, so they compose:
temperature first, then top-k, then top-p, then a categorical draw from the
renormalised remainder.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn.errors import ConfigError


def greedy(logits: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """(B, V) -> (B,): argmax (the lowest id among ties). The key is ignored.

    Example:
        >>> greedy(jnp.array([[0.1, 2.0, 2.0]]))   # ties go to the lowest id
        Array([1], dtype=int32)
    """
    del key
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """(B, V) -> (B, V) bool, True for exactly k entries per row: the k largest.

    Built from `lax.top_k`'s indices rather than a threshold, so ties at the k-th
    value still keep exactly k (the lower ids win ties).

    Example:
        >>> top_k_mask(jnp.array([[3.0, 1.0, 3.0, 2.0]]), 2)
        Array([[ True, False,  True, False]], dtype=bool)
    """
    k = min(k, logits.shape[-1])
    # lax.top_k orders -0.0 below 0.0, where argmax (greedy) and == see a tie; make
    # them one value so top_k=1 keeps exactly the token greedy picks.
    logits = jnp.where(logits == 0, jnp.zeros((), logits.dtype), logits)
    _, idx = jax.lax.top_k(logits, k)                                   # (B, k)
    rows = jnp.arange(logits.shape[0])[:, None]                         # (B, 1)
    return jnp.zeros(logits.shape, bool).at[rows, idx].set(True)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """(B, V) -> (B, V) bool: the smallest set of most likely tokens whose total
    probability reaches p (never empty: the most likely token is always kept).

    Sort descending; token i (in sorted order) is kept when the mass of the tokens
    before it is still below p.

    Example:
        >>> top_p_mask(jnp.log(jnp.array([[0.1, 0.6, 0.3]])), 0.8)   # 0.6 + 0.3 reaches 0.8
        Array([[False,  True,  True]], dtype=bool)
    """
    order = jnp.argsort(-logits, axis=-1)                                # (B, V) ids, most likely first
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1).astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs                    # (B, V)
    keep_sorted = mass_before < p
    keep_sorted = keep_sorted.at[:, 0].set(True)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)


# The smallest positive float32 that is not subnormal: a subnormal temperature is
# flushed to zero on some devices, and x / 0 is not a distribution.
MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """temperature == 0 is greedy; otherwise softmax(logits / temperature), truncated
    to the top_k most likely and/or the top_p nucleus, sampled with `key`. With
    id_limit, ids from id_limit on are never drawn, greedy or not: a model whose
    embedding is padded past its tokenizer's ids (Qwen2's) writes only ids the
    tokenizer has.

    Example:
        >>> s = Sampler(temperature=0.8, top_k=5)
        >>> s(jnp.zeros((2, 10)), jax.random.key(0)).shape
        (2,)
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    id_limit: int | None = None

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        n = self.id_limit
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ConfigError("{n} is invalid: it must be a whole number >= 1", n=("id_limit", n))
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < float("inf")
                and (t == 0 or t >= MIN_TEMPERATURE)):
            raise ConfigError("{t} is invalid: it must be 0 (greedy) or a finite number >= %g" % MIN_TEMPERATURE,
                              t=("temperature", t))
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ConfigError("{k} is invalid: it must be a whole number >= 1", k=("top_k", k))
        if p is not None and not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1):
            raise ConfigError("{p} is invalid: it must lie in (0, 1]", p=("top_p", p))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def drawable(self, logits: jax.Array) -> jax.Array:
        """(B, V) -> (B, V): the logits of ids from id_limit on set to -inf.

        Example:
            >>> Sampler(id_limit=2).drawable(jnp.zeros((1, 3))).tolist()
            [[0.0, 0.0, -inf]]
        """
        if self.id_limit is None or self.id_limit >= logits.shape[-1]:
            return logits
        return jnp.where(jnp.arange(logits.shape[-1]) < self.id_limit, logits, -jnp.inf)

    def filtered_logits(self, logits: jax.Array) -> jax.Array:
        """(B, V) -> (B, V) float32: scaled by 1/temperature, dropped entries -inf.

        The row's largest logit is subtracted first (softmax does not change), so a
        tiny temperature sends the others to -inf and the largest stays at 0: the
        limit t -> 0 is greedy, never inf - inf = NaN."""
        logits = self.drawable(logits.astype(jnp.float32))
        logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / self.temperature
        if self.top_k is not None:
            logits = jnp.where(top_k_mask(logits, self.top_k), logits, -jnp.inf)
        if self.top_p is not None:
            logits = jnp.where(top_p_mask(logits, self.top_p), logits, -jnp.inf)
        return logits

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """(B, V), key -> (B,) int32."""
        if self.is_greedy:
            return greedy(self.drawable(logits))
        return jax.random.categorical(key, self.filtered_logits(logits), axis=-1).astype(jnp.int32)

