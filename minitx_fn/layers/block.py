"""Pre-norm residual block:

    x = x + Dropout(Attention(LayerNorm1(x)))        (dropout only with a key, in training)
    x = x + Dropout(FeedForward(LayerNorm2(x)))

Params: {"ln1": norm, "attn": attention, "ln2": norm, "mlp": feedforward}.
The residual stream x keeps its dtype (float32, or float64); only the matmuls
inside attention and the feed-forward run in the compute dtype `dtype`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minitx_fn.layers import attention, dropout, feedforward, norm


def init(key: jax.Array, *, d_model: int, n_heads: int, d_ff: int, std: float = 0.02,
         out_std: float | None = None, dtype=jnp.float32) -> dict:
    """Weights ~ Normal(0, std^2). `out_std` initialises the two projections that
    write into the residual stream; GPT-2 uses std / sqrt(2 L) there, so the
    stream's variance does not grow with depth (the model passes it).

    Example:
        >>> p = init(jax.random.key(0), d_model=8, n_heads=2, d_ff=32)
        >>> sorted(p), p["mlp"]["up"]["w"].shape
        (['attn', 'ln1', 'ln2', 'mlp'], (8, 32))
    """
    k_attn, k_mlp = jax.random.split(key)
    return {
        "ln1": norm.init(d_model=d_model, dtype=dtype),
        "attn": attention.init(k_attn, d_model=d_model, n_heads=n_heads, std=std, out_std=out_std, dtype=dtype),
        "ln2": norm.init(d_model=d_model, dtype=dtype),
        "mlp": feedforward.init(k_mlp, d_model=d_model, d_ff=d_ff, std=std, out_std=out_std, dtype=dtype),
    }


def _feedforward_half(params: dict, x: jax.Array, eps: float, dtype, dropout_rate: float = 0.0,
                      key: jax.Array | None = None) -> jax.Array:
    """x + Dropout(FeedForward(LayerNorm2(x))), shared by `apply` and `apply_cached`."""
    h = feedforward.apply(params["mlp"], norm.apply(params["ln2"], x, eps=eps), dtype=dtype)
    return x + dropout.apply(h, rate=dropout_rate, key=key).astype(x.dtype)


def apply(params: dict, x: jax.Array, *, n_heads: int, eps: float = 1e-5, dtype=None, impl: str = "einsum",
          attention_block: int = 0, mask: jax.Array | None = None, dropout_rate: float = 0.0,
          key: jax.Array | None = None) -> jax.Array:
    """(B, T, D) -> (B, T, D). `dtype`, `impl`, `attention_block` and `mask` as in
    `attention.apply` (mask None: causal); `eps` is the layer norms'. With a key,
    dropout at dropout_rate on the attention weights and on both residual branches,
    each from its own subkey.

    Example:
        >>> p = init(jax.random.key(0), d_model=8, n_heads=2, d_ff=32)
        >>> apply(p, jnp.ones((2, 3, 8)), n_heads=2).shape
        (2, 3, 8)
    """
    k_weights, k_attn, k_mlp = (None, None, None) if key is None else jax.random.split(key, 3)
    h = attention.apply(params["attn"], norm.apply(params["ln1"], x, eps=eps), n_heads=n_heads, mask=mask,
                        impl=impl, dtype=dtype, block=attention_block, dropout_rate=dropout_rate, key=k_weights)
    x = x + dropout.apply(h, rate=dropout_rate, key=k_attn).astype(x.dtype)
    return _feedforward_half(params, x, eps, dtype, dropout_rate, k_mlp)


def apply_cached(params: dict, x: jax.Array, cache: attention.KVCache, *, layer: jax.Array, index: jax.Array,
                 mask: jax.Array, n_heads: int, eps: float = 1e-5, dtype=None, impl: str = "einsum"
                 ) -> tuple[jax.Array, attention.KVCache]:
    """Like `apply`, with attention reading and writing slice `layer` of the KV cache
    (L, B, S, H, K); `index` and `mask` as in `attention.apply_cached`.

    Example:
        >>> from minitx_fn.layers.attention import KVCache, causal_mask
        >>> cache = KVCache(jnp.zeros((1, 1, 4, 2, 4)), jnp.zeros((1, 1, 4, 2, 4)))
        >>> p = init(jax.random.key(0), d_model=8, n_heads=2, d_ff=32)
        >>> y, cache = apply_cached(p, jnp.ones((1, 1, 8)), cache, layer=jnp.int32(0), index=jnp.zeros(1, jnp.int32),
        ...                         mask=causal_mask(1, 4)[None, None], n_heads=2)
        >>> y.shape
        (1, 1, 8)
    """
    h, cache = attention.apply_cached(params["attn"], norm.apply(params["ln1"], x, eps=eps), cache, layer=layer,
                                      index=index, mask=mask, n_heads=n_heads, impl=impl, dtype=dtype)
    return _feedforward_half(params, x + h.astype(x.dtype), eps, dtype), cache
