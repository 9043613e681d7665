"""The pieces every decode loop shares (`generate.py`'s and `speculative.py`'s): the
window layout, prefill, the slide, sampling rows, stop sequences, and the checks of
what a caller passes in.

Layout. Every row of the batch has its own window of S = max_len cache slots, and
its token in slot s is at position s of its own sequence. Prompts are written
from slot 0 (right-padded to the longest); row b's prompt fills slots
0 .. len_b - 1 and decoding writes slot index[b] = len_b next. The prefill runs
over P slots, the longest prompt rounded up to a bucket (a power of two, at least
8, at most S), so a new prompt length rarely means a new compilation; a shorter
row's slots len_b .. P - 1 hold filler that its queries never see (the mask is
causal in slots) and that decoding overwrites before reading.

Longer than the window. When all S slots of a row are used, that row keeps the
tokens of its last S // 2 slots, which are prefilled again from position 0, and
decoding continues (`slide`). In terms of one sequence: whenever its context would
exceed S tokens, it is cut to its last S // 2 + 1 tokens. Re-encoding restarts
positions at 0, which the cache cannot do in place; halving the window makes this
happen once every S // 2 tokens, not every token.

Rows are independent: each slides when its own window is full, and samples with
its own key, `fold_in(key, b)` for row b, folded with the step number n. So row b
of a batch produces exactly what it would in any other batch at the same row, and
row 0 what it would alone.

The model is any model value (`config.LanguageModel`): the loops call its
`init_cache`, `apply_cached` and `decode_params`, and nothing else of it. A cache is
whatever its `init_cache` makes, every leaf with the batch axis first, so a row's
cache can be kept or replaced on its own.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn.config import LanguageModel
from minitx_fn.errors import ConfigError
from minitx_fn.sampling import Sampler


class Prompts(NamedTuple):
    """A batch of prompts as the decode loops take them."""

    window: np.ndarray       # (B, S) int32, row b's prompt in slots 0 .. lengths[b] - 1, zeros after
    lengths: np.ndarray      # (B,) int32
    prefill: int             # P, the static prefill length: the longest prompt's bucket


def bucket_length(n: int, max_len: int) -> int:
    """Smallest power of two >= n, at least 8, at most max_len.

    Example:
        >>> [bucket_length(n, 64) for n in (1, 9, 33, 64)]
        [8, 16, 64, 64]
    """
    return min(max_len, max(8, 1 << max(0, n - 1).bit_length()))


def slide_keep(max_len: int) -> int:
    """Tokens kept when the window slides.

    Example:
        >>> slide_keep(64)
        32
    """
    return max_len // 2


def row_keys(key: jax.Array, batch: int) -> jax.Array:
    """(B,) keys, fold_in(key, b) for row b: each row samples from its own stream.

    Example:
        >>> row_keys(jax.random.key(0), 3).shape
        (3,)
    """
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch, dtype=jnp.int32))


def sample_rows(sampler: Sampler, logits: jax.Array, keys: jax.Array, n) -> jax.Array:
    """logits (B, V), row keys (B,), step n -> (B,) ids: row b samples with fold_in(keys[b], n).

    Row by row (vmap), so a row's draw never depends on the others.

    Example:
        >>> sample_rows(Sampler(temperature=1.0), jnp.zeros((2, 5)), row_keys(jax.random.key(0), 2), 0).shape
        (2,)
    """
    if sampler.is_greedy:
        return sampler(logits, None)
    return jax.vmap(lambda row, k: sampler(row[None], jax.random.fold_in(k, n))[0])(logits, keys)


def cache_slots(prompt_len: int, max_new_tokens: int, max_len: int) -> int:
    """Slots the decode cache needs. prompt_len is the prefill's length: the longest
    prompt, or (as `generate` passes it) its bucket. Every token fits when prompt_len + max_new_tokens
    <= max_len, and the cache holds just those, so each step reads only them and no row
    ever slides; otherwise all max_len. Static: it follows from the loop's static
    lengths, so it adds no compilation.

    Example:
        >>> cache_slots(16, 128, 1024), cache_slots(512, 600, 1024)
        (144, 1024)
    """
    return min(max_len, prompt_len + max_new_tokens)


def prefill(model: LanguageModel, params, window: jax.Array, length: int, slots: int):
    """Slots 0 .. length - 1 of every row of window (B, S) into a fresh cache of `slots` slots.

    Returns the logits of those slots (B, length, V) and the cache.

    Example:
        >>> from minitx_fn import ModelConfig
        >>> m = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=8)
        >>> logits, cache = prefill(m, m.init(jax.random.key(0)), jnp.zeros((2, 8), jnp.int32), 3, 8)
        >>> logits.shape
        (2, 3, 5)
    """
    b = window.shape[0]
    return model.apply_cached(params, window[:, :length], model.init_cache(b, slots), index=jnp.zeros((b,), jnp.int32))


def _rows(full: jax.Array, new, old):
    """Each leaf of `new` where full[b], of `old` elsewhere (leaves (B, ...))."""
    return jax.tree.map(lambda n, o: jnp.where(full.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def slide(model: LanguageModel, params, window: jax.Array, cache, index: jax.Array, slots: int):
    """Rows whose S slots are all used (index == S) keep their last S // 2 tokens,
    prefilled again from slot 0 into a fresh cache of the same `slots`; the others are
    unchanged. window (B, S) the tokens by slot, index (B,). Returns the new window,
    cache and index.

    Example:
        >>> from minitx_fn import ModelConfig
        >>> m = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=4)
        >>> window = jnp.array([[1, 2, 3, 4], [1, 2, 0, 0]])
        >>> w, cache, index = slide(m, m.init(jax.random.key(0)), window, m.init_cache(2, 4), jnp.array([4, 2]), 4)
        >>> w.tolist(), index.tolist()                # row 0 was full: it keeps its last 2 tokens
        ([[3, 4, 0, 0], [1, 2, 0, 0]], [2, 2])
    """
    b, s = window.shape
    keep = slide_keep(s)
    full = index == s                                                                    # (B,)
    shifted = jnp.concatenate([window[:, s - keep:], jnp.zeros((b, s - keep), jnp.int32)], axis=1)
    fresh = prefill(model, params, shifted, keep, slots)[1] if keep else model.init_cache(b, slots)
    return _rows(full, shifted, window), _rows(full, fresh, cache), jnp.where(full, keep, index)


def stop_ends(tokens, ends, stop) -> jax.Array:
    """tokens (B, N) ids so far, ends (B, J) positions in them, stop (k,) ids (k >= 1)
    -> (B, J) bool: the k ids ending at position ends[b, j] of row b are the stop sequence.

    Example:
        >>> stop_ends(jnp.array([[5, 1, 2, 7]]), jnp.array([[0, 2, 3]]), jnp.array([1, 2])).tolist()
        [[False, True, False]]
    """
    k = stop.shape[0]
    padded = jnp.pad(tokens, ((0, 0), (k, 0)), constant_values=-1)                       # (B, k + N)
    at = ends[:, :, None] + 1 + jnp.arange(k, dtype=jnp.int32)[None, None, :]           # (B, J, k) in padded
    tail = jnp.take_along_axis(padded, at.reshape(at.shape[0], -1), axis=1).reshape(at.shape)
    return jnp.all(tail == stop[None, None, :], axis=-1)


# Jitted once, at module level with the model static, so a call per generation reuses it
# (the copies the built-in's unstacking makes happen once per call, outside the loop).
decode_params = jax.jit(lambda model, params: model.decode_params(params), static_argnums=0)


# ----------------------------------------------------------------------------- checks of the caller's input


def token_ids(values, model: LanguageModel, what: str) -> np.ndarray:
    """One sequence of token ids -> (n,) int32, or ValueError naming `what`.

    Example:
        >>> from minitx_fn import ModelConfig
        >>> token_ids([1, 2], ModelConfig(vocab_size=3), "the prompt").tolist()
        [1, 2]
    """
    ids = np.asarray(values).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} holds {ids.dtype} values; token ids are integers")
    if ids.size and (ids.min() < 0 or ids.max() >= model.vocab_size):
        raise ValueError(f"{what} has token ids outside [0, {model.vocab_size})")
    return ids.astype(np.int32)


def check_key(key, sampler: Sampler) -> jax.Array:
    """The key sampling draws from: ValueError for none (when sampling) or for something
    that is no JAX key (an int, say); greedy draws nothing and needs none.

    Example:
        >>> check_key(None, Sampler(temperature=1.0))
        Traceback (most recent call last):
        ValueError: sampling needs a key: pass key=jax.random.key(seed)
    """
    if key is None:
        if not sampler.is_greedy:
            raise ValueError("sampling needs a key: pass key=jax.random.key(seed)")
        return jax.random.key(0)                 # greedy draws nothing; the loop still takes a key
    if not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                            or (key.dtype == jnp.uint32 and key.shape == (2,)))):
        raise ValueError(f"key must be a JAX key, jax.random.key(seed), not {type(key).__name__}")
    return key


def check_length(max_new_tokens) -> int:
    """max_new_tokens as an int, or ValueError.

    Example:
        >>> check_length(0)
        Traceback (most recent call last):
        ValueError: max_new_tokens=0 must be a whole number in [1, 2**31)
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) \
            or not 1 <= max_new_tokens < 2**31:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a whole number in [1, 2**31)")
    return int(max_new_tokens)


