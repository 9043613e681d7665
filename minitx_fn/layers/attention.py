"""Multi-head causal self-attention, and the same layer reading from a KV cache.

For queries Q (T, K), keys K_ (S, K) and values V_ (S, K) of one head:

    Attention(Q, K_, V_) = softmax(Q K_^T / sqrt(K) + M) V_

where M is 0 where a query may look at a key and -inf elsewhere (causal: query t
sees keys 0 .. t). H heads run side by side on D = H * K features, and a final
projection mixes them. Self-attention under the causal mask runs in blocks of query
rows (`causal_blockwise`): a block never computes the scores of keys that all its
rows must ignore.

Grouped-query attention (Ainslie et al., 2023): G key/value heads, G dividing H,
each serving a group of R = H / G consecutive query heads (query head h reads
key/value head h // R). G = H is multi-head attention, G = 1 multi-query. Keys and
values are never copied per query head: the scores are one einsum over the groups.

With rotary positions (`rope_theta`), q and k are turned by their positions
(`rotary.py`) after the projection, before the scores and before the cache.

Params: {"qkv": linear (D, (H + 2G) K), "out": linear (D, D)}. The query, key and
value projections are fused into one matrix, laid out [Q | K | V] (H K, G K and G K
columns) with heads contiguous inside each block (feature h * K + k is head h,
feature k): one matmul instead of three. Biases are optional (`bias`, `qkv_bias`).

KV cache layout (the one place it is defined): `KVCache(k, v)` holds one layer's keys
and values, k and v of shape (B, S, G, K) in the compute dtype; a model's cache is a
tuple of L of them (`model.init_cache`), one array per layer rather than one
(L, ...) stack, because on XLA:CPU reading one layer's slice of a stack inside the
decode loop copies it for every token (benchmarks/NOTES.md). Grouped-query attention
caches G heads, not H. Each row has its own slots: slot s of row b holds the key and
value of that row's token at position s, so rows of a batch fill and slide their
windows independently (`minitx_fn.generate`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from minitx_fn import defaults
from minitx_fn.specs import AttentionSpec
from minitx_fn.layers import dropout, linear, rotary
from minitx_fn.layers.dtypes import at_least_float32, compute_dtype

IMPLS = defaults.ATTENTION_IMPLS        # "einsum" (the maths written out) or "dot_product_attention"


class KVCache(NamedTuple):
    """One layer's keys and values of the tokens written so far; see the module docstring for the layout."""

    k: jax.Array  # (B, S, G, K)
    v: jax.Array  # (B, S, G, K)


# ----------------------------------------------------------------------------- maths


