"""Pre-norm residual block:

    x = x + Dropout(Attention(Norm1(x)))        (dropout only with a key, in training)
    x = x + Dropout(FeedForward(Norm2(x)))

Norm is LayerNorm (`norm.py`) or RMSNorm (`rmsnorm.py`), FeedForward the GELU MLP
(`feedforward.py`) or SwiGLU (`swiglu.py`): the block picks the module by name and
calls its init/apply pair, which share one signature. GPT-2 and Llama are the same
block with other names.

Params: {"ln1": norm, "attn": attention, "ln2": norm, "mlp": feed-forward}.
The residual stream x keeps its dtype (float32, or float64); only the matmuls
inside attention and the feed-forward run in the compute dtype `dtype`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minitx_fn.config import RopeScaling
from minitx_fn.layers import attention, dropout, feedforward, norm, rmsnorm, swiglu

NORMS = {"layernorm": norm, "rmsnorm": rmsnorm}          # ModelConfig.norm -> the layer module
MLPS = {"gelu": feedforward, "swiglu": swiglu}           # ModelConfig.mlp -> the layer module


def init(key: jax.Array, *, d_model: int, n_heads: int, d_ff: int, n_kv_heads: int | None = None,
         std: float = 0.02, out_std: float | None = None, dtype=jnp.float32, norm: str = "layernorm",
         mlp: str = "gelu", bias: bool = True, qkv_bias: bool | None = None) -> dict:
    """Weights ~ Normal(0, std^2). `out_std` initialises the two projections that
    write into the residual stream; GPT-2 uses std / sqrt(2 L) there, so the
    stream's variance does not grow with depth (the model passes it).

    Example:
        >>> p = init(jax.random.key(0), d_model=8, n_heads=2, d_ff=32)
        >>> sorted(p), p["mlp"]["up"]["w"].shape
        (['attn', 'ln1', 'ln2', 'mlp'], (8, 32))
        >>> p = init(jax.random.key(0), d_model=8, n_heads=2, d_ff=24, norm="rmsnorm", mlp="swiglu", bias=False)
        >>> sorted(p["ln1"]), sorted(p["mlp"])
        (['scale'], ['down', 'gate', 'up'])
    """
    k_attn, k_mlp = jax.random.split(key)
    norm_layer = NORMS[norm]
    return {
        "ln1": norm_layer.init(d_model=d_model, dtype=dtype),
        "attn": attention.init(k_attn, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, std=std,
                               out_std=out_std, dtype=dtype, bias=bias, qkv_bias=qkv_bias),
        "ln2": norm_layer.init(d_model=d_model, dtype=dtype),
        "mlp": MLPS[mlp].init(k_mlp, d_model=d_model, d_ff=d_ff, std=std, out_std=out_std, dtype=dtype, bias=bias),
    }


def check_kinds(params: dict, norm: str, mlp: str) -> None:
    """ValueError unless the block's parameters were made with these `norm` and `mlp`:
    a LayerNorm has a bias, an RMSNorm none; a SwiGLU has a gate, the GELU MLP none.

    Example:
        >>> check_kinds(init(jax.random.key(0), d_model=8, n_heads=2, d_ff=8, norm="rmsnorm"), "layernorm", "gelu")
        Traceback (most recent call last):
        ValueError: these block parameters hold norm='rmsnorm' and mlp='gelu'; apply was given norm='layernorm' and mlp='gelu'
    """
    held = ("layernorm" if "bias" in params["ln1"] else "rmsnorm", "swiglu" if "gate" in params["mlp"] else "gelu")
    if held != (norm, mlp):
        raise ValueError(f"these block parameters hold norm={held[0]!r} and mlp={held[1]!r}; apply was given "
                         f"norm={norm!r} and mlp={mlp!r}")


def _feedforward_half(params: dict, x: jax.Array, eps: float, dtype, norm: str, mlp: str,
                      dropout_rate: float = 0.0, key: jax.Array | None = None) -> jax.Array:
    """x + Dropout(FeedForward(Norm2(x))), shared by `apply` and `apply_cached`."""
    h = MLPS[mlp].apply(params["mlp"], NORMS[norm].apply(params["ln2"], x, eps=eps), dtype=dtype)
    return x + dropout.apply(h, rate=dropout_rate, key=key).astype(x.dtype)


def apply(params: dict, x: jax.Array, *, n_heads: int, n_kv_heads: int | None = None, eps: float = 1e-5,
          dtype=None, impl: str = "einsum", attention_block: int = 0, mask: jax.Array | None = None,
          dropout_rate: float = 0.0, key: jax.Array | None = None, norm: str = "layernorm", mlp: str = "gelu",
          positions: jax.Array | None = None, rope_theta: float | None = None,
          rope_scaling: RopeScaling | None = None) -> jax.Array:
    """(B, T, D) -> (B, T, D). `dtype`, `impl`, `attention_block`, `mask`, `n_kv_heads`,
    `positions`, `rope_theta` and `rope_scaling` as in `attention.apply` (mask None: causal); `eps` is
    the norms'. With a key, dropout at dropout_rate on the attention weights and on
    both residual branches, each from its own subkey.

    Example:
        >>> p = init(jax.random.key(0), d_model=8, n_heads=2, d_ff=32)
        >>> apply(p, jnp.ones((2, 3, 8)), n_heads=2).shape
        (2, 3, 8)
    """
    check_kinds(params, norm, mlp)
    k_weights, k_attn, k_mlp = (None, None, None) if key is None else jax.random.split(key, 3)
    h = attention.apply(params["attn"], NORMS[norm].apply(params["ln1"], x, eps=eps), n_heads=n_heads,
                        n_kv_heads=n_kv_heads, mask=mask, impl=impl, dtype=dtype, block=attention_block,
                        dropout_rate=dropout_rate, key=k_weights, positions=positions, rope_theta=rope_theta,
                        rope_scaling=rope_scaling)
    x = x + dropout.apply(h, rate=dropout_rate, key=k_attn).astype(x.dtype)
    return _feedforward_half(params, x, eps, dtype, norm, mlp, dropout_rate, k_mlp)


def apply_cached(params: dict, x: jax.Array, cache: attention.KVCache, *, index: jax.Array,
                 mask: jax.Array, n_heads: int, n_kv_heads: int | None = None, eps: float = 1e-5, dtype=None,
                 impl: str = "einsum", norm: str = "layernorm", mlp: str = "gelu", rope_theta: float | None = None,
                 rope_scaling: RopeScaling | None = None) -> tuple[jax.Array, attention.KVCache]:
    """Like `apply`, with attention reading and writing this layer's KV cache
    (B, S, G, K); `index` and `mask` as in `attention.apply_cached`.

    Example:
        >>> from minitx_fn.layers.attention import KVCache, causal_mask
        >>> cache = KVCache(jnp.zeros((1, 4, 2, 4)), jnp.zeros((1, 4, 2, 4)))
        >>> p = init(jax.random.key(0), d_model=8, n_heads=2, d_ff=32)
        >>> y, cache = apply_cached(p, jnp.ones((1, 1, 8)), cache, index=jnp.zeros(1, jnp.int32),
        ...                         mask=causal_mask(1, 4)[None, None], n_heads=2)
        >>> y.shape
        (1, 1, 8)
    """
    check_kinds(params, norm, mlp)
    h, cache = attention.apply_cached(params["attn"], NORMS[norm].apply(params["ln1"], x, eps=eps), cache,
                                      index=index, mask=mask, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                      impl=impl, dtype=dtype, rope_theta=rope_theta, rope_scaling=rope_scaling)
    return _feedforward_half(params, x + h.astype(x.dtype), eps, dtype, norm, mlp), cache
