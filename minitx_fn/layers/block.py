"""Pre-norm residual block:

    x = x + Attention(LayerNorm1(x))
    x = x + FeedForward(LayerNorm2(x))

Params: {"ln1": norm, "attn": attention, "ln2": norm, "mlp": feedforward}.
The residual stream stays in float32 (or float64); only the matmuls inside
attention and the feed-forward run in the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from minitx_fn.config import ModelConfig
from minitx_fn.layers import attention, feedforward, norm


def init(key: jax.Array, *, config: ModelConfig) -> dict:
    """Weights ~ Normal(0, init_std^2); the two projections that write into the
    residual stream use init_std / sqrt(2 L) (GPT-2), so the stream's variance does
    not grow with depth.

    Example:
        >>> p = init(jax.random.key(0), config=ModelConfig(vocab_size=5, d_model=8, n_heads=2))
        >>> sorted(p)
        ['attn', 'ln1', 'ln2', 'mlp']
    """
    c = config
    k_attn, k_mlp = jax.random.split(key)
    out_std = c.init_std / math.sqrt(2 * c.n_layers)
    return {
        "ln1": norm.init(d_model=c.d_model, dtype=c.params_dtype),
        "attn": attention.init(k_attn, d_model=c.d_model, n_heads=c.n_heads, std=c.init_std,
                               out_std=out_std, dtype=c.params_dtype),
        "ln2": norm.init(d_model=c.d_model, dtype=c.params_dtype),
        "mlp": feedforward.init(k_mlp, d_model=c.d_model, d_ff=c.d_ff, std=c.init_std,
                                out_std=out_std, dtype=c.params_dtype),
    }


def _feedforward_half(params: dict, x: jax.Array, c: ModelConfig) -> jax.Array:
    """x + FeedForward(LayerNorm2(x)), shared by `apply` and `apply_cached`."""
    h = feedforward.apply(params["mlp"], norm.apply(params["ln2"], x, eps=c.ln_eps), dtype=c.compute_dtype)
    return x + h.astype(c.residual_dtype)


def apply(params: dict, x: jax.Array, *, config: ModelConfig, mask: jax.Array | None = None) -> jax.Array:
    """(B, T, D) -> (B, T, D). mask as in `attention.apply` (None: causal).

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> apply(init(jax.random.key(0), config=cfg), jnp.ones((2, 3, 8)), config=cfg).shape
        (2, 3, 8)
    """
    c = config
    h = attention.apply(params["attn"], norm.apply(params["ln1"], x, eps=c.ln_eps), n_heads=c.n_heads,
                        mask=mask, impl=c.attention, dtype=c.compute_dtype, block=c.attention_block)
    return _feedforward_half(params, x + h.astype(c.residual_dtype), c)


def apply_cached(params: dict, x: jax.Array, cache: attention.KVCache, *, config: ModelConfig,
                 index: jax.Array, mask: jax.Array, layer: jax.Array | None = None
                 ) -> tuple[jax.Array, attention.KVCache]:
    """Like `apply`, with attention reading and writing the layer's KV cache (B, S, H, K).

    Example:
        >>> from minitx_fn.layers.attention import KVCache, causal_mask
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=4)
        >>> cache = KVCache(jnp.zeros((1, 4, 2, 4)), jnp.zeros((1, 4, 2, 4)))
        >>> y, cache = apply_cached(init(jax.random.key(0), config=cfg), jnp.ones((1, 1, 8)), cache, config=cfg,
        ...                         index=0, mask=causal_mask(1, 4)[None, None])
        >>> y.shape
        (1, 1, 8)
    """
    c = config
    h, cache = attention.apply_cached(params["attn"], norm.apply(params["ln1"], x, eps=c.ln_eps), cache,
                                      index=index, mask=mask, n_heads=c.n_heads, impl=c.attention,
                                      dtype=c.compute_dtype, layer=layer)
    return _feedforward_half(params, x + h.astype(c.residual_dtype), c), cache
