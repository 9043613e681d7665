"""Generation: prefill the prompts once, then decode from a fixed-size KV cache inside
one compiled `lax.while_loop`.

Layout. Every row of the batch has its own window of S = max_len cache slots, and
its token in slot s is at position s of its own sequence. Prompts are written
from slot 0 (right-padded to the longest); row b's prompt fills slots
0 .. len_b - 1 and decoding writes slot index[b] = len_b next. The prefill runs
over P slots, the longest prompt rounded up to a bucket (a power of two, at least
8, at most S), so a new prompt length rarely means a new compilation; a shorter
row's slots len_b .. P - 1 hold filler that its queries never see (the mask is
causal in slots) and that decoding overwrites before reading.

Each loop iteration:
    1. token[b] = sampler(logits[b], fold_in(row_key[b], n))          (B,)
    2. every row whose S slots are all used slides its window (below)
    3. write token[b] at slot index[b]; run the model on that one token per row,
       reading the cache, to get the next logits; index += 1

Longer than the window. When all S slots of a row are used, that row keeps the
tokens of its last S // 2 slots, which are prefilled again from position 0, and
decoding continues. In terms of one sequence: whenever its context would exceed S
tokens, it is cut to its last S // 2 + 1 tokens. Re-encoding restarts positions at
0, which the cache cannot do in place; halving the window makes this happen once
every S // 2 tokens, not every token.

Rows are independent: each slides when its own window is full, and samples with
its own key, `fold_in(key, b)` for row b, folded with the step number n. So row b
of a batch produces exactly what it would in any other batch at the same row, and
row 0 what it would alone. `generate_recompute` implements the same policy by
recomputing the whole context for every token: the tests prove both give the same
tokens and logits.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn import memory, model
from minitx_fn.config import ModelConfig
from minitx_fn.defaults import DRAFT_TOKENS, SAMPLE_TOKENS
from minitx_fn.errors import ConfigError, Error
from minitx_fn.layers.attention import KVCache
from minitx_fn.sampling import Sampler
from minitx_fn.tokenizer import same_ids


class DecodeState(NamedTuple):
    """The carry of the decode loop."""

    n: jax.Array             # () int32, tokens generated so far
    index: jax.Array         # (B,) int32, the slot each row writes next
    window: jax.Array        # (B, S) int32, each row's tokens by slot (re-prefilled when the row slides)
    cache: tuple[KVCache, ...]  # one per layer: (B, S, G, K) keys and values, in the compute dtype
    logits: jax.Array        # (B, V) logits of each row's latest token: the next token's distribution
    tokens: jax.Array        # (B, N) int32, generated ids
    token_logits: jax.Array  # (B, N, V) the logits each token was sampled from, or (B, 0, V) if not kept
    done: jax.Array          # (B,) bool, the row has generated its stop sequence
    length: jax.Array        # (B,) int32, how many generated tokens count (up to the stop sequence)


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


def _prefill(params, window, length: int, config: ModelConfig, slots: int | None = None):
    """Slots 0 .. length - 1 of every row of window (B, S) into a fresh cache of `slots`
    slots (default S).

    Returns the logits of those slots (B, length, V) and the cache (L KVCache of (B, slots, G, K))."""
    b = window.shape[0]
    return model.apply_cached(params, window[:, :length], model.init_cache(config, b, slots), config=config,
                              index=jnp.zeros((b,), jnp.int32))


def _slide(params, window, cache, index, config: ModelConfig):
    """Rows whose S slots are all used (index == S) keep their last S // 2 tokens,
    prefilled again from slot 0 into a cache of the same slots; the others are unchanged.

    window (B, S) the tokens by slot, cache the model's (L KVCache), index (B,).
    Returns the new window, cache and index."""
    b, s = window.shape
    keep = slide_keep(s)
    full = index == s                                                                    # (B,)
    shifted = jnp.concatenate([window[:, s - keep:], jnp.zeros((b, s - keep), jnp.int32)], axis=1)
    slots = cache[0].k.shape[1]
    fresh = _prefill(params, shifted, keep, config, slots)[1] if keep else model.init_cache(config, b, slots)
    take = full[:, None, None, None]                                                     # over (B, S, G, K)
    return (jnp.where(full[:, None], shifted, window),
            jax.tree.map(lambda new, old: jnp.where(take, new, old), fresh, cache),
            jnp.where(full, keep, index))


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


@functools.partial(jax.jit, static_argnames=("config", "sampler", "prompt_len", "max_new_tokens", "keep_logits"))
def _decode(params, window, lengths, key, stop, *, config: ModelConfig, sampler: Sampler, prompt_len: int,
            max_new_tokens: int, keep_logits: bool):
    """window (B, S) with row b's prompt in slots 0 .. lengths[b] - 1; prompt_len >= max(lengths)
    is the static prefill length (the bucket); stop (k,) int32 ids, k = 0 for none
    (an array, so a new stop sequence of the same length reuses the compiled loop).

    Returns generated ids (B, N), the logits each was sampled from (B, N, V) (or
    (B, 0, V) without keep_logits), and the number of tokens generated per row (B,),
    which ends after a stop sequence."""
    b, s = window.shape
    v = config.vocab_size
    rows = jnp.arange(b, dtype=jnp.int32)
    keys = row_keys(key, b)
    slots = cache_slots(prompt_len, max_new_tokens, s)
    prompt_logits, cache = _prefill(params, window, prompt_len, config, slots)           # (B, P, V)

    def body(state: DecodeState) -> DecodeState:
        token = sample_rows(sampler, state.logits, keys, state.n)                        # (B,)
        tokens = state.tokens.at[:, state.n].set(token)
        token_logits = state.token_logits.at[:, state.n].set(state.logits) if keep_logits else state.token_logits
        length = jnp.where(state.done, state.length, state.n + 1)
        done = state.done
        if stop.shape[0]:
            done = done | stop_ends(tokens, jnp.full((b, 1), state.n), stop)[:, 0]
        state = state._replace(tokens=tokens, token_logits=token_logits, length=length, done=done)
        if slots == s:                                                                   # a row may fill its window
            window, cache, index = jax.lax.cond(jnp.any(state.index == s),
                                                functools.partial(_slide, params, config=config),
                                                lambda *a: a, state.window, state.cache, state.index)
            state = state._replace(window=window, cache=cache, index=index)
        window = state.window.at[rows, state.index].set(token)
        logits, cache = model.apply_cached(params, token[:, None], state.cache, config=config, index=state.index)
        return state._replace(n=state.n + 1, index=state.index + 1, window=window, cache=cache, logits=logits[:, 0])

    def cond(state: DecodeState) -> jax.Array:
        return (state.n < max_new_tokens) & ~jnp.all(state.done)

    state = DecodeState(
        n=jnp.int32(0), index=lengths, window=window, cache=cache,
        logits=prompt_logits[rows, lengths - 1],                                         # (B, V)
        tokens=jnp.zeros((b, max_new_tokens), jnp.int32),
        token_logits=jnp.zeros((b, max_new_tokens if keep_logits else 0, v), prompt_logits.dtype),
        done=jnp.zeros((b,), bool), length=jnp.zeros((b,), jnp.int32))
    state = jax.lax.while_loop(cond, body, state)
    return state.tokens, state.token_logits, state.length


_unstack_blocks = jax.jit(model.unstack_blocks)       # outside the decode loop: the copies happen once per call


def _token_ids(values, config: ModelConfig, what: str) -> np.ndarray:
    """One sequence of token ids -> (n,) int32, or ValueError naming `what`."""
    ids = np.asarray(values).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} holds {ids.dtype} values; token ids are integers")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise ValueError(f"{what} has token ids outside [0, {config.vocab_size})")
    return ids.astype(np.int32)


def _check_key(key, sampler: Sampler) -> jax.Array:
    """The key sampling draws from: ValueError for none (when sampling) or for something
    that is no JAX key (an int, say); greedy draws nothing and needs none."""
    if key is None:
        if not sampler.is_greedy:
            raise ValueError("sampling needs a key: pass key=jax.random.key(seed)")
        return jax.random.key(0)                 # greedy draws nothing; the loop still takes a key
    if not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                            or (key.dtype == jnp.uint32 and key.shape == (2,)))):
        raise ValueError(f"key must be a JAX key, jax.random.key(seed), not {type(key).__name__}")
    return key


def _check_draft_tokens(draft, draft_tokens) -> None:
    if draft is None and draft_tokens is not None:
        raise ConfigError("{k} was given without a draft, the model that would propose them",
                          k=("draft_tokens", draft_tokens))


def _check_length(max_new_tokens) -> None:
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) \
            or not 1 <= max_new_tokens < 2**31:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a whole number in [1, 2**31)")


def _check_prompts(prompts, config: ModelConfig) -> list[np.ndarray]:
    if not len(prompts):
        raise ValueError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        p = _token_ids(p, config, f"prompt {i}")
        if p.size == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        out.append(p[-config.max_len:])                     # longer prompts: their last S tokens
    return out


def generate(params, prompts, *, config: ModelConfig, max_new_tokens: int, key: jax.Array | None = None,
             sampler: Sampler = Sampler(temperature=0.0), stop: tuple[int, ...] = (),
             return_logits: bool = False, draft=None, draft_tokens: int | None = None):
    """Continue each prompt (a sequence of token ids) by up to max_new_tokens tokens:
    ids in, ids out (`complete` takes and returns text).

    Returns a list of (n_b,) int32 arrays, one per prompt: the new tokens, ending
    after `stop` if it was generated. With return_logits, also the (n_b, V) logits
    each token was sampled from.

    Rows are independent (module docstring): row b's tokens depend only on its
    prompt, `key` and b. Row b samples its n-th token with
    fold_in(fold_in(key, b), n), so the same prompts and key give the same tokens.
    key may be None for a greedy sampler, which draws nothing. `stop` ids, like the
    prompts', lie in [0, V). Any of the V ids may be drawn: for a model whose table is
    padded past its tokenizer (an imported Qwen2), give
    `Sampler(..., id_limit=tokenizer.vocab_size)`, as `complete` does.

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=8)
        >>> p = model.init(jax.random.key(0), cfg)
        >>> [t.shape for t in generate(p, [[1, 2], [3]], config=cfg, key=jax.random.key(1), max_new_tokens=4)]
        [(4,), (4,)]
    """
    _check_draft_tokens(draft, draft_tokens)
    if draft is not None:
        from minitx_fn import speculative                  # it builds on this module
        out = speculative.speculate(params, prompts, config=config, draft=draft,
                                    draft_tokens=DRAFT_TOKENS if draft_tokens is None else draft_tokens,
                                    max_new_tokens=max_new_tokens, key=key, sampler=sampler, stop=stop,
                                    return_logits=return_logits)
        return (out.tokens, out.logits) if return_logits else out.tokens
    _check_length(max_new_tokens)
    key = _check_key(key, sampler)
    prompts = _check_prompts(prompts, config)
    stop = _token_ids(stop, config, "the stop sequence")
    lengths = np.array([len(p) for p in prompts], np.int32)                             # (B,)
    window = np.zeros((len(prompts), config.max_len), np.int32)                         # (B, S)
    for row, p in enumerate(prompts):
        window[row, :len(p)] = p
    ids, logits, lengths = _decode(_unstack_blocks(params), jnp.asarray(window), jnp.asarray(lengths), key,
                                   jnp.asarray(stop),
                                   config=config, sampler=sampler,
                                   prompt_len=bucket_length(int(lengths.max()), config.max_len),
                                   max_new_tokens=int(max_new_tokens), keep_logits=return_logits)
    ids, logits, lengths = jax.device_get((ids, logits, lengths))
    tokens = [ids[b, :lengths[b]] for b in range(len(prompts))]
    if return_logits:
        return tokens, [logits[b, :lengths[b]] for b in range(len(prompts))]
    return tokens


@functools.partial(jax.jit, static_argnames="apply_fn")
def _last_logits(params, window, lengths, *, apply_fn):
    """window (B, S) right-padded, lengths (B,) -> logits at slot lengths[b] - 1 of each row (B, V).

    A fixed shape, so the recompute loop compiles once; causal masking makes the
    padding after a row's length invisible to the slots before it."""
    logits = apply_fn(params, window)                                                   # (B, S, V)
    return logits[jnp.arange(window.shape[0]), lengths - 1]


