"""Models of one's own, written outside the package with its public names only: ALiBi
and GPT-J's parallel block, each a subclass of the built-in model that overrides its
block, and so gets all of the machinery (training runs, resume, cached and speculative
decoding, LoRA, loading, and `testing.check_model`); and a bigram table written from
scratch against `LanguageModel`'s contract. Both blocks pass on dropout's key.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from minitx_fn import LanguageModel, ModelConfig
from minitx_fn.layers import attention, block, dropout


@dataclasses.dataclass(frozen=True, kw_only=True)
class ALiBi(ModelConfig):
    """GPT with ALiBi attention (Press et al., 2022): no position embeddings; head h
    lowers the score of key s from query t by m_h (t - s), with m_h = 2^(-8 h / H), so
    a model trained on short windows reads longer ones."""

    positions: str = "none"

    def alibi(self, q_pos, k_pos):
        """positions (B|1, T) of the queries and (B|1, S) of the keys -> the bias (B|1, H, T, S)."""
        slopes = 2.0 ** (-8.0 * jnp.arange(1, self.n_heads + 1, dtype=jnp.float32) / self.n_heads)   # (H,)
        distance = (q_pos[:, :, None] - k_pos[:, None, :]).astype(jnp.float32)                     # (B|1, T, S)
        return -slopes[None, :, None, None] * distance[:, None]

    def apply_block(self, params, x, *, positions, mask=None, key=None):
        return block.apply(params, x, self.block_spec, positions=positions, mask=mask, key=key,
                           score_bias=self.alibi(positions, positions))

    def apply_block_cached(self, params, x, cache, *, index, positions, mask):
        slots = jnp.arange(cache.k.shape[1], dtype=jnp.int32)[None]       # slot s of a row holds position s
        return block.apply_cached(params, x, cache, self.block_spec, index=index, mask=mask,
                                  score_bias=self.alibi(positions, slots))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Parallel(ModelConfig):
    """GPT-J's parallel block: x + Attention(Norm(x)) + MLP(Norm(x)), one norm read by both."""

    def init_block(self, key):
        return {name: p for name, p in super().init_block(key).items() if name != "ln2"}

    def apply_block(self, params, x, *, positions, mask=None, key=None):
        spec = self.block_spec
        k_attn, k_out = (None, None) if key is None else jax.random.split(key)    # dropout's, one each
        h = block.normed(params["ln1"], x, spec)
        a = attention.apply(params["attn"], h, spec.attention, positions=positions, mask=mask, key=k_attn)
        return x + dropout.apply(a + block.feedforward(params, h, spec), rate=spec.dropout, key=k_out).astype(x.dtype)

    def apply_block_cached(self, params, x, cache, *, index, positions, mask):
        spec = self.block_spec
        h = block.normed(params["ln1"], x, spec)
        a, cache = attention.apply_cached(params["attn"], h, cache, spec.attention, index=index, mask=mask)
        return x + (a + block.feedforward(params, h, spec)).astype(x.dtype), cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bigram(LanguageModel):
    """A model written from scratch, not from the built-in one: each token's logits are
    its row of one (V, V) table. It reads no context, so its cache holds nothing."""

    vocab_size: int | None = None
    max_len: int = 16

    def init(self, key):
        return {"table": 0.1 * jax.random.normal(key, (self.vocab_size, self.vocab_size))}

    def apply(self, params, tokens, *, positions=None, mask=None, key=None):
        return params["table"][tokens]                                     # (B, T, V)

    def init_cache(self, batch, slots):
        return jnp.zeros((batch, slots), jnp.int32)

    def apply_cached(self, params, tokens, cache, *, index):
        return params["table"][tokens], cache
