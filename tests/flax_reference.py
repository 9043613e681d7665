"""The Flax reference: the same architecture built from Flax's own layers.

Only the sinusoidal table and rotary positions are written by hand: the table in
numpy float64, with explicit even/odd assignment rather than our interleaving
reshape; rotary from the RoFormer paper's complex form, each pair (x_i, x_{i+K/2})
a complex number multiplied by e^{i m theta_i}, where ours turns real pairs with
sines and cosines. Everything else is Flax's: `nn.Embed` (tokens, learned
positions, and `Embed.attend` as the tied head), `nn.LayerNorm`, `nn.RMSNorm`,
`nn.Dense`, `nn.DenseGeneral`, `nn.MultiHeadDotProductAttention`,
`nn.dot_product_attention` (grouped-query attention by repeating each key/value
head for its group of query heads, the paper's definition), `nn.make_causal_mask`,
`nn.gelu`, `nn.silu`.

The `to_flax_*` converters map our parameter trees into Flax's variable trees.
They only slice, reshape and unstack, so they are linear maps: the same converter
also maps our gradients onto Flax's gradients.

`reference_config` and `compare_grads_and_adam_step` are what the comparisons of
tests/test_layers.py (each layer) and tests/test_model_reference.py (the model) share.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from minitx_fn.config import ModelConfig
from minitx_fn.testing import assert_close_scaled, standard_promotion


def sinusoidal_table(length: int, d_model: int) -> np.ndarray:
    """(length, D) float64: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(same)."""
    pe = np.zeros((length, d_model), np.float64)
    for p in range(length):
        for j in range(d_model):
            i = j // 2
            angle = p / 10000.0 ** (2 * i / d_model)
            pe[p, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
    return pe


def rotary_complex(x, positions, theta: float):
    """x (B, T, H, K), positions (T,) -> x with pair (x_i, x_{i+K/2}) at position m
    multiplied, as the complex number x_i + i x_{i+K/2}, by e^{i m theta^(-2i/K)}."""
    k = x.shape[-1]
    freqs = theta ** (-2.0 * np.arange(k // 2, dtype=np.float64) / k)              # numpy float64
    angle = np.asarray(positions, np.float64)[:, None] * freqs[None, :]           # (T, K/2)
    work = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    turn = jnp.asarray(np.exp(1j * angle), jnp.complex128 if work == jnp.float64 else jnp.complex64)
    z = jax.lax.complex(x[..., :k // 2].astype(work), x[..., k // 2:].astype(work)) * turn[None, :, None, :]
    return jnp.concatenate([z.real, z.imag], axis=-1).astype(x.dtype)


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


class FlaxGroupedAttention(nn.Module):
    """Query, key and value projections of their own (H, G and G heads), rotary
    positions when the config has them, each key/value head repeated for its R = H / G
    query heads, then Flax's dot-product attention and output projection."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x, mask=None):
        c = self.config
        k = c.head_dim
        project = lambda heads, name: nn.DenseGeneral((heads, k), use_bias=c.qkv_bias, name=name, **_kw(c))  # noqa: E731
        q, key, v = project(c.n_heads, "query")(x), project(c.n_kv_heads, "key")(x), project(c.n_kv_heads, "value")(x)
        if c.positions == "rotary":
            positions = np.arange(x.shape[1])
            q, key = rotary_complex(q, positions, c.rope_theta), rotary_complex(key, positions, c.rope_theta)
        repeat = c.n_heads // c.n_kv_heads
        key, v = jnp.repeat(key, repeat, axis=2), jnp.repeat(v, repeat, axis=2)   # head h reads kv head h // R
        if mask is None:
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        y = nn.dot_product_attention(q, key, v, mask=mask, dtype=c.compute_dtype,
                                     force_fp32_for_softmax=c.dtype == "bfloat16")
        return nn.DenseGeneral(c.d_model, axis=(-2, -1), use_bias=c.bias, name="out", **_kw(c))(y)


def grouped(c: ModelConfig) -> bool:
    """Whether the reference needs its own attention: Flax's multi-head layer has no
    rotary positions, grouped heads or separate biases."""
    return c.positions == "rotary" or c.n_kv_heads != c.n_heads or not (c.bias and c.qkv_bias)


class FlaxMLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = nn.gelu(nn.Dense(c.d_ff, name="up", use_bias=c.bias, **_kw(c))(x), approximate=True)
        return nn.Dense(c.d_model, name="down", use_bias=c.bias, **_kw(c))(h)


class FlaxSwiGLU(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda features, name: nn.Dense(features, name=name, use_bias=c.bias, **_kw(c))  # noqa: E731
        return dense(c.d_model, "down")(nn.silu(dense(c.d_ff, "gate")(x)) * dense(c.d_ff, "up")(x))


def layer_norm(c: ModelConfig, name: str) -> nn.Module:
    """Flax's norm of c's kind (LayerNorm or RMSNorm), in c's dtypes."""
    if c.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=c.ln_eps, name=name, dtype=c.residual_dtype, param_dtype=c.storage_dtype)
    return nn.LayerNorm(epsilon=c.ln_eps, use_fast_variance=False, name=name,
                        dtype=c.residual_dtype, param_dtype=c.storage_dtype)


class FlaxBlock(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, mask=None):
        c = self.config
        residual = c.residual_dtype
        attention = FlaxGroupedAttention if grouped(c) else FlaxAttention
        mlp = FlaxSwiGLU if c.mlp == "swiglu" else FlaxMLP
        x = x + attention(c, name="attn")(layer_norm(c, "ln1")(x), mask).astype(residual)
        return x + mlp(c, name="mlp")(layer_norm(c, "ln2")(x)).astype(residual)


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
            x = x + nn.Embed(c.max_len, c.d_model, name="pos", param_dtype=c.storage_dtype)(jnp.arange(t))[None]
        elif c.positions == "sinusoidal":
            x = x + jnp.asarray(sinusoidal_table(t, c.d_model), work)[None]
        mask = nn.make_causal_mask(tokens)                                    # (B, 1, T, T)
        for i in range(c.n_layers):
            x = FlaxBlock(c, name=f"block_{i}")(x, mask)
        x = layer_norm(c, "ln_f")(x)
        if c.tie_embeddings:
            return embed.attend(x.astype(c.compute_dtype)).astype(work)
        return nn.Dense(c.vocab_size, name="head", use_bias=c.bias, **_kw(c))(x).astype(work)


