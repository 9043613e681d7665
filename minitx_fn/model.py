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
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn.checks import x64_enabled
from minitx_fn.errors import ConfigError
from minitx_fn.layers import attention, block, dropout, embedding, linear, positional

if TYPE_CHECKING:
    from minitx_fn.config import ModelConfig

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
    """Fresh parameters for `config`; one subkey per consumer, one per block
    (`config.init_block`, stacked on a leading L axis by vmap).

    Jitted: run eagerly, the few dozen random draws and the vmap over blocks would
    each compile on their own, which takes seconds even for a tiny model.

    Example:
        >>> from minitx_fn.config import ModelConfig
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=2)
        >>> init(jax.random.key(0), cfg)["blocks"]["attn"]["qkv"]["w"].shape     # (L, D, 3D)
        (2, 8, 24)
    """
    c = config
    require_ready(c)
    # Four keys whether or not "pos" and "head" exist, so each part's draw depends on
    # the key alone, not on the other options.
    k_embed, k_blocks, k_head, k_pos = jax.random.split(key, 4)
    params = {
        "embed": embedding.init(k_embed, vocab_size=c.vocab_size, d_model=c.d_model, std=c.embed_std,
                                dtype=c.storage_dtype),
        # vmap over the keys stacks every leaf of the block tree on a leading L axis.
        "blocks": jax.vmap(c.init_block)(jax.random.split(k_blocks, c.n_layers)),
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


def require_ready(config: ModelConfig) -> None:
    """ConfigError if the model cannot run yet: its vocab_size is still None (a job
    fills it in from the tokenizer), or it asks for float64 while 64-bit JAX is off (a
    config built inside `jax.enable_x64` and used outside it would otherwise run in
    float32 without a word: JAX truncates float64 requests with only a warning).
    Checked when a function that reads the config is traced.

    Example:
        >>> from minitx_fn.config import ModelConfig
        >>> require_ready(ModelConfig(vocab_size=5))          # float32: nothing to check
    """
    if config.vocab_size is None:
        raise ConfigError("{v} is not set: a model needs its vocabulary's size before it has parameters (job.train "
                          "takes it from the tokenizer; give it to use the model yourself)", v=("vocab_size", None))
    for name in ("dtype", "param_dtype"):
        if getattr(config, name) == "float64" and not x64_enabled():
            raise ConfigError("{field} needs 64-bit JAX, which is off here: use the model inside the same "
                              "`with jax.enable_x64(True):` block that built its config, or turn 64-bit JAX on at "
                              "start-up (jax.config.update('jax_enable_x64', True), or JAX_ENABLE_X64=1)",
                              field=(name, "float64"))


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
        >>> from minitx_fn.config import ModelConfig
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
    if c.positions in ("rotary", "none"):              # the blocks turn q and k instead, or add nothing
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
    Each block is `config.apply_block` (a subclass's own, where it has one).

    Example:
        >>> from minitx_fn.config import ModelConfig
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> p = init(jax.random.key(0), cfg)
        >>> apply(p, jnp.zeros((2, 5), jnp.int32), config=cfg).shape
        (2, 5, 5)
    """
    c = config
    require_ready(c)
    check_tokens(tokens, c)
    if positions is None:
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]  # (1, T)
    if not c.dropout:
        key = None                                                       # nothing to drop: no keys to carry
    k_embed, k_blocks = (None, None) if key is None else jax.random.split(key)
    x = dropout.apply(_embed(params, tokens, positions, c), rate=c.dropout, key=k_embed)   # (B, T, D)
    block_keys = None if key is None else jax.random.split(k_blocks, c.n_layers)          # (L,): one per block

    def body(x, layer):                                                  # one block: (B, T, D) -> (B, T, D)
        block_params, block_key = layer
        return c.apply_block(block_params, x, positions=positions, mask=mask, key=block_key), None

    # What the backward pass keeps of each block's forward pass, and what it
    # recomputes (REMAT_POLICIES; ModelConfig.remat says why). prevent_cse=False: inside a scan the loop
    # already keeps XLA from merging the recomputation into the forward pass.
    body = jax.checkpoint(body, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (params["blocks"], block_keys))         # the L stacked blocks, in order
    return _logits(params, x, c)                                         # (B, T, V)


def attention_maps(params: dict, tokens: jax.Array, *, config: ModelConfig) -> jax.Array:
    """tokens (B, T) -> attention weights (L, B, H, T, T) of every layer and head of the
    built-in block (ConfigError for a model whose blocks are its own).

    Row t of a map is the distribution query t puts over keys 0 .. t. Computed
    alongside the ordinary forward pass, for pictures and tests, not for speed.

    Example:
        >>> from minitx_fn.config import ModelConfig
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> attention_maps(init(jax.random.key(0), cfg), jnp.zeros((1, 5), jnp.int32), config=cfg).shape
        (2, 1, 2, 5, 5)
    """
    c = config
    if not c.has_attention_maps:
        raise ConfigError(f"attention maps read the built-in block's attention; {c.code} has blocks of its own")
    check_tokens(tokens, c)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]                      # (1, T)
    x = _embed(params, tokens, positions, c)                                                # (B, T, D)
    spec = c.block_spec

    def body(x, block_params):
        q, k, _ = attention.project_qkv(block_params["attn"], block.normed(block_params["ln1"], x, spec),
                                        spec.attention, positions=positions)
        weights = attention.attention_weights(q, k, attention.causal_mask(tokens.shape[1])[None, None])
        return block.apply(block_params, x, spec, positions=positions), weights             # (B, H, T, T)

    return jax.lax.scan(body, x, params["blocks"])[1]


def init_cache(config: ModelConfig, batch: int, slots: int | None = None) -> tuple:
    """An empty cache: one per layer, `config.init_block_cache` (the built-in's is a
    `layers.attention.KVCache`, k and v of shape (B, S, G, K) with S = slots, default
    max_len, and G = n_kv_heads).

    Example:
        >>> from minitx_fn.config import ModelConfig
        >>> cache = init_cache(ModelConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=3, max_len=16), 4)
        >>> len(cache), cache[0].k.shape
        (3, (4, 16, 2, 4))
    """
    return tuple(config.init_block_cache(batch, slots or config.max_len) for _ in range(config.n_layers))


def unstack_blocks(params: dict) -> dict:
    """params with "blocks" as a list of L per-layer trees instead of (L, ...) stacks.

    Training keeps the blocks stacked for one `lax.scan`; the cached decoder runs its
    layers one after another and reads this form faster: on XLA:CPU a layer's slice of
    a stacked weight, taken inside the decode loop, is copied for every token
    (benchmarks/NOTES.md). Call it once, outside the loop (`generate` does).

    Example:
        >>> from minitx_fn.config import ModelConfig
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=3)
        >>> blocks = unstack_blocks(init(jax.random.key(0), cfg))["blocks"]
        >>> len(blocks), blocks[2]["attn"]["qkv"]["w"].shape
        (3, (8, 24))
    """
    blocks = params["blocks"]
    if isinstance(blocks, list):                                       # already one tree per layer
        return params
    n = jax.tree.leaves(blocks)[0].shape[0]
    return {**params, "blocks": [jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(n)]}


def apply_cached(params: dict, tokens: jax.Array, cache: tuple, *, config: ModelConfig,
                 index: jax.Array) -> tuple[jax.Array, tuple]:
    """tokens (B, T) of row b written at cache slots index[b] .. index[b] + T - 1 -> logits (B, T, V), new cache.

    index: (B,) int. Row b's token in slot s is at position s of its own sequence,
    and slots 0 .. index[b] - 1 hold that row's earlier tokens, so the positions and
    the causal mask over the S slots follow from `index` alone: query t of row b
    reads slots 0 .. index[b] + t. Keep index[b] + T <= S, the cache's slots: under
    jit nothing can check it, and a write past the end is lost. For right-padded rows
    of lengths len_b, row b's next-token logits are logits[b, len_b - 1], and its next
    token goes in at index len_b. params' blocks may be stacked or unstacked
    (`unstack_blocks`, faster inside a decode loop). Each layer is
    `config.apply_block_cached` (a subclass's own, where it has one).

    Example:
        >>> from minitx_fn.config import ModelConfig
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=8)
        >>> p, tokens = init(jax.random.key(0), cfg), jnp.array([[1, 2, 3]])
        >>> logits, cache = apply_cached(p, tokens, init_cache(cfg, 1), config=cfg, index=jnp.zeros(1, jnp.int32))
        >>> bool(jnp.allclose(logits, apply(p, tokens, config=cfg), atol=1e-5))   # same as without a cache
        True
    """
    c = config
    require_ready(c)
    check_tokens(tokens, c)
    blocks = unstack_blocks(params)["blocks"]
    if len(blocks) != len(cache):
        raise ValueError(f"the parameters hold {len(blocks)} blocks and the cache {len(cache)} layers")
    t, s = tokens.shape[1], cache_slots(cache)
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (tokens.shape[0],))         # an int serves every row
    positions = index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]                   # (B, T)
    mask = (jnp.arange(s, dtype=jnp.int32)[None, None, :] <= positions[:, :, None])[:, None]   # (B, 1, T, S)
    x = _embed(params, tokens, positions, c)                                                # (B, T, D)
    # The layers one after another (unrolled), each with its own weights and cache
    # arrays: no (L, ...) stack is sliced, so nothing is copied per token, and each
    # layer's cache is updated in place.
    new_cache = []
    for block_params, layer_cache in zip(blocks, cache):
        x, layer_cache = c.apply_block_cached(block_params, x, layer_cache, index=index, positions=positions,
                                              mask=mask)
        new_cache.append(layer_cache)
    return _logits(params, x, c), tuple(new_cache)


def cache_slots(cache) -> int:
    """S, the slots per row of a cache (every leaf is (B, S, ...)).

    Example:
        >>> from minitx_fn.config import ModelConfig
        >>> cache_slots(init_cache(ModelConfig(vocab_size=5, n_heads=2, max_len=8), 2))
        8
    """
    return jax.tree.leaves(cache)[0].shape[1]


__all__ = ["REMAT_POLICIES", "apply", "apply_cached", "attention_maps", "cache_slots", "check_tokens", "count_params",
           "init",
           "init_cache", "param_shapes", "require_ready", "unstack_blocks", "with_context"]
