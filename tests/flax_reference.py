"""The Flax reference: the same architecture built from Flax's own layers.

Only the sinusoidal table is written by hand (in numpy float64, with explicit
even/odd assignment rather than our interleaving reshape). Everything else is
Flax's: `nn.Embed` (tokens, learned positions, and `Embed.attend` as the tied
head), `nn.LayerNorm`, `nn.Dense`, `nn.MultiHeadDotProductAttention`,
`nn.make_causal_mask`, `nn.gelu`.

The `to_flax_*` converters map our parameter trees into Flax's variable trees.
They only slice, reshape and unstack, so they are linear maps: the same converter
also maps our gradients onto Flax's gradients.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from minitx_fn.config import ModelConfig


def sinusoidal_table(length: int, d_model: int) -> np.ndarray:
    """(length, D) float64: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(same)."""
    pe = np.zeros((length, d_model), np.float64)
    for p in range(length):
        for j in range(d_model):
            i = j // 2
            angle = p / 10000.0 ** (2 * i / d_model)
            pe[p, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
    return pe


# ----------------------------------------------------------------------------- modules


def _kw(c: ModelConfig) -> dict:
    return {"dtype": c.compute_dtype, "param_dtype": c.storage_dtype}


class FlaxAttention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, mask=None):
        c = self.config
        if mask is None:
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        return nn.MultiHeadDotProductAttention(num_heads=c.n_heads, qkv_features=c.d_model, out_features=c.d_model,
                                               deterministic=True,
                                               force_fp32_for_softmax=c.dtype == "bfloat16", name="mha",
                                               **_kw(c))(x, mask=mask)


class FlaxMLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = nn.gelu(nn.Dense(c.d_ff, name="up", **_kw(c))(x), approximate=True)
        return nn.Dense(c.d_model, name="down", **_kw(c))(h)


def _layer_norm(c: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=c.ln_eps, use_fast_variance=False, name=name,
                        dtype=c.residual_dtype, param_dtype=c.storage_dtype)


class FlaxBlock(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, mask=None):
        c = self.config
        residual = c.residual_dtype
        x = x + FlaxAttention(c, name="attn")(_layer_norm(c, "ln1")(x), mask).astype(residual)
        return x + FlaxMLP(c, name="mlp")(_layer_norm(c, "ln2")(x)).astype(residual)


class FlaxLM(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        work = c.residual_dtype
        t = tokens.shape[1]
        embed = nn.Embed(c.vocab_size, c.d_model, name="embed", param_dtype=c.storage_dtype)
        x = embed(tokens).astype(work)
        if c.positions == "learned":
            pe = nn.Embed(c.max_len, c.d_model, name="pos", param_dtype=c.storage_dtype)(jnp.arange(t))
        else:
            pe = sinusoidal_table(t, c.d_model)
        x = x + jnp.asarray(pe, work)[None]
        mask = nn.make_causal_mask(tokens)                                    # (B, 1, T, T)
        for i in range(c.n_layers):
            x = FlaxBlock(c, name=f"block_{i}")(x, mask)
        x = _layer_norm(c, "ln_f")(x)
        if c.tie_embeddings:
            return embed.attend(x.astype(c.compute_dtype)).astype(work)
        return nn.Dense(c.vocab_size, name="head", **_kw(c))(x).astype(work)


def flax_loss(variables, tokens, targets, config: ModelConfig):
    logits = FlaxLM(config).apply(variables, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# ----------------------------------------------------------------------------- converters


def to_flax_linear(p: dict) -> dict:
    return {"kernel": p["w"], "bias": p["b"]}


def to_flax_norm(p: dict) -> dict:
    return {"scale": p["scale"], "bias": p["bias"]}


def to_flax_attention(p: dict, n_heads: int) -> dict:
    """Fused qkv (D, 3D) [Q | K | V] -> Flax's query/key/value kernels (D, H, K); out (D, D) -> (H, K, D)."""
    w, b = p["qkv"]["w"], p["qkv"]["b"]
    d = w.shape[0]
    k = d // n_heads
    mha = {}
    for i, name in enumerate(("query", "key", "value")):
        mha[name] = {"kernel": w[:, i * d:(i + 1) * d].reshape(d, n_heads, k),
                     "bias": b[i * d:(i + 1) * d].reshape(n_heads, k)}
    mha["out"] = {"kernel": p["out"]["w"].reshape(n_heads, k, d), "bias": p["out"]["b"]}
    return {"mha": mha}


def to_flax_mlp(p: dict) -> dict:
    return {"up": to_flax_linear(p["up"]), "down": to_flax_linear(p["down"])}


def to_flax_block(p: dict, n_heads: int) -> dict:
    return {"ln1": to_flax_norm(p["ln1"]), "attn": to_flax_attention(p["attn"], n_heads),
            "ln2": to_flax_norm(p["ln2"]), "mlp": to_flax_mlp(p["mlp"])}


def to_flax_model(params: dict, config: ModelConfig) -> dict:
    """Our model tree -> {"params": Flax's tree}; the stacked blocks become block_0 .. block_{L-1}."""
    tree = {"embed": {"embedding": params["embed"]["table"]}, "ln_f": to_flax_norm(params["ln_f"])}
    if "pos" in params:
        tree["pos"] = {"embedding": params["pos"]["table"]}
    if "head" in params:
        tree["head"] = to_flax_linear(params["head"])
    for i in range(config.n_layers):
        block_i = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
        tree[f"block_{i}"] = to_flax_block(block_i, config.n_heads)
    return {"params": tree}
