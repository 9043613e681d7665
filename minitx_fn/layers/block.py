"""Pre-norm residual block:

    x = x + Dropout(Attention(Norm1(x)))        (dropout only with a key, in training)
    x = x + Dropout(FeedForward(Norm2(x)))

Norm is LayerNorm (`norm.py`) or RMSNorm (`rmsnorm.py`), FeedForward the GELU MLP
(`feedforward.py`) or SwiGLU (`swiglu.py`): the block picks the module by the name
its spec gives (`specs.BlockSpec`) and calls its init/apply pair, which share one
signature. GPT-2 and Llama are the same block with other names.

Params: {"ln1": norm, "attn": attention, "ln2": norm, "mlp": feed-forward}.
The residual stream x keeps its dtype (float32, or float64); only the matmuls
inside attention and the feed-forward run in the compute dtype `spec.dtype`.
`attention_half` and `mlp_half` are the two residual branches, `normed` and
`feedforward` their parts, public so a block of one's own can reuse them
(`tests/variants.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minitx_fn.specs import BlockSpec
from minitx_fn.layers import attention, dropout, feedforward, norm, rmsnorm, swiglu
from minitx_fn.layers.dtypes import compute_dtype

NORMS = {"layernorm": norm, "rmsnorm": rmsnorm}          # BlockSpec.norm -> the layer module
MLPS = {"gelu": feedforward, "swiglu": swiglu}           # BlockSpec.mlp -> the layer module


def init(key: jax.Array, spec: BlockSpec, *, d_model: int, d_ff: int, std: float = 0.02,
         out_std: float | None = None, dtype=jnp.float32) -> dict:
    """Weights ~ Normal(0, std^2). `out_std` initialises the two projections that
    write into the residual stream; GPT-2 uses std / sqrt(2 L) there, so the
    stream's variance does not grow with depth (the model passes it).

    Example:
        >>> from minitx_fn.specs import AttentionSpec
        >>> p = init(jax.random.key(0), BlockSpec(attention=AttentionSpec(n_heads=2)), d_model=8, d_ff=32)
        >>> sorted(p), p["mlp"]["up"]["w"].shape
        (['attn', 'ln1', 'ln2', 'mlp'], (8, 32))
        >>> spec = BlockSpec(attention=AttentionSpec(n_heads=2, bias=False), norm="rmsnorm", mlp="swiglu", bias=False)
        >>> p = init(jax.random.key(0), spec, d_model=8, d_ff=24)
        >>> sorted(p["ln1"]), sorted(p["mlp"])
        (['scale'], ['down', 'gate', 'up'])
    """
    k_attn, k_mlp = jax.random.split(key)
    norm_layer = NORMS[spec.norm]
    return {
        "ln1": norm_layer.init(d_model=d_model, dtype=dtype),
        "attn": attention.init(k_attn, spec.attention, d_model=d_model, std=std, out_std=out_std, dtype=dtype),
        "ln2": norm_layer.init(d_model=d_model, dtype=dtype),
        "mlp": MLPS[spec.mlp].init(k_mlp, d_model=d_model, d_ff=d_ff, std=std, out_std=out_std, dtype=dtype,
                                   bias=spec.bias),
    }


def check_kinds(params: dict, spec: BlockSpec) -> None:
    """ValueError unless the block's parameters were made with spec's norm and mlp:
    a LayerNorm has a bias, an RMSNorm none; a SwiGLU has a gate, the GELU MLP none.

    Example:
        >>> from minitx_fn.specs import AttentionSpec
        >>> spec = BlockSpec(attention=AttentionSpec(n_heads=2))
        >>> check_kinds(init(jax.random.key(0), spec.__class__(attention=spec.attention, norm="rmsnorm"), d_model=8,
        ...                  d_ff=8), spec)
        Traceback (most recent call last):
        ValueError: these block parameters hold norm='rmsnorm' and mlp='gelu'; apply was given norm='layernorm' and mlp='gelu'
    """
    held = ("layernorm" if "bias" in params["ln1"] else "rmsnorm", "swiglu" if "gate" in params["mlp"] else "gelu")
    if held != (spec.norm, spec.mlp):
        raise ValueError(f"these block parameters hold norm={held[0]!r} and mlp={held[1]!r}; apply was given "
                         f"norm={spec.norm!r} and mlp={spec.mlp!r}")


def normed(params: dict, x: jax.Array, spec: BlockSpec) -> jax.Array:
    """Norm(x) (B, T, D) with the norm spec names, in at least float32.

    Example:
        >>> from minitx_fn.specs import AttentionSpec
        >>> spec = BlockSpec(attention=AttentionSpec(n_heads=2), norm="rmsnorm")
        >>> [round(float(v), 3) for v in normed({"scale": jnp.ones(2)}, jnp.array([[[3.0, 4.0]]]), spec)[0, 0]]
        [0.849, 1.131]
    """
    return NORMS[spec.norm].apply(params, x, eps=spec.eps)


def feedforward(params: dict, h: jax.Array, spec: BlockSpec) -> jax.Array:
    """FeedForward(h) (B, T, D) with the MLP spec names and the block's params["mlp"].

    Example:
        >>> from minitx_fn.specs import AttentionSpec
        >>> spec = BlockSpec(attention=AttentionSpec(n_heads=2))
        >>> feedforward(init(jax.random.key(0), spec, d_model=8, d_ff=16), jnp.ones((1, 3, 8)), spec).shape
        (1, 3, 8)
    """
    return MLPS[spec.mlp].apply(params["mlp"], h, dtype=compute_dtype(spec.dtype))


def mlp_half(params: dict, x: jax.Array, spec: BlockSpec, key: jax.Array | None = None) -> jax.Array:
    """x + Dropout(FeedForward(Norm2(x))): the block's second residual branch.

    Example:
        >>> from minitx_fn.specs import AttentionSpec
        >>> spec = BlockSpec(attention=AttentionSpec(n_heads=2))
        >>> mlp_half(init(jax.random.key(0), spec, d_model=8, d_ff=16), jnp.ones((1, 3, 8)), spec).shape
        (1, 3, 8)
    """
    h = feedforward(params, normed(params["ln2"], x, spec), spec)
    return x + dropout.apply(h, rate=spec.dropout, key=key).astype(x.dtype)


def attention_half(params: dict, x: jax.Array, spec: BlockSpec, *, positions: jax.Array | None = None,
                   mask: jax.Array | None = None, key: jax.Array | None = None,
                   score_bias: jax.Array | None = None) -> jax.Array:
    """x + Dropout(Attention(Norm1(x))): the block's first residual branch (mask None: causal;
    score_bias as in `attention.apply`). With a key, the attention weights and the
    branch each drop from their own subkey.

    Example:
        >>> from minitx_fn.specs import AttentionSpec
        >>> spec = BlockSpec(attention=AttentionSpec(n_heads=2))
        >>> attention_half(init(jax.random.key(0), spec, d_model=8, d_ff=16), jnp.ones((1, 3, 8)), spec).shape
        (1, 3, 8)
    """
    k_weights, k_branch = (None, None) if key is None else jax.random.split(key)
    h = attention.apply(params["attn"], normed(params["ln1"], x, spec), spec.attention, positions=positions,
                        mask=mask, key=k_weights, score_bias=score_bias)
    return x + dropout.apply(h, rate=spec.dropout, key=k_branch).astype(x.dtype)


def apply(params: dict, x: jax.Array, spec: BlockSpec, *, positions: jax.Array | None = None,
          mask: jax.Array | None = None, key: jax.Array | None = None,
          score_bias: jax.Array | None = None) -> jax.Array:
    """(B, T, D) -> (B, T, D). positions (B|1, T), mask and score_bias as in
    `attention.apply` (mask None: causal). With a key, dropout at spec.dropout on the attention weights
    and on both residual branches, each from its own subkey.

    Example:
        >>> from minitx_fn.specs import AttentionSpec
        >>> spec = BlockSpec(attention=AttentionSpec(n_heads=2))
        >>> apply(init(jax.random.key(0), spec, d_model=8, d_ff=32), jnp.ones((2, 3, 8)), spec).shape
        (2, 3, 8)
    """
    check_kinds(params, spec)
    k_attn, k_mlp = (None, None) if key is None else jax.random.split(key)
    x = attention_half(params, x, spec, positions=positions, mask=mask, key=k_attn, score_bias=score_bias)
    return mlp_half(params, x, spec, k_mlp)


def apply_cached(params: dict, x: jax.Array, cache: attention.KVCache, spec: BlockSpec, *, index: jax.Array,
                 mask: jax.Array, score_bias: jax.Array | None = None) -> tuple[jax.Array, attention.KVCache]:
    """Like `apply`, with attention reading and writing this layer's KV cache
    (B, S, G, K); `index`, `mask` and `score_bias` as in `attention.apply_cached`.

    Example:
        >>> from minitx_fn.specs import AttentionSpec
        >>> from minitx_fn.layers.attention import causal_mask
        >>> spec = BlockSpec(attention=AttentionSpec(n_heads=2))
        >>> cache = attention.init_cache(spec.attention, 1, 4, head_dim=4)
        >>> y, cache = apply_cached(init(jax.random.key(0), spec, d_model=8, d_ff=32), jnp.ones((1, 1, 8)), cache,
        ...                         spec, index=jnp.zeros(1, jnp.int32), mask=causal_mask(1, 4)[None, None])
        >>> y.shape
        (1, 1, 8)
    """
    check_kinds(params, spec)
    h, cache = attention.apply_cached(params["attn"], normed(params["ln1"], x, spec), cache, spec.attention,
                                      index=index, mask=mask, score_bias=score_bias)
    return mlp_half(params, x + h.astype(x.dtype), spec), cache