def generate_recompute(params, prompts, *, config: ModelConfig, max_new_tokens: int, key: jax.Array | None = None,
                       sampler: Sampler = Sampler(temperature=0.0), apply_fn=None):
    """The reference: a Python loop that recomputes every row's full, cropped context
    for every token (prompts of any lengths). Same sampling keys and window policy as
    `generate`, no stop sequence. Returns ids (B, N) and logits (B, N, V) as numpy arrays.
    The model is the library's for `config`, or any causal `apply_fn(params, tokens (B, S))
    -> logits (B, S, V)` of one's own (config then gives the context S and the vocabulary).

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=8)
        >>> ids, logits = generate_recompute(model.init(jax.random.key(0), cfg), [[1, 2], [3]], config=cfg,
        ...                                  key=jax.random.key(1), max_new_tokens=3)
        >>> ids.shape, logits.shape
        ((2, 3), (2, 3, 5))
    """
    _check_length(max_new_tokens)
    apply_fn = apply_fn or model.apply_fn(config)
    key = _check_key(key, sampler)
    s, keep = config.max_len, slide_keep(config.max_len)
    contexts = [list(p) for p in _check_prompts(prompts, config)]
    keys = row_keys(key, len(contexts))
    ids, all_logits = [], []
    for n in range(max_new_tokens):
        window = np.zeros((len(contexts), s), np.int32)
        for row, context in enumerate(contexts):
            window[row, :len(context)] = context
        lengths = jnp.asarray([len(c) for c in contexts], jnp.int32)
        logits = _last_logits(params, jnp.asarray(window), lengths, apply_fn=apply_fn)  # (B, V)
        token = np.asarray(sample_rows(sampler, logits, keys, n))
        ids.append(token)
        all_logits.append(np.asarray(logits))
        for row, context in enumerate(contexts):
            context.append(int(token[row]))
            if len(context) > s:
                del context[:len(context) - (keep + 1)]
    return np.stack(ids, axis=1), np.stack(all_logits, axis=1)


