"""The language model: token ids (B, T) -> next-token logits (B, T, V).

    x      = Dropout(Embed(tokens) + PE(positions)) (B, T, D), dropout only in training
    x      = Block_L(... Block_1(x))                 (B, T, D), blocks run with lax.scan
    logits = Norm_f(x) W_head + b_head               (B, T, V), float32

PE is the fixed sinusoidal table, or with `positions="learned"` a trained (S, D)
table looked up by position; with `positions="rotary"` nothing is added and every
block's attention turns q and k by their positions instead (`layers/rotary.py`).
With `tie_embeddings` the head is the token table read backwards, logits =
Norm_f(x) E^T, with no bias (GPT-2 makes both choices). Norm is LayerNorm or
RMSNorm (`norm`), and the blocks' other choices (`mlp`, `n_kv_heads`, `bias`,
`qkv_bias`) are the config's too: GPT-2 and Llama are two configurations of this
one model (`defaults.ARCHS`).

Params:
    {"embed":  {"table": (V, D)},
     "pos":    {"table": (S, D)},          only with positions="learned"
     "blocks": one block's tree with every leaf stacked on a leading L axis,
     "ln_f":   {"scale": (D,), "bias": (D,)},     no bias with norm="rmsnorm"
     "head":   {"w": (D, V), "b": (V,)}}   only without tie_embeddings; no b without bias

Stacking the L blocks lets `jax.lax.scan` run them as one loop body, so the
compiled program (and its compile time) does not grow with depth.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn.config import ModelConfig
from minitx_fn.errors import ConfigError
from minitx_fn.layers import attention, block, dropout, embedding, linear, positional
from minitx_fn.layers.attention import KVCache

# ModelConfig.remat's choices (defaults.REMAT): what the backward pass may keep of a
# block's forward pass; everything else it recomputes (`jax.checkpoint`).
REMAT_POLICIES = {
    "none": jax.checkpoint_policies.everything_saveable,
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@functools.partial(jax.jit, static_argnames="config")
def init(key: jax.Array, config: ModelConfig) -> dict:
    """Fresh parameters for `config`; one subkey per consumer, one per block.

    Jitted: run eagerly, the few dozen random draws and the vmap over blocks would
    each compile on their own, which takes seconds even for a tiny model.

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=2)
        >>> init(jax.random.key(0), cfg)["blocks"]["attn"]["qkv"]["w"].shape     # (L, D, 3D)
        (2, 8, 24)
    """
    c = config
    require_dtypes(c)
    # Four keys whether or not "pos" and "head" exist, so each part's draw depends on
    # the key alone, not on the other options.
    k_embed, k_blocks, k_head, k_pos = jax.random.split(key, 4)
    block_keys = jax.random.split(k_blocks, c.n_layers)                    # (L,) keys
    # GPT-2: the projections that write into the residual stream start smaller, by
    # 1/sqrt(2 L), so the stream's variance does not grow with depth.
    out_std = c.init_std / math.sqrt(2 * c.n_layers)

    def init_block(k):
        return block.init(k, d_model=c.d_model, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, d_ff=c.d_ff,
                          std=c.init_std, out_std=out_std, dtype=c.storage_dtype, norm=c.norm, mlp=c.mlp,
                          bias=c.bias, qkv_bias=c.qkv_bias)

    params = {
        "embed": embedding.init(k_embed, vocab_size=c.vocab_size, d_model=c.d_model, std=c.embed_std,
                                dtype=c.storage_dtype),
        # vmap over the keys stacks every leaf of the block tree on a leading L axis.
        "blocks": jax.vmap(init_block)(block_keys),
        "ln_f": block.NORMS[c.norm].init(d_model=c.d_model, dtype=c.storage_dtype),
    }
    if c.positions == "learned":       # an embedding of the positions 0 .. S - 1
        params["pos"] = embedding.init(k_pos, vocab_size=c.max_len, d_model=c.d_model, std=c.init_std,
                                       dtype=c.storage_dtype)
    if not c.tie_embeddings:
        params["head"] = linear.init(k_head, d_in=c.d_model, d_out=c.vocab_size, std=c.init_std,
                                     dtype=c.storage_dtype, bias=c.bias)
    return params


def with_context(params: dict, max_len: int) -> dict:
    """The same model's parameters for a context of at most `max_len` (the source's or
    shorter): learned positions keep their first max_len rows; nothing else depends on it.

    Example:
        >>> with_context({"pos": {"table": jnp.zeros((16, 4))}}, 8)["pos"]["table"].shape
        (8, 4)
    """
    if "pos" not in params:
        return params
    return {**params, "pos": {"table": params["pos"]["table"][:max_len]}}


def require_dtypes(config: ModelConfig) -> None:
    """ConfigError if the config asks for float64 while 64-bit JAX is off: a config built
    inside `jax.enable_x64` and used outside it would otherwise run in float32 without a
    word (JAX truncates float64 requests with only a warning). Checked when a function
    that reads the config is traced.

    Example:
        >>> require_dtypes(ModelConfig(vocab_size=5))          # float32: nothing to check
    """
    from minitx_fn.config import x64_enabled
    for name in ("dtype", "param_dtype"):
        if getattr(config, name) == "float64" and not x64_enabled():
            raise ConfigError("{field} needs 64-bit JAX, which is off here: use the model inside the same "
                              "`with jax.enable_x64(True):` block that built its config, or turn 64-bit JAX on at "
                              "start-up (jax.config.update('jax_enable_x64', True), or JAX_ENABLE_X64=1)",
                              field=(name, "float64"))


def block_args(config: ModelConfig) -> dict:
    """The keyword arguments of `block.apply` that `config` sets: the one place the
    model's config becomes a layer's arguments.

    Example:
        >>> sorted(block_args(ModelConfig(vocab_size=10, d_model=8, n_heads=2)))  # doctest: +NORMALIZE_WHITESPACE
        ['attention_block', 'dropout_rate', 'dtype', 'eps', 'impl', 'mlp', 'n_heads', 'n_kv_heads', 'norm',
         'rope_scaling', 'rope_theta']
    """
    c = config
    return {**cached_block_args(c), "attention_block": c.attention_block, "dropout_rate": c.dropout}


def cached_block_args(config: ModelConfig) -> dict:
    """The keyword arguments of `block.apply_cached` that `config` sets (`block_args`
    adds training's). rope_theta is None unless the positions are rotary.

    Example:
        >>> cached_block_args(ModelConfig(vocab_size=10, d_model=8, n_heads=2, positions="rotary"))["rope_theta"]
        10000.0
    """
    c = config
    return {"n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "eps": c.ln_eps, "dtype": c.compute_dtype,
            "impl": c.attention, "norm": c.norm, "mlp": c.mlp,
            "rope_theta": c.rope_theta if c.positions == "rotary" else None, "rope_scaling": c.rope_scaling}


def param_shapes(params: dict) -> dict:
    """The parameter tree with every array replaced by its shape.

    Example:
        >>> param_shapes({'w': jnp.zeros((3, 4))})
        {'w': (3, 4)}
    """
    return jax.tree.map(lambda a: a.shape, params)


def count_params(params: dict) -> int:
    """Total number of scalars in the parameter tree.

    Example:
        >>> count_params({"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)})
        16
    """
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


def check_tokens(tokens, config: ModelConfig, *, max_len: int | None = None) -> None:
    """Raise ValueError or TypeError for token ids the model cannot take.

    Rank, dtype and length are checked at trace time. The values (0 <= id < V) can
    only be checked when the array is concrete: under `jit` they are abstract, and a
    JAX gather would silently clamp an out-of-range id, so check before jitting.

    Example:
        >>> check_tokens(jnp.array([[1, 12]]), ModelConfig(vocab_size=10))
        Traceback (most recent call last):
        ValueError: token ids must lie in [0, 10), found [12]
    """
    max_len = config.max_len if max_len is None else max_len
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (B, T), got shape {tuple(tokens.shape)} (rank {tokens.ndim})")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    b, t = tokens.shape
    if b < 1 or t < 1:
        raise ValueError(f"tokens must have at least one row and one position, got shape {(b, t)}")
    if t > max_len:
        raise ValueError(f"sequence length T={t} exceeds the context window max_len={max_len}; "
                         f"crop the input to its last {max_len} tokens")
    if not isinstance(tokens, jax.core.Tracer):
        ids = np.asarray(tokens)
        bad = ids[(ids < 0) | (ids >= config.vocab_size)]
        if bad.size:
            raise ValueError(f"token ids must lie in [0, {config.vocab_size}), "
                             f"found {sorted(set(bad.tolist()))[:10]}")


def _embed(params: dict, tokens: jax.Array, positions: jax.Array, c: ModelConfig) -> jax.Array:
    """(B, T) ids and (B|1, T) positions -> (B, T, D) in the residual dtype."""
    x = embedding.apply(params["embed"], tokens).astype(c.residual_dtype)         # (B, T, D)
    if c.positions == "rotary":                                                   # the blocks turn q and k instead
        return x
    if c.positions == "learned":
        # Past the table (only a speculative round's rejected tail gets there) the last
        # row, not take's NaN: a NaN key or value would reach every later query of its
        # slot through the zero attention weight that masks it (0 * NaN = NaN).
        positions = jnp.minimum(positions, params["pos"]["table"].shape[0] - 1)
        pe = embedding.apply(params["pos"], positions)                            # (B|1, T, D): row per position
    else:
        pe = positional.encode(positions, c.d_model, dtype=c.residual_dtype)      # (B|1, T, D)
    return x + pe.astype(c.residual_dtype)                                        # broadcasts over B


def _logits(params: dict, x: jax.Array, c: ModelConfig) -> jax.Array:
    """(B, T, D) -> (B, T, V) logits in at least float32, for a stable softmax and loss."""
    x = block.NORMS[c.norm].apply(params["ln_f"], x, eps=c.ln_eps)
    if c.tie_embeddings:
        return embedding.attend(params["embed"], x, dtype=c.compute_dtype).astype(c.residual_dtype)
    return linear.apply(params["head"], x, dtype=c.compute_dtype).astype(c.residual_dtype)


def apply(params: dict, tokens: jax.Array, *, config: ModelConfig, positions: jax.Array | None = None,
          mask: jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
    """tokens (B, T) int -> logits (B, T, V).

    positions: (B|1, T) int, default 0 .. T - 1. mask: bool broadcastable to
    (B, 1, T, T), True where query t may attend to key s; default causal.
    Logit t scores the token at t + 1 given tokens 0 .. t. key: dropout at
    config.dropout on the embeddings, the attention weights and both residual
    branches of every block (training); None, or a rate of 0, drops nothing.

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> p = init(jax.random.key(0), cfg)
        >>> apply(p, jnp.zeros((2, 5), jnp.int32), config=cfg).shape
        (2, 5, 5)
    """
    c = config
    require_dtypes(c)
    check_tokens(tokens, c)
    if positions is None:
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]  # (1, T)
    k_embed, k_blocks = (None, None) if key is None else jax.random.split(key)
    x = dropout.apply(_embed(params, tokens, positions, c), rate=c.dropout, key=k_embed)   # (B, T, D)
    block_keys = None if key is None else jax.random.split(k_blocks, c.n_layers)          # (L,): one per block

    def body(x, layer):                                                  # one block: (B, T, D) -> (B, T, D)
        block_params, block_key = layer
        return block.apply(block_params, x, mask=mask, key=block_key, positions=positions, **block_args(c)), None

    # What the backward pass keeps of each block's forward pass, and what it
    # recomputes (REMAT_POLICIES; ModelConfig.remat says why). prevent_cse=False: inside a scan the loop
    # already keeps XLA from merging the recomputation into the forward pass.
    body = jax.checkpoint(body, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (params["blocks"], block_keys))         # the L stacked blocks, in order
    return _logits(params, x, c)                                         # (B, T, V)


@functools.lru_cache(maxsize=None)
def apply_fn(config: ModelConfig):
    """`apply` for `config` as a function (params, tokens) -> logits, the form evaluation
    and generation take any model in: one function object per config, so what is jitted
    with it as a static argument compiles once per config, not once per call.

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> f = apply_fn(cfg)
        >>> f is apply_fn(ModelConfig(vocab_size=5, d_model=8, n_heads=2)), f(init(jax.random.key(0), cfg),
        ...     jnp.zeros((1, 3), jnp.int32)).shape
        (True, (1, 3, 5))
    """
    return functools.partial(apply, config=config)


def attention_maps(params: dict, tokens: jax.Array, *, config: ModelConfig) -> jax.Array:
    """tokens (B, T) -> attention weights (L, B, H, T, T) of every layer and head.

    Row t of a map is the distribution query t puts over keys 0 .. t. Computed
    alongside the ordinary forward pass, for pictures and tests, not for speed.

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> attention_maps(init(jax.random.key(0), cfg), jnp.zeros((1, 5), jnp.int32), config=cfg).shape
        (2, 1, 2, 5, 5)
    """
    c = config
    check_tokens(tokens, c)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]                      # (1, T)
    x = _embed(params, tokens, positions, c)                                                # (B, T, D)
    args = block_args(c)

    def body(x, block_params):
        h = block.NORMS[c.norm].apply(block_params["ln1"], x, eps=c.ln_eps)
        q, k, _ = attention.project_qkv(block_params["attn"], h, c.n_heads, c.compute_dtype, n_kv_heads=c.n_kv_heads,
                                        positions=positions, rope_theta=args["rope_theta"],
                                        rope_scaling=args["rope_scaling"])
        weights = attention.attention_weights(q, k, attention.causal_mask(tokens.shape[1])[None, None])
        return block.apply(block_params, x, positions=positions, **args), weights        # (B, H, T, T)

    return jax.lax.scan(body, x, params["blocks"])[1]


def init_cache(config: ModelConfig, batch: int, slots: int | None = None) -> tuple[KVCache, ...]:
    """An empty cache: one `KVCache` per layer, k and v of shape (B, S, G, K) with
    S = slots (default max_len), G = n_kv_heads.

    Example:
        >>> cache = init_cache(ModelConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=3, max_len=16), 4)
        >>> len(cache), cache[0].k.shape
        (3, (4, 16, 2, 4))
    """
    c = config
    shape = (batch, slots or c.max_len, c.n_kv_heads, c.head_dim)
    return tuple(KVCache(k=jnp.zeros(shape, c.compute_dtype), v=jnp.zeros(shape, c.compute_dtype))
                 for _ in range(c.n_layers))


def unstack_blocks(params: dict) -> dict:
    """params with "blocks" as a tuple of L per-layer dicts instead of (L, ...) stacks.

    Training keeps the blocks stacked for one `lax.scan`; the cached decoder runs its
    layers one after another and reads this form faster: on XLA:CPU a layer's slice of
    a stacked weight, taken inside the decode loop, is copied for every token
    (benchmarks/NOTES.md). Call it once, outside the loop (`generate` does).

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=3)
        >>> blocks = unstack_blocks(init(jax.random.key(0), cfg))["blocks"]
        >>> len(blocks), blocks[2]["attn"]["qkv"]["w"].shape
        (3, (8, 24))
    """
    blocks = params["blocks"]
    if not isinstance(blocks, dict):                                   # already one dict per layer
        return params
    n = jax.tree.leaves(blocks)[0].shape[0]
    return {**params, "blocks": tuple(jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(n))}


def apply_cached(params: dict, tokens: jax.Array, cache: tuple[KVCache, ...], *, config: ModelConfig,
                 index: jax.Array) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """tokens (B, T) of row b written at cache slots index[b] .. index[b] + T - 1 -> logits (B, T, V), new cache.

    index: (B,) int. Row b's token in slot s is at position s of its own sequence,
    and slots 0 .. index[b] - 1 hold that row's earlier tokens, so the positions and
    the causal mask over the S slots follow from `index` alone: query t of row b
    reads slots 0 .. index[b] + t. Keep index[b] + T <= S, the cache's slots: under
    jit nothing can check it, and a write past the end is lost. For right-padded rows
    of lengths len_b, row b's next-token logits are logits[b, len_b - 1], and its next
    token goes in at index len_b. params' blocks may be stacked or unstacked
    (`unstack_blocks`, faster inside a decode loop).

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=8)
        >>> p, tokens = init(jax.random.key(0), cfg), jnp.array([[1, 2, 3]])
        >>> logits, cache = apply_cached(p, tokens, init_cache(cfg, 1), config=cfg, index=jnp.zeros(1, jnp.int32))
        >>> bool(jnp.allclose(logits, apply(p, tokens, config=cfg), atol=1e-5))   # same as without a cache
        True
    """
    c = config
    require_dtypes(c)
    check_tokens(tokens, c)
    blocks = unstack_blocks(params)["blocks"]
    if len(blocks) != len(cache):
        raise ValueError(f"the parameters hold {len(blocks)} blocks and the cache {len(cache)} layers")
    t, s = tokens.shape[1], cache[0].k.shape[1]
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (tokens.shape[0],))         # an int serves every row
    positions = index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]                   # (B, T)
    mask = (jnp.arange(s, dtype=jnp.int32)[None, None, :] <= positions[:, :, None])[:, None]   # (B, 1, T, S)
    x = _embed(params, tokens, positions, c)                                                # (B, T, D)
    # The layers one after another (unrolled), each with its own weights and cache
    # arrays: no (L, ...) stack is sliced, so nothing is copied per token, and each
    # layer's cache is updated in place.
    new_cache = []
    for block_params, layer_cache in zip(blocks, cache):
        x, layer_cache = block.apply_cached(block_params, x, layer_cache, index=index, mask=mask,
                                            **cached_block_args(c))
        new_cache.append(layer_cache)
    return _logits(params, x, c), tuple(new_cache)


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits (B, T, V), targets (B, T) -> (B, T): -log softmax(logits)[target] per position.

    log_softmax and a gather of the target's entry: no (B, T, V) one-hot.

    Example:
        >>> token_losses(jnp.zeros((1, 2, 4)), jnp.array([[2, 0]])).shape
        (1, 2)
    """
    logp = jax.nn.log_softmax(logits, axis=-1)                           # (B, T, V)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over (B, T) of -log softmax(logits)[target].

    Example:
        >>> float(cross_entropy(jnp.zeros((1, 1, 4)), jnp.array([[2]])))  # uniform: log 4
        1.3862943649291992
    """
    return token_losses(logits, targets).mean()


def loss(params: dict, tokens: jax.Array, targets: jax.Array, *, config: ModelConfig,
         key: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy: tokens (B, T), targets (B, T) = tokens shifted by one.
    key: dropout, as in `apply`.

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> x = jnp.array([[1, 2, 3]])
        >>> float(loss(init(jax.random.key(0), cfg), x, x, config=cfg)) > 0
        True
    """
    return cross_entropy(apply(params, tokens, config=config, key=key), targets)


__all__ = ["KVCache", "REMAT_POLICIES", "apply", "apply_cached", "apply_fn", "attention_maps", "block_args", "cached_block_args", "check_tokens", "count_params",
           "cross_entropy", "init", "init_cache", "loss", "param_shapes", "require_dtypes", "token_losses",
           "unstack_blocks",
           "with_context"]