def split_heads(x: jax.Array, n_heads: int) -> jax.Array:
    """(B, T, D) -> (B, T, H, K) with K = D / H.

    Example:
        >>> split_heads(jnp.zeros((2, 5, 12)), 3).shape
        (2, 5, 3, 4)
    """
    *lead, d = x.shape
    return x.reshape(*lead, n_heads, d // n_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """(B, T, H, K) -> (B, T, D): the inverse of `split_heads`.

    Example:
        >>> merge_heads(jnp.zeros((2, 5, 3, 4))).shape
        (2, 5, 12)
    """
    *lead, h, k = x.shape
    return x.reshape(*lead, h * k)


def causal_mask(t: int, s: int | None = None, *, offset: int = 0) -> jax.Array:
    """(T, S) bool, True where query t may attend to key s, that is s <= t + offset.

    `offset` is the cache index of the first query: with T queries written at slots
    offset .. offset + T - 1 of an S-slot cache, query t sits at slot t + offset.

    Example:
        >>> causal_mask(3).astype(int)
        Array([[1, 0, 0],
               [1, 1, 0],
               [1, 1, 1]], dtype=int32)
    """
    s = t if s is None else s
    # int32 throughout, so the comparison is int32 vs int32 with jax_enable_x64 on too.
    return jnp.arange(s, dtype=jnp.int32)[None, :] <= jnp.arange(t, dtype=jnp.int32)[:, None] + offset


def _grouped(q: jax.Array, groups: int) -> jax.Array:
    """q (B, T, H, K) -> (B, T, G, R, K): query head h = g R + r is head r of group g."""
    b, t, h, k = q.shape
    return q.reshape(b, t, groups, h // groups, k)


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None, score_bias: jax.Array | None = None
                      ) -> jax.Array:
    """q (B, T, H, K), k (B, S, G, K), mask broadcastable to (B, H, T, S) -> (B, H, T, S).

    softmax over S of q.k / sqrt(K) + score_bias, query head h against key head h // (H / G),
    with masked scores set to the lowest finite float before the softmax. `score_bias`,
    broadcastable to (B, H, T, S), is added to the scores (a relative-position bias:
    ALiBi, T5); None adds nothing. Scores and
    softmax are in at least float32: with bfloat16 scores, exp() of differences loses
    most of its digits. A row whose every key is masked (a padding query) comes out
    uniform instead of NaN.

    Example:
        >>> q = jnp.ones((1, 3, 1, 2))
        >>> attention_weights(q, q, causal_mask(3)[None, None])[0, 0]  # equal scores: uniform over the past
        Array([[1.        , 0.        , 0.        ],
               [0.5       , 0.5       , 0.        ],
               [0.33333334, 0.33333334, 0.33333334]], dtype=float32)
    """
    work = at_least_float32(q.dtype)
    scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], work))
    b, t, h, _ = q.shape
    if k.shape[2] == h:                                                     # multi-head: one key head per query head
        scores = jnp.einsum("BTHK,BSHK->BHTS", q, k, preferred_element_type=work) * scale
    else:
        scores = jnp.einsum("BTGRK,BSGK->BGRTS", _grouped(q, k.shape[2]), k, preferred_element_type=work) * scale
        scores = scores.reshape(b, h, t, k.shape[1])                        # (B, H, T, S)
    if score_bias is not None:
        scores = scores + score_bias.astype(work)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(work).min)
    return jax.nn.softmax(scores, axis=-1)


def scaled_dot_product(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                       impl: str = "einsum", dropout_rate: float = 0.0, key: jax.Array | None = None,
                       score_bias: jax.Array | None = None) -> jax.Array:
    """q (B, T, H, K), k and v (B, S, G, K), mask (B|1, 1, T, S) bool -> (B, T, H, K);
    `score_bias` (broadcastable to (B, H, T, S)) added to the scores, as in `attention_weights`.

    impl="einsum" writes the maths out; impl="dot_product_attention" calls
    `jax.nn.dot_product_attention` (grouped heads too), which XLA (or cuDNN on a GPU)
    may fuse. Both are tested equal. With a key, the attention weights are dropped at
    dropout_rate (einsum only: `jax.nn.dot_product_attention` has no dropout).

    Example:
        >>> q = jnp.ones((2, 4, 3, 8))
        >>> scaled_dot_product(q, q, q, causal_mask(4)[None, None]).shape
        (2, 4, 3, 8)
    """
    if impl == "einsum":
        weights = attention_weights(q, k, mask, score_bias)                       # (B, H, T, S)
        weights = dropout.apply(weights, rate=dropout_rate, key=key).astype(v.dtype)
        b, h, t, s = weights.shape
        g = k.shape[2]
        if g == h:
            return jnp.einsum("BHTS,BSHK->BTHK", weights, v)                # (B, T, H, K)
        y = jnp.einsum("BGRTS,BSGK->BTGRK", weights.reshape(b, g, h // g, t, s), v)
        return y.reshape(q.shape)                                           # (B, T, H, K)
    if key is not None and dropout_rate:
        raise ValueError("attention dropout needs impl='einsum'")
    if impl == "dot_product_attention":
        # jax.nn.dot_product_attention mixes a float32 constant into float64 inputs,
        # which strict dtype promotion rejects; its result dtype is q's either way.
        with jax.numpy_dtype_promotion("standard"):
            return jax.nn.dot_product_attention(q, k, v, mask=mask, bias=None if score_bias is None else jnp.broadcast_to(
                score_bias, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])).astype(q.dtype))
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {list(IMPLS)}")


def query_blocks(t: int, block: int) -> list[tuple[int, int]]:
    """[start, stop) spans of at most `block` query rows covering 0 .. t - 1 (one span if block is 0).

    Example:
        >>> query_blocks(5, 2), query_blocks(5, 0)
        ([(0, 2), (2, 4), (4, 5)], [(0, 5)])
    """
    step = block or t
    return [(a, min(a + step, t)) for a in range(0, t, step)]


def causal_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, *, block: int, impl: str = "einsum",
                     dropout_rate: float = 0.0, key: jax.Array | None = None) -> jax.Array:
    """Causal self-attention one block of query rows at a time: q, k, v (B, T, H, K) -> (B, T, H, K).

    Under the causal mask, queries [a, b) may only look at keys [0, b): their scores
    against keys [b, T) are all masked, and a masked score gets a softmax weight of
    exactly zero (exp(lowest float - row max) underflows to 0), so those blocks are
    never computed. With T/c blocks of c
    rows that is T(T + c)/2 scores instead of T^2 (at T = 256, c = 128: 3/4), and
    every block's (B, H, c, b) scores are small enough to stay in cache. Each block
    is `scaled_dot_product` on its own rows, so the result equals the one-block
    formula up to float rounding (tested).

    Example:
        >>> q = jax.random.normal(jax.random.key(0), (1, 6, 2, 4))
        >>> whole = scaled_dot_product(q, q, q, causal_mask(6)[None, None])
        >>> bool(jnp.allclose(causal_blockwise(q, q, q, block=4), whole, atol=1e-6))
        True
    """
    t = q.shape[1]
    mask = causal_mask(t)[None, None]                                       # (1, 1, T, T)
    rows = [scaled_dot_product(q[:, a:b], k[:, :b], v[:, :b], mask[..., a:b, :b], impl=impl,
                               dropout_rate=dropout_rate, key=None if key is None else jax.random.fold_in(key, i))
            for i, (a, b) in enumerate(query_blocks(t, block))]            # each (B, b - a, H, K)
    return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=1)


# ----------------------------------------------------------------------------- layer


def init(key: jax.Array, spec: AttentionSpec, *, d_model: int, std: float = 0.02, out_std: float | None = None,
         dtype=jnp.float32) -> dict:
    """Fused QKV projection (D, (H + 2G) K) and output projection (D, D), with biases as
    `spec` says (`bias`, `qkv_bias`); Normal(0, std^2) weights, out_std for the output.

    Example:
        >>> p = init(jax.random.key(0), AttentionSpec(n_heads=2), d_model=8)
        >>> p["qkv"]["w"].shape, p["out"]["w"].shape
        ((8, 24), (8, 8))
        >>> init(jax.random.key(0), AttentionSpec(n_heads=4, n_kv_heads=1), d_model=8)["qkv"]["w"].shape   # H K + 2 K
        (8, 12)
    """
    if d_model % spec.n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={spec.n_heads}")
    k_qkv, k_out = jax.random.split(key)
    width = (spec.n_heads + 2 * spec.n_kv_heads) * (d_model // spec.n_heads)
    return {
        "qkv": linear.init(k_qkv, d_in=d_model, d_out=width, std=std, dtype=dtype, bias=spec.qkv_bias),
        "out": linear.init(k_out, d_in=d_model, d_out=d_model, std=out_std or std, dtype=dtype, bias=spec.bias),
    }


def project_qkv(params: dict, x: jax.Array, spec: AttentionSpec, *, positions: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, T, D) -> q (B, T, H, K), k and v (B, T, G, K). With rotary positions
    (spec.rope_theta), q and k are turned by `positions` (B|1, T) (default 0 .. T - 1)
    at the frequencies spec.rope_scaling stretches (`rotary.apply`).

    Example:
        >>> spec = AttentionSpec(n_heads=2)
        >>> p = init(jax.random.key(0), spec, d_model=8)
        >>> [a.shape for a in project_qkv(p, jnp.ones((1, 5, 8)), spec)]
        [(1, 5, 2, 4), (1, 5, 2, 4), (1, 5, 2, 4)]
    """
    h, g = spec.n_heads, spec.n_kv_heads
    k_width = x.shape[-1] // h
    columns = linear.d_out(params["qkv"])
    if columns != (h + 2 * g) * k_width:                        # the layout says what G the weights were made for
        held = (columns // k_width - h) / 2
        raise ValueError(f"the qkv weights have {columns} columns, (H + 2G) K with H={h} and K={k_width} for "
                         f"n_kv_heads={g}" + (f"; they were made for n_kv_heads={int(held)}: pass that"
                                              if held == int(held) and held >= 1 else ""))
    qkv = linear.apply(params["qkv"], x, dtype=compute_dtype(spec.dtype))       # (B, T, (H + 2G) K)
    q, k, v = jnp.split(qkv, [h * k_width, (h + g) * k_width], axis=-1)
    q, k, v = split_heads(q, h), split_heads(k, g), split_heads(v, g)
    if spec.rope_theta is not None:
        if positions is None:
            positions = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]    # (1, T)
        q, k = (rotary.apply(a, positions, rope_theta=spec.rope_theta, scaling=spec.rope_scaling) for a in (q, k))
    return q, k, v


def project_out(params: dict, y: jax.Array, spec: AttentionSpec) -> jax.Array:
    """The heads' outputs y (B, T, H, K) -> (B, T, D): merged, then the output projection.

    Example:
        >>> spec = AttentionSpec(n_heads=2)
        >>> project_out(init(jax.random.key(0), spec, d_model=8), jnp.ones((1, 3, 2, 4)), spec).shape
        (1, 3, 8)
    """
    return linear.apply(params["out"], merge_heads(y), dtype=compute_dtype(spec.dtype))


def apply(params: dict, x: jax.Array, spec: AttentionSpec, *, positions: jax.Array | None = None,
          mask: jax.Array | None = None, key: jax.Array | None = None, score_bias: jax.Array | None = None) -> jax.Array:
    """(B, T, D) -> (B, T, D): self-attention of x over itself.

    mask: bool, broadcastable to (B, 1, T, T), True where a query may attend to a key;
    None means causal, computed in query blocks of spec.query_block rows (0: one
    block; see `causal_blockwise`). With a key, attention weights are dropped at
    spec.dropout. positions as in `project_qkv`: they matter only with rotary
    positions; learned or sinusoidal positions are already in x. score_bias (broadcastable
    to (B, H, T, T)) is added to the scores (ALiBi, relative-position biases).

    Example:
        >>> spec = AttentionSpec(n_heads=2)
        >>> apply(init(jax.random.key(0), spec, d_model=8), jnp.ones((3, 5, 8)), spec).shape
        (3, 5, 8)
    """
    q, k, v = project_qkv(params, x, spec, positions=positions)
    if mask is None and score_bias is None:
        y = causal_blockwise(q, k, v, block=spec.query_block, impl=spec.impl, dropout_rate=spec.dropout,
                             key=key)                                   # (B, T, H, K)
    else:
        mask = causal_mask(x.shape[1])[None, None] if mask is None else mask
        y = scaled_dot_product(q, k, v, mask, impl=spec.impl, dropout_rate=spec.dropout, key=key,
                               score_bias=score_bias)                               # (B, T, H, K)
    return project_out(params, y, spec)                                 # (B, T, D)


def init_cache(spec: AttentionSpec, batch: int, slots: int, *, head_dim: int, dtype=jnp.float32) -> KVCache:
    """One layer's empty cache: k and v zeros of shape (B, S, G, K), S = slots.

    Example:
        >>> init_cache(AttentionSpec(n_heads=4, n_kv_heads=2), 3, 16, head_dim=8).k.shape
        (3, 16, 2, 8)
    """
    shape = (batch, slots, spec.n_kv_heads, head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def write_kv(cache: KVCache, index: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
    """Write k, v (B, T, G, K) into slots index[b] .. index[b] + T - 1 of row b.

    cache (B, S, G, K); index (B,) int. A scatter into the cache it was given:
    inside a loop whose carry holds the cache, XLA updates it in place, so a decode
    step writes T slots, not a fresh copy of the cache.

    Example:
        >>> cache = KVCache(jnp.zeros((2, 4, 1, 1)), jnp.zeros((2, 4, 1, 1)))   # B=2, S=4
        >>> new = jnp.ones((2, 1, 1, 1))
        >>> write_kv(cache, jnp.array([0, 2], jnp.int32), new, new).k[:, :, 0, 0]
        Array([[1., 0., 0., 0.],
               [0., 0., 1., 0.]], dtype=float32)
    """
    b, t = k.shape[:2]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]                             # (B, 1)
    slots = index.astype(jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]   # (B, T)
    return KVCache(k=cache.k.at[rows, slots].set(k.astype(cache.k.dtype)),
                   v=cache.v.at[rows, slots].set(v.astype(cache.v.dtype)))


def apply_cached(params: dict, x: jax.Array, cache: KVCache, spec: AttentionSpec, *, index: jax.Array,
                 mask: jax.Array, score_bias: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """x (B, T, D) of row b written at slots index[b] .. index[b] + T - 1 of the cache; attend over all S slots.

    Prefill is T = prompt length at index 0; a decode step is T = 1. The cache keeps
    its shape (B, S, G, K) for every call, so the compiled step never changes.
    A token in slot s is at position s of its row, so rotary positions are index[b] + t.

    mask: bool (B, 1, T, S), True where query t may read slot s: the caller masks
    slots not yet written and the future; score_bias (broadcastable to (B, H, T, S)) is
    added to the scores, as in `apply`.
    Returns y (B, T, D) and the updated cache.

    Example:
        >>> spec = AttentionSpec(n_heads=2)
        >>> p = init(jax.random.key(0), spec, d_model=8)
        >>> cache = init_cache(spec, 1, 6, head_dim=4)                          # B = 1, S = 6
        >>> y, cache = apply_cached(p, jnp.ones((1, 2, 8)), cache, spec, index=jnp.zeros(1, jnp.int32),
        ...                         mask=causal_mask(2, 6)[None, None])
        >>> y.shape, bool(cache.k[0, 2:].any())   # slots 2.. still empty
        ((1, 2, 8), False)
    """
    positions = index.astype(jnp.int32)[:, None] + jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]   # (B, T)
    q, k, v = project_qkv(params, x, spec, positions=positions)              # (B, T, H|G, K)
    cache = write_kv(cache, index, k, v)
    y = scaled_dot_product(q, cache.k, cache.v, mask, impl=spec.impl, score_bias=score_bias)   # (B, T, H, K)
    return project_out(params, y, spec), cache