class PromptError(Error):
    """A prompt or stop string the model cannot take (empty, unknown characters, not UTF-8)."""


def encode_prompt(tokenizer, text: str, what: str = "the prompt") -> np.ndarray:
    """text -> (T,) int32 ids; PromptError for an empty text, for bytes that are not
    UTF-8 (a command line's lone surrogates) with a byte or BPE tokenizer, and (from
    the char tokenizer) for characters it does not know, naming them.

    Example:
        >>> from minitx_fn.tokenizer import CharTokenizer
        >>> encode_prompt(CharTokenizer("ab"), "ba").tolist()
        [1, 0]
        >>> encode_prompt(CharTokenizer("ab"), "")
        Traceback (most recent call last):
        minitx_fn.generate.PromptError: the prompt is empty; give at least one character
    """
    if not isinstance(text, str) or not text:
        raise PromptError(f"{what} is empty; give at least one character" if text == "" else
                          f"{what} must be a str, not {type(text).__name__}")
    # A byte that is not UTF-8 reaches Python as a lone surrogate: no tokenizer may take it
    # (byte would echo it back, BPE cannot encode it at all).
    bad = sorted({c for c in text if "\ud800" <= c <= "\udfff"})
    if bad and tokenizer.kind != "char":
        raise PromptError(f"{what} holds bytes that are not UTF-8 text ({', '.join(repr(c) for c in bad)}); give "
                          f"UTF-8 text")
    try:
        return tokenizer.encode(text)
    except Error as e:                           # the char tokenizer names the characters it lacks
        raise PromptError(f"{what}: {e}") from None


