"""Generation: prefill the prompt once, then decode from a fixed-size KV cache inside
one compiled `lax.while_loop`.

Layout. The batch shares one window of S = max_len cache slots. Prompts are
left-padded to the longest one, of length P0, so every row's prompt ends at slot
P0 - 1 and decoding writes slot P0 next. Row b has pad[b] padding slots; its token
in slot s has position s - pad[b], and its queries never look at slots below
pad[b]. The prefill runs over P >= P0 slots, P0 rounded up to a bucket (a power
of two, at least 8, at most S), so a new prompt length rarely means a new
compilation; slots P0 .. P - 1 hold filler that no query sees before decoding
overwrites it.

Each loop iteration:
    1. token = sampler(last_logits, fold_in(key, n))        (B,)
    2. if all S slots are used, slide the window (below)
    3. write token at slot `index`; run the model on that one token, reading the
       cache, to get the next logits; index += 1

Longer than the window. When all S slots are used, every row keeps the tokens of
its last S // 2 slots, which are prefilled again from position 0 into a fresh
cache, and decoding continues. In terms of one sequence: whenever its context
would exceed S tokens, it is cut to its last S // 2 + 1 tokens. Re-encoding
restarts positions at 0, which the cache cannot do in place; halving the window
makes this happen once every S // 2 tokens, not every token.
`generate_recompute` implements the same policy by recomputing the whole context
for every token: the tests prove both give the same tokens and logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn import model
from minitx_fn.config import ModelConfig
from minitx_fn.layers.attention import causal_mask
from minitx_fn.sampling import Sampler


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


def _prefill(params, window, pad, length: int, config: ModelConfig):
    """Run slots 0 .. length - 1 of window (B, S) into a fresh cache.

    Returns the logits of those slots (B, length, V) and the cache (L, B, S, H, K)."""
    b, s = window.shape
    positions = jnp.maximum(jnp.arange(length)[None, :] - pad[:, None], 0)              # (B, P)
    mask = causal_mask(length, s)[None, None] & (jnp.arange(s)[None, :] >= pad[:, None])[:, None, None, :]
    logits, cache = model.apply_cached(params, window[:, :length], model.init_cache(config, b), config=config,
                                       index=0, positions=positions, mask=mask)         # (B, P, V)
    return logits, cache


@functools.partial(jax.jit, static_argnames=("config", "sampler", "prompt_len", "max_new_tokens", "stop"))
def _decode(params, window, pad, start, key, *, config: ModelConfig, sampler: Sampler, prompt_len: int,
            max_new_tokens: int, stop: tuple[int, ...]):
    """window (B, S) with prompts in slots 0 .. start - 1, left-padded by pad (B,);
    prompt_len >= start is the static prefill length (the bucket).

    Returns generated ids (B, N), the logits each was sampled from (B, N, V), and the
    number of tokens generated per row (B,), which ends after a stop sequence."""
    b, s = window.shape
    n_new, keep = max_new_tokens, slide_keep(s)
    prompt_logits, cache = _prefill(params, window, pad, prompt_len, config)           # (B, P, V)
    last_logits = jax.lax.dynamic_index_in_dim(prompt_logits, start - 1, axis=1, keepdims=False)

    def slide(window, pad, cache):
        # Shift every row left by S - keep slots; the freed slots become padding.
        window = jnp.concatenate([window[:, s - keep:], jnp.zeros((b, s - keep), window.dtype)], axis=1)
        pad = jnp.maximum(pad - (s - keep), 0)
        if keep == 0:
            return window, pad, model.init_cache(config, b)
        return window, pad, _prefill(params, window, pad, keep, config)[1]   # logits unused

    def body(carry):
        n, index, window, pad, cache, last_logits, out, out_logits, done, length = carry
        token = sampler(last_logits, jax.random.fold_in(key, n))                        # (B,)
        out = out.at[:, n].set(token)
        out_logits = out_logits.at[:, n].set(last_logits)
        length = jnp.where(done, length, n + 1)
        if stop:
            k = len(stop)
            tail = jax.lax.dynamic_slice_in_dim(jnp.pad(out, ((0, 0), (k, 0))), n + 1, k, axis=1)  # last k ids
            matched = jnp.all(tail == jnp.asarray(stop, out.dtype)[None, :], axis=1) & (n + 1 >= k)
            done = done | matched
        window, pad, cache = jax.lax.cond(index == s, slide, lambda w, p, c: (w, p, c), window, pad, cache)
        index = jnp.where(index == s, keep, index)
        window = window.at[:, index].set(token)
        positions = (index - pad)[:, None]                                               # (B, 1)
        slots = jnp.arange(s)[None, :]
        mask = ((slots <= index) & (slots >= pad[:, None]))[:, None, None, :]           # (B, 1, 1, S)
        logits, cache = model.apply_cached(params, token[:, None], cache, config=config, index=index,
                                           positions=positions, mask=mask)
        return n + 1, index + 1, window, pad, cache, logits[:, 0], out, out_logits, done, length

    def cond(carry):
        n, done = carry[0], carry[8]
        return (n < n_new) & ~jnp.all(done)

    v = config.vocab_size
    carry = (jnp.int32(0), start.astype(jnp.int32), window, pad, cache, last_logits,
             jnp.zeros((b, n_new), jnp.int32), jnp.zeros((b, n_new, v), last_logits.dtype),
             jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[6], carry[7], carry[9]


def _check_prompts(prompts, config: ModelConfig) -> list[np.ndarray]:
    if not len(prompts):
        raise ValueError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        p = np.asarray(p, np.int32).reshape(-1)
        if p.size == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        if p.min() < 0 or p.max() >= config.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {config.vocab_size})")
        out.append(p[-config.max_len:])                    # longer prompts: their last S tokens
    return out


def generate(params, prompts, *, config: ModelConfig, key: jax.Array, max_new_tokens: int,
             sampler: Sampler = Sampler(temperature=0.0), stop: tuple[int, ...] = (),
             return_logits: bool = False):
    """Continue each prompt (a sequence of token ids) by up to max_new_tokens tokens.

    Returns a list of (n_b,) int32 arrays, one per prompt: the new tokens, ending
    after `stop` if it was generated. With return_logits, also the (n_b, V) logits
    each token was sampled from.

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=8)
        >>> p = model.init(jax.random.key(0), cfg)
        >>> [t.shape for t in generate(p, [[1, 2], [3]], config=cfg, key=jax.random.key(1), max_new_tokens=4)]
        [(4,), (4,)]
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    prompts = _check_prompts(prompts, config)
    start = max(len(p) for p in prompts)                                                 # P0
    window = np.zeros((len(prompts), config.max_len), np.int32)                        # (B, S)
    pad = np.array([start - len(p) for p in prompts], np.int32)                         # (B,)
    for row, p in enumerate(prompts):
        window[row, start - len(p):start] = p
    ids, logits, lengths = _decode(params, jnp.asarray(window), jnp.asarray(pad), jnp.int32(start), key,
                                   config=config, sampler=sampler,
                                   prompt_len=bucket_length(start, config.max_len), max_new_tokens=max_new_tokens,
                                   stop=tuple(int(t) for t in stop))
    ids, logits, lengths = jax.device_get((ids, logits, lengths))
    tokens = [ids[b, :lengths[b]] for b in range(len(prompts))]
    if return_logits:
        return tokens, [logits[b, :lengths[b]] for b in range(len(prompts))]
    return tokens