def check_model(model) -> None:
    """ConfigError unless `model` is a model value ready to decode (its vocab_size set).

    Example:
        >>> check_model({"d_model": 8})
        Traceback (most recent call last):
        minitx_fn.errors.ConfigError: a model is a model value (ModelConfig, or a LanguageModel of one's own), not dict
    """
    if not isinstance(model, LanguageModel):
        raise ConfigError(f"a model is a model value (ModelConfig, or a LanguageModel of one's own), not "
                          f"{type(model).__name__}")
    if model.vocab_size is None:
        raise ConfigError("{v} is not set: give the model its vocabulary's size", v=("vocab_size", None))


def pack(prompts, model: LanguageModel) -> Prompts:
    """Prompts (sequences of token ids) -> the window the loops read: each prompt's last
    S tokens (a longer one is cut to them), right-padded. ValueError for no prompts,
    an empty one, or ids outside the vocabulary.

    Example:
        >>> from minitx_fn import ModelConfig
        >>> p = pack([[1, 2], [3]], ModelConfig(vocab_size=5, max_len=4))
        >>> p.window.tolist(), p.lengths.tolist(), p.prefill
        ([[1, 2, 0, 0], [3, 0, 0, 0]], [2, 1], 4)
    """
    check_model(model)
    if not len(prompts):
        raise ValueError("no prompts given")
    rows = []
    for i, p in enumerate(prompts):
        p = token_ids(p, model, f"prompt {i}")
        if p.size == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        rows.append(p[-model.max_len:])                       # longer prompts: their last S tokens
    lengths = np.array([len(p) for p in rows], np.int32)                                # (B,)
    window = np.zeros((len(rows), model.max_len), np.int32)                             # (B, S)
    for row, p in enumerate(rows):
        window[row, :len(p)] = p
    return Prompts(window, lengths, bucket_length(int(lengths.max()), model.max_len))


@functools.partial(jax.jit, static_argnames="model")
def last_logits(params, window, lengths, *, model: LanguageModel):
    """window (B, S) right-padded, lengths (B,) -> `model.apply`'s logits at slot
    lengths[b] - 1 of each row (B, V): what recomputing the whole context gives.

    A fixed shape, so a loop over it compiles once; causal masking makes the padding
    after a row's length invisible to the slots before it."""
    logits = model.apply(params, window)                                                # (B, S, V)
    return logits[jnp.arange(window.shape[0]), lengths - 1]


__all__ = ["Prompts", "bucket_length", "cache_slots", "check_key", "check_length", "check_model", "decode_params",
           "last_logits", "pack", "prefill", "row_keys", "sample_rows", "slide", "slide_keep", "stop_ends",
           "token_ids"]