def complete(run_model, prompt: str, *, max_new_tokens: int = SAMPLE_TOKENS, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, key: jax.Array | None = None,
             stop: str | None = None, draft=None, draft_tokens: int | None = None) -> str:
    """The text that follows `prompt`: run_model is anything with .params, .config and
    .tokenizer (`checkpoint.load_model`'s Model, `job.train`'s result). Greedy by default
    (and at temperature 0), which needs no key; with a temperature, top_k or top_p it
    samples with `key` (temperature 1 when only top_k or top_p is given). Stops after max_new_tokens, or after `stop`.
    With a draft (a smaller run of the same tokenizer and context: its directory, or
    the run loaded), speculative decoding (`generate`). PromptError for a prompt or
    stop string the tokenizer cannot take; ConfigError for a draft that cannot serve;
    MemoryBudgetError if the generation cannot fit in memory.

    Example:
        >>> from minitx_fn import checkpoint
        >>> from minitx_fn.tokenizer import CharTokenizer
        >>> cfg = ModelConfig(vocab_size=3, d_model=8, n_heads=2, max_len=8)
        >>> m = checkpoint.Model(model.init(jax.random.key(0), cfg), cfg, CharTokenizer("abc"), {})
        >>> len(complete(m, "ab", max_new_tokens=5))
        5
    """
    params, config, tokenizer = run_model.params, run_model.config, run_model.tokenizer
    if temperature is None:
        temperature = 1.0 if (top_k is not None or top_p is not None) else 0.0
    # A model whose table is padded past the tokenizer (an imported Qwen2) draws only the tokenizer's ids.
    limit = tokenizer.vocab_size if tokenizer.vocab_size < config.vocab_size else None
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, id_limit=limit)
    ids = encode_prompt(tokenizer, prompt)
    stop_ids = () if stop is None else encode_prompt(tokenizer, stop, "the stop string")
    need = memory.generation_bytes(config, 1, max_new_tokens)
    _check_draft_tokens(draft, draft_tokens)
    if isinstance(draft, (str, os.PathLike)):
        from minitx_fn import checkpoint                   # it builds on this module
        draft = checkpoint.load_model(draft)
    if draft is not None:
        if not hasattr(draft, "tokenizer"):
            raise ConfigError(f"a draft for complete is a run: its directory or checkpoint.load_model(run), with a "
                              f"tokenizer; {type(draft).__name__} has none")
        if not same_ids(draft.tokenizer, tokenizer):
            raise ConfigError(f"the draft's tokenizer ({draft.tokenizer.kind}, {draft.tokenizer.vocab_size} tokens) is "
                              f"not the model's ({tokenizer.kind}, {tokenizer.vocab_size} tokens): a draft must "
                              f"share the model's tokenizer")
        need += memory.generation_bytes(draft.config, 1, max_new_tokens)
    memory.check(need, "this generation", "try a smaller {n}", n=("max_new_tokens", max_new_tokens))
    new = generate(params, [ids], config=config, key=key, max_new_tokens=max_new_tokens, sampler=sampler,
                   stop=stop_ids, draft=draft, draft_tokens=draft_tokens)[0]
    text = tokenizer.decode(new)
    # The loop stops on the stop string's own ids; a tokenizer that merges (bpe) may
    # write the same text with other ids, so the text is cut at its first occurrence.
    at = -1 if stop is None else text.find(stop)
    return text if at < 0 else text[:at + len(stop)]