@functools.partial(jax.jit, static_argnames="config")
def _last_logits(params, window, length, *, config: ModelConfig):
    """window (B, S) right-padded, length () -> logits at slot length - 1 (B, V).

    A fixed shape, so the recompute loop compiles once; causal masking makes the
    padding after `length` invisible to the slots before it."""
    logits = model.apply(params, window, config=config)                                 # (B, S, V)
    return jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)


def generate_recompute(params, prompt, *, config: ModelConfig, key: jax.Array, max_new_tokens: int,
                       sampler: Sampler = Sampler(temperature=0.0)):
    """The reference: a Python loop that recomputes the full, cropped context for every
    token (prompts (B, P) of equal length). Same sampling keys and window policy
    as `generate`. Returns ids (B, N) and logits (B, N, V) as numpy arrays.

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=8)
        >>> ids, logits = generate_recompute(model.init(jax.random.key(0), cfg), [[1, 2]], config=cfg,
        ...                                  key=jax.random.key(1), max_new_tokens=3)
        >>> ids.shape, logits.shape
        ((1, 3), (1, 3, 5))
    """
    s, keep = config.max_len, slide_keep(config.max_len)
    context = np.asarray(prompt, np.int32)[:, -s:]                                      # (B, <= S)
    ids, all_logits = [], []
    for n in range(max_new_tokens):
        window = np.zeros((context.shape[0], s), np.int32)
        window[:, :context.shape[1]] = context
        logits = _last_logits(params, jnp.asarray(window), context.shape[1], config=config)
        token = np.asarray(sampler(logits, jax.random.fold_in(key, n)))
        ids.append(token)
        all_logits.append(np.asarray(logits))
        context = np.concatenate([context, token[:, None]], axis=1)
        if context.shape[1] > s:
            context = context[:, -(keep + 1):]
    return np.stack(ids, axis=1), np.stack(all_logits, axis=1)
