"""Generation: prefill the prompts once, then decode from a fixed-size KV cache inside
one compiled `lax.while_loop`. The window layout, the prefill, the slide past the
window and the independence of rows are `decode.py`'s (its module docstring).

Each loop iteration:
    1. token[b] = sampler(logits[b], fold_in(row_key[b], n))          (B,)
    2. every row whose S slots are all used slides its window (`decode.slide`)
    3. write token[b] at slot index[b]; run the model on that one token per row,
       reading the cache, to get the next logits; index += 1

`generate_recompute` implements the same policy by recomputing the whole context
for every token: the tests (and `testing.check_model`, for a model of one's own)
prove both give the same tokens and logits, in the same shape. Decoding with a draft
model is `speculative.speculate`; `complete`, which takes a draft, chooses it.

The model is any model value (`config.LanguageModel`): its `init_cache`,
`apply_cached` and `decode_params` drive the loop, its `apply` the reference.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn import checkpoint, decode, memory, speculative
from minitx_fn.config import LanguageModel
from minitx_fn.decode import (bucket_length, cache_slots, row_keys, sample_rows, slide_keep,  # noqa: F401  (re-exported)
                              stop_ends)
from minitx_fn.defaults import DRAFT_TOKENS, SAMPLE_TOKENS
from minitx_fn.errors import ConfigError, Error
from minitx_fn.sampling import Sampler
from minitx_fn.tokenizer import same_ids


class DecodeState(NamedTuple):
    """The carry of the decode loop."""

    n: jax.Array             # () int32, tokens generated so far
    index: jax.Array         # (B,) int32, the slot each row writes next
    window: jax.Array        # (B, S) int32, each row's tokens by slot (re-prefilled when the row slides)
    cache: tuple             # the model's cache (the built-in's: one KVCache (B, slots, G, K) per layer)
    logits: jax.Array        # (B, V) logits of each row's latest token: the next token's distribution
    tokens: jax.Array        # (B, N) int32, generated ids
    token_logits: jax.Array  # (B, N, V) the logits each token was sampled from, or (B, 0, V) if not kept
    done: jax.Array          # (B,) bool, the row has generated its stop sequence
    length: jax.Array        # (B,) int32, how many generated tokens count (up to the stop sequence)


@functools.partial(jax.jit, static_argnames=("model", "sampler", "prompt_len", "max_new_tokens", "keep_logits"))
def decode_loop(params, window, lengths, key, stop, *, model: LanguageModel, sampler: Sampler, prompt_len: int,
                max_new_tokens: int, keep_logits: bool):
    """The compiled decode loop `generate` calls (the module docstring), for a caller
    that lowers or profiles it (benchmarks/profile_decode.py): params as
    `decode.decode_params` gives them; window (B, S) with row b's prompt in slots
    0 .. lengths[b] - 1; prompt_len >= max(lengths) is the static prefill length (the
    bucket, `decode.bucket_length`); stop (k,) int32 ids, k = 0 for none (an array, so a
    new stop sequence of the same length reuses the compiled loop).

    Returns generated ids (B, N), the logits each was sampled from (B, N, V) (or
    (B, 0, V) without keep_logits), and the number of tokens generated per row (B,),
    which ends after a stop sequence."""
    b, s = window.shape
    rows = jnp.arange(b, dtype=jnp.int32)
    keys = row_keys(key, b)
    slots = cache_slots(prompt_len, max_new_tokens, s)
    prompt_logits, cache = decode.prefill(model, params, window, prompt_len, slots)     # (B, P, V)

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
                                                functools.partial(decode.slide, model, params, slots=slots),
                                                lambda *a: a, state.window, state.cache, state.index)
            state = state._replace(window=window, cache=cache, index=index)
        window = state.window.at[rows, state.index].set(token)
        logits, cache = model.apply_cached(params, token[:, None], state.cache, index=state.index)
        return state._replace(n=state.n + 1, index=state.index + 1, window=window, cache=cache, logits=logits[:, 0])

    def cond(state: DecodeState) -> jax.Array:
        return (state.n < max_new_tokens) & ~jnp.all(state.done)

    first_logits = prompt_logits[rows, lengths - 1]                                      # (B, V)
    state = DecodeState(
        n=jnp.int32(0), index=lengths, window=window, cache=cache, logits=first_logits,
        tokens=jnp.zeros((b, max_new_tokens), jnp.int32),
        token_logits=jnp.zeros((b, max_new_tokens if keep_logits else 0, first_logits.shape[-1]),
                               first_logits.dtype),
        done=jnp.zeros((b,), bool), length=jnp.zeros((b,), jnp.int32))
    state = jax.lax.while_loop(cond, body, state)
    return state.tokens, state.token_logits, state.length


def generate(params, prompts, *, model: LanguageModel, max_new_tokens: int, key: jax.Array | None = None,
             sampler: Sampler = Sampler(temperature=0.0), stop: tuple[int, ...] = (),
             return_logits: bool = False):
    """Continue each prompt (a sequence of token ids) by up to max_new_tokens tokens:
    ids in, ids out (`complete` takes and returns text). `model` is the model value
    `params` belong to.

    Returns a list of (n_b,) int32 arrays, one per prompt: the new tokens, ending
    after `stop` if it was generated. With return_logits, also the (n_b, V) logits
    each token was sampled from.

    Rows are independent (`decode`'s docstring): row b's tokens depend only on its
    prompt, `key` and b. Row b samples its n-th token with
    fold_in(fold_in(key, b), n), so the same prompts and key give the same tokens.
    key may be None for a greedy sampler, which draws nothing. `stop` ids, like the
    prompts', lie in [0, V). Any of the V ids may be drawn: for a model whose table is
    padded past its tokenizer (an imported Qwen2), give
    `Sampler(..., id_limit=tokenizer.vocab_size)`, as `complete` does. With a draft
    model, `speculative.speculate` gives the same (greedy: exactly these tokens).

    Example:
        >>> from minitx_fn import ModelConfig
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=8)
        >>> p = cfg.init(jax.random.key(0))
        >>> [t.shape for t in generate(p, [[1, 2], [3]], model=cfg, key=jax.random.key(1), max_new_tokens=4)]
        [(4,), (4,)]
    """
    max_new_tokens = decode.check_length(max_new_tokens)
    key = decode.check_key(key, sampler)
    packed = decode.pack(prompts, model)
    stop = decode.token_ids(stop, model, "the stop sequence")
    ids, logits, lengths = decode_loop(decode.decode_params(model, params), jnp.asarray(packed.window),
                                   jnp.asarray(packed.lengths), key, jnp.asarray(stop), model=model, sampler=sampler,
                                   prompt_len=packed.prefill, max_new_tokens=max_new_tokens,
                                   keep_logits=return_logits)
    ids, logits, lengths = jax.device_get((ids, logits, lengths))
    tokens = [ids[b, :lengths[b]] for b in range(len(lengths))]
    if return_logits:
        return tokens, [logits[b, :lengths[b]] for b in range(len(lengths))]
    return tokens


def generate_recompute(params, prompts, *, model: LanguageModel, max_new_tokens: int, key: jax.Array | None = None,
                       sampler: Sampler = Sampler(temperature=0.0), return_logits: bool = False):
    """The reference: a Python loop that recomputes every row's full, cropped context
    with `model.apply` for every token (prompts of any lengths). Same sampling keys and
    window policy as `generate`, no stop sequence, and `generate`'s result: a list of
    (N,) int32 arrays, one per prompt, and with return_logits their (N, V) logits.

    Example:
        >>> from minitx_fn import ModelConfig
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=8)
        >>> ids, logits = generate_recompute(cfg.init(jax.random.key(0)), [[1, 2], [3]], model=cfg,
        ...                                  key=jax.random.key(1), max_new_tokens=3, return_logits=True)
        >>> [t.shape for t in ids], [v.shape for v in logits]
        ([(3,), (3,)], [(3, 5), (3, 5)])
    """
    max_new_tokens = decode.check_length(max_new_tokens)
    key = decode.check_key(key, sampler)
    packed = decode.pack(prompts, model)
    s, keep = model.max_len, slide_keep(model.max_len)
    contexts = [list(row[:n]) for row, n in zip(packed.window, packed.lengths)]
    keys = row_keys(key, len(contexts))
    ids, all_logits = [], []
    for n in range(max_new_tokens):
        window = np.zeros((len(contexts), s), np.int32)
        for row, context in enumerate(contexts):
            window[row, :len(context)] = context
        lengths = jnp.asarray([len(c) for c in contexts], jnp.int32)
        logits = decode.last_logits(params, jnp.asarray(window), lengths, model=model)     # (B, V)
        token = np.asarray(sample_rows(sampler, logits, keys, n))
        ids.append(token)
        all_logits.append(np.asarray(logits))
        for row, context in enumerate(contexts):
            context.append(int(token[row]))
            if len(context) > s:
                del context[:len(context) - (keep + 1)]
    tokens = list(np.stack(ids, axis=1).astype(np.int32))                      # B x (N,)
    return (tokens, list(np.stack(all_logits, axis=1))) if return_logits else tokens


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
    if bad and tokenizer.open_vocabulary:
        raise PromptError(f"{what} holds bytes that are not UTF-8 text ({', '.join(repr(c) for c in bad)}); give "
                          f"UTF-8 text")
    try:
        return tokenizer.encode(text)
    except Error as e:                           # the char tokenizer names the characters it lacks
        raise PromptError(f"{what}: {e}") from None


def complete(run_model, prompt: str, *, max_new_tokens: int = SAMPLE_TOKENS, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, key: jax.Array | None = None,
             stop: str | None = None, draft=None, draft_tokens: int | None = None, trust_code: bool = False) -> str:
    """The text that follows `prompt`: run_model is a run's directory (loaded with
    `trust_code` as a draft's is) or anything with .params, .model and .tokenizer
    (`checkpoint.load_model`'s Model, `job.train`'s result). The text is the decoded
    prompt and continuation, less the decoded prompt: what the ids say together (a
    tokenizer may decode a piece alone otherwise, e.g. strip its leading space). Greedy by default
    (and at temperature 0), which needs no key; with a temperature, top_k or top_p it
    samples with `key` (temperature 1 when only top_k or top_p is given). Stops after max_new_tokens, or after `stop`.
    With a draft (a smaller run of the same tokenizer and context: its directory, or
    the run loaded; `trust_code` for a directory whose model is code of its own),
    speculative decoding (`speculative.speculate`). PromptError for a prompt or
    stop string the tokenizer cannot take; ConfigError for a draft that cannot serve;
    MemoryBudgetError if the generation cannot fit in memory.

    Example:
        >>> from minitx_fn import ModelConfig, checkpoint
        >>> from minitx_fn.tokenizer import CharTokenizer
        >>> cfg = ModelConfig(vocab_size=3, d_model=8, n_heads=2, max_len=8)
        >>> m = checkpoint.Model(cfg.init(jax.random.key(0)), cfg, CharTokenizer("abc"), {})
        >>> len(complete(m, "ab", max_new_tokens=5))
        5
    """
    if isinstance(run_model, (str, os.PathLike)):
        run_model = checkpoint.load_model(run_model, trust_code=trust_code)
    params, model, tokenizer = run_model.params, run_model.model, run_model.tokenizer
    if temperature is None:
        temperature = 1.0 if (top_k is not None or top_p is not None) else 0.0
    # A model whose table is padded past the tokenizer (an imported Qwen2) draws only the tokenizer's ids.
    limit = tokenizer.vocab_size if tokenizer.vocab_size < model.vocab_size else None
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, id_limit=limit)
    ids = encode_prompt(tokenizer, prompt)
    stop_ids = () if stop is None else encode_prompt(tokenizer, stop, "the stop string")
    need = memory.generation_bytes(model, 1, max_new_tokens)
    if draft is None and draft_tokens is not None:
        raise ConfigError("{k} was given without a draft, the model that would propose them",
                          k=("draft_tokens", draft_tokens))
    if isinstance(draft, (str, os.PathLike)):
        draft = checkpoint.load_model(draft, trust_code=trust_code)
    if draft is not None:
        if not hasattr(draft, "tokenizer"):
            raise ConfigError(f"a draft for complete is a run: its directory or checkpoint.load_model(run), with a "
                              f"tokenizer; {type(draft).__name__} has none")
        if not same_ids(draft.tokenizer, tokenizer):
            raise ConfigError(f"the draft's tokenizer ({draft.tokenizer.kind}, {draft.tokenizer.vocab_size} tokens) is "
                              f"not the model's ({tokenizer.kind}, {tokenizer.vocab_size} tokens): a draft must "
                              f"share the model's tokenizer")
        need += memory.generation_bytes(draft.model, 1, max_new_tokens)
    memory.check(need, "this generation", "try a smaller {n}", n=("max_new_tokens", max_new_tokens))
    if draft is None:
        new = generate(params, [ids], model=model, key=key, max_new_tokens=max_new_tokens, sampler=sampler,
                       stop=stop_ids)[0]
    else:
        new = speculative.speculate(params, [ids], model=model, draft=draft, key=key, max_new_tokens=max_new_tokens,
                                    draft_tokens=DRAFT_TOKENS if draft_tokens is None else draft_tokens,
                                    sampler=sampler, stop=stop_ids).tokens[0]
    said, whole = tokenizer.decode(ids), tokenizer.decode(np.concatenate([ids, new]))
    text = whole[len(said):] if whole.startswith(said) else tokenizer.decode(new)
    # The loop stops on the stop string's own ids; a tokenizer that merges (bpe) may
    # write the same text with other ids, so the text is cut at its first occurrence.
    at = -1 if stop is None else text.find(stop)
    return text if at < 0 else text[:at + len(stop)]