def flax_loss(variables, tokens, targets, config: ModelConfig):
    logits = FlaxLM(config).apply(variables, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# ----------------------------------------------------------------------------- converters


def to_flax_linear(p: dict) -> dict:
    return {"kernel": p["w"], **({"bias": p["b"]} if "b" in p else {})}


def to_flax_norm(p: dict) -> dict:
    return {"scale": p["scale"], **({"bias": p["bias"]} if "bias" in p else {})}


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


def to_flax_grouped_attention(p: dict, n_heads: int, n_kv_heads: int) -> dict:
    """Fused qkv (D, (H + 2G) K) [Q | K | V] -> query (D, H, K), key and value (D, G, K)
    kernels (and biases); out (D, D) -> (H, K, D)."""
    w = p["qkv"]["w"]
    d = w.shape[0]
    k = d // n_heads
    tree, start = {}, 0
    for name, heads in (("query", n_heads), ("key", n_kv_heads), ("value", n_kv_heads)):
        cols = slice(start, start + heads * k)
        tree[name] = {"kernel": w[:, cols].reshape(d, heads, k)}
        if "b" in p["qkv"]:
            tree[name]["bias"] = p["qkv"]["b"][cols].reshape(heads, k)
        start += heads * k
    tree["out"] = {"kernel": p["out"]["w"].reshape(n_heads, k, d), **({"bias": p["out"]["b"]} if "b" in p["out"]
                                                                       else {})}
    return tree


def to_flax_mlp(p: dict) -> dict:
    return {name: to_flax_linear(layer) for name, layer in p.items()}


def to_flax_block(p: dict, config: ModelConfig) -> dict:
    c = config
    attention = (to_flax_grouped_attention(p["attn"], c.n_heads, c.n_kv_heads) if grouped(c)
                 else to_flax_attention(p["attn"], c.n_heads))
    return {"ln1": to_flax_norm(p["ln1"]), "attn": attention, "ln2": to_flax_norm(p["ln2"]), "mlp": to_flax_mlp(p["mlp"])}


def to_flax_model(params: dict, config: ModelConfig) -> dict:
    """Our model tree -> {"params": Flax's tree}; the stacked blocks become block_0 .. block_{L-1}."""
    tree = {"embed": {"embedding": params["embed"]["table"]}, "ln_f": to_flax_norm(params["ln_f"])}
    if "pos" in params:
        tree["pos"] = {"embedding": params["pos"]["table"]}
    if "head" in params:
        tree["head"] = to_flax_linear(params["head"])
    for i in range(config.n_layers):
        block_i = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
        tree[f"block_{i}"] = to_flax_block(block_i, config)
    return {"params": tree}


# ----------------------------------------------------------------------------- comparing


TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def reference_config(dtype: str) -> ModelConfig:
    """attention_block=3 < T: the layer cases (T = 7) run attention in ragged blocks 3, 3, 1."""
    return ModelConfig(vocab_size=11, d_model=24, n_heads=3, n_layers=2, max_len=16, dtype=dtype, param_dtype=dtype,
                       attention_block=3)


def is_key_bias(path) -> bool:
    names = [getattr(k, "key", None) for k in path]
    return names[-2:] == ["key", "bias"]


def zero_key_bias_grad(grads, flax_grads, to_flax, tol, rotary=False):
    """The key bias gets no gradient in exact arithmetic: q.(k + b) adds the same q.b
    to every score of a softmax row, and softmax ignores such a shift. In floating
    point both implementations return rounding noise there, which Adam would blow up
    into steps of +-lr. Assert the noise is tiny, then set it to exactly zero. (Not
    with rotary positions: the bias turns with each key's position, so q.R_n b differs
    from key to key and the gradient is real.)"""
    if rotary:
        return grads, flax_grads
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(flax_grads))
    flat = jax.tree_util.tree_leaves_with_path(flax_grads)
    for path, g in flat:
        if is_key_bias(path):
            assert float(jnp.abs(g).max()) <= tol * scale, "key-bias gradient should vanish"
    flax_grads = jax.tree_util.tree_map_with_path(lambda p, g: jnp.zeros_like(g) if is_key_bias(p) else g,
                                                  flax_grads)

    # Our fused bias is [Q | K | V]: its K part starts after the H K query columns and
    # spans the G K key columns (Flax's query and key biases, (H, K) and (G, K), say where).
    widths = {getattr(path[-2], "key", None): g.size for path, g in flat
              if len(path) > 1 and getattr(path[-1], "key", None) == "bias"}

    def zero_ours(path, g):
        names = [getattr(k, "key", None) for k in path]
        if names[-2:] != ["qkv", "b"]:
            return g
        start, stop = widths["query"], widths["query"] + widths["key"]
        assert float(jnp.abs(g[..., start:stop]).max()) <= tol * scale, "key-bias gradient should vanish"
        return g.at[..., start:stop].set(0)

    return jax.tree_util.tree_map_with_path(zero_ours, grads), flax_grads


def compare_grads_and_adam_step(params, grads, flax_params, flax_grads, to_flax, tol, rotary=False):
    grads, flax_grads = zero_key_bias_grad(grads, flax_grads, to_flax, tol, rotary)
    assert_close_scaled(to_flax(grads), flax_grads, tol)
    # Adam's first step is lr * g / (|g| + eps): near g = 0 its slope is lr / eps, which
    # for optax's default eps = 1e-8 turns float32 rounding noise (1e-9) in a tiny
    # gradient entry into a visible step. eps = 1e-4 bounds that slope at 10, so the
    # 1e-5 agreement of the gradients carries over to the updated parameters.
    with standard_promotion():
        ours, theirs = adam_step(params, grads), adam_step(flax_params, flax_grads)
    # Parameters are measured on the scale of the whole parameter tree: a bias that
    # started at zero holds just one step of size ~lr, too small a scale of its own.
    assert_close_scaled(to_flax(ours), theirs, tol, floor=1.0)


@jax.jit
def adam_step(params, grads):
    """The parameters after one step of Adam with eps = 1e-4 (see above); jitted, as
    eagerly every leaf's update would compile on its own."""
    opt = optax.adam(1e-3, eps=1e-4)
    return optax.apply_updates(params, opt.update(grads, opt.init(params), params)[0])
