"""Our layers and model against the Flax reference: outputs, gradients, one Adam update.

Every case builds our parameters, converts them into Flax's tree with the
converters of `flax_reference`, and compares in float32 (tolerance 1e-5 of each
value's scale) and in float64 under jax_enable_x64 (tolerance 1e-10).
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minitx_fn import defaults, model, train
from minitx_fn.config import ModelConfig
from minitx_fn.layers import attention, block, embedding, feedforward, linear, norm, rmsnorm, swiglu
from tests import flax_reference as ref
from tests.helpers import assert_close_scaled, enable_x64, standard_promotion

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def _config(dtype: str) -> ModelConfig:
    """attention_block=3 < T: the layer cases (T = 7) run attention in ragged blocks 3, 3, 1."""
    return ModelConfig(vocab_size=11, d_model=24, n_heads=3, n_layers=2, max_len=16, dtype=dtype, param_dtype=dtype,
                       attention_block=3)


def _case(name: str, c: ModelConfig, key: jax.Array, rng: np.random.Generator):
    """(our params, our_fn(params) -> y, flax_fn(flax_params) -> y, to_flax) for one layer."""
    k_init = key
    dt = c.storage_dtype
    x = jnp.asarray(rng.standard_normal((2, 7, c.d_model)), dt)          # (B, T, D)
    tokens = jnp.asarray(rng.integers(0, c.vocab_size, (2, 7)), jnp.int32)   # (B, T)
    def flax_apply(module, inputs, method="__call__"):
        def run(flax_params):
            with standard_promotion():
                return module.apply({"params": flax_params}, *inputs, method=method)
        return run
    if name == "linear":
        p = linear.init(k_init, d_in=c.d_model, d_out=5, std=0.5, dtype=dt)
        return p, lambda p: linear.apply(p, x), flax_apply(nn.Dense(5, param_dtype=dt, dtype=dt), (x,)), ref.to_flax_linear
    if name == "embedding":
        p = embedding.init(k_init, vocab_size=c.vocab_size, d_model=c.d_model, dtype=dt)
        return (p, lambda p: embedding.apply(p, tokens),
                flax_apply(nn.Embed(c.vocab_size, c.d_model, param_dtype=dt), (tokens,)),
                lambda p: {"embedding": p["table"]})
    if name == "embedding_attend":          # the tied head: scores of x against every row
        p = embedding.init(k_init, vocab_size=c.vocab_size, d_model=c.d_model, dtype=dt)
        return (p, lambda p: embedding.attend(p, x),
                flax_apply(nn.Embed(c.vocab_size, c.d_model, param_dtype=dt), (x,), method="attend"),
                lambda p: {"embedding": p["table"]})
    if name == "norm":
        p = norm.init(d_model=c.d_model, dtype=dt)
        p = jax.tree.map(lambda a: a + jnp.asarray(0.1 * rng.standard_normal(a.shape), dt), p)  # not just 1 and 0
        return (p, lambda p: norm.apply(p, 3.0 * x + 1.0, eps=c.ln_eps),
                flax_apply(ref._layer_norm(c, None), (3.0 * x + 1.0,)), ref.to_flax_norm)
    if name == "feedforward":
        p = feedforward.init(k_init, d_model=c.d_model, d_ff=c.d_ff, std=0.2, dtype=dt)
        return p, lambda p: feedforward.apply(p, x, dtype=dt), flax_apply(ref.FlaxMLP(c), (x,)), ref.to_flax_mlp
    if name == "attention":
        p = attention.init(k_init, c.attention_spec, d_model=c.d_model, std=0.3, dtype=dt)
        return (p, lambda p: attention.apply(p, x, c.attention_spec),
                flax_apply(ref.FlaxAttention(c), (x,)), lambda p: ref.to_flax_attention(p, c.n_heads))
    if name == "rmsnorm":
        p = {"scale": jnp.asarray(1 + 0.1 * rng.standard_normal(c.d_model), dt)}
        return (p, lambda p: rmsnorm.apply(p, 3.0 * x + 1.0, eps=c.ln_eps),
                flax_apply(ref._layer_norm(c.replace(norm="rmsnorm"), None), (3.0 * x + 1.0,)), ref.to_flax_norm)
    if name == "swiglu":
        p = swiglu.init(k_init, d_model=c.d_model, d_ff=c.d_ff, std=0.2, dtype=dt, bias=c.bias)
        return p, lambda p: swiglu.apply(p, x, dtype=dt), flax_apply(ref.FlaxSwiGLU(c), (x,)), ref.to_flax_mlp
    if name == "grouped_attention":      # rotary, grouped-query, biases on q, k, v only (Qwen2's choices)
        p = attention.init(k_init, c.attention_spec, d_model=c.d_model, std=0.3, dtype=dt)
        p = jax.tree.map(lambda a: a + jnp.asarray(0.1 * rng.standard_normal(a.shape), dt), p)   # biases not 0
        return (p, lambda p: attention.apply(p, x, c.attention_spec),
                flax_apply(ref.FlaxGroupedAttention(c), (x,)),
                lambda p: ref.to_flax_grouped_attention(p, c.n_heads, c.n_kv_heads))
    if name in ("block", "llama_block"):
        p = block.init(k_init, c.block_spec, d_model=c.d_model, d_ff=c.d_ff, std=0.3, dtype=dt)
        return (p, lambda p: block.apply(p, x, c.block_spec), flax_apply(ref.FlaxBlock(c), (x,)),
                lambda p: ref.to_flax_block(p, c))
    raise AssertionError(name)


def _llama(c: ModelConfig, **changes) -> ModelConfig:
    """Llama's choices on a layer-test config: 4 query heads of K = 6 sharing 2 key/value heads."""
    return c.replace(**{**defaults.ARCHS["llama"], "n_heads": 4, "n_kv_heads": 2, **changes})


# The layers of the Llama family, each tested on the config it needs.
LLAMA_LAYERS = {"rmsnorm": {}, "swiglu": {"bias": False}, "grouped_attention": {"qkv_bias": True},
                "llama_block": {}}


def _compare(params, our_fn, flax_fn, to_flax, tol, rng, rotary=False):
    """Outputs, gradients of <y, probe> for every parameter, and the parameters after one Adam step."""
    # Jitted only to make the suite fast; jit(apply) == apply is tested in test_layers.
    y = jax.jit(our_fn)(params)
    assert_close_scaled(y, jax.jit(flax_fn)(to_flax(params)), tol)
    probe = jnp.asarray(rng.standard_normal(y.shape), y.dtype)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(our_fn(p) * probe)))(params)
    with standard_promotion():
        flax_grads = jax.jit(jax.grad(lambda fp: jnp.sum(flax_fn(fp) * probe)))(to_flax(params))
    _compare_grads_and_adam_step(params, grads, to_flax(params), flax_grads, to_flax, tol, rotary)


def _is_key_bias(path) -> bool:
    names = [getattr(k, "key", None) for k in path]
    return names[-2:] == ["key", "bias"]


def _zero_key_bias_grad(grads, flax_grads, to_flax, tol, rotary=False):
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
        if _is_key_bias(path):
            assert float(jnp.abs(g).max()) <= tol * scale, "key-bias gradient should vanish"
    flax_grads = jax.tree_util.tree_map_with_path(lambda p, g: jnp.zeros_like(g) if _is_key_bias(p) else g,
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


def _compare_grads_and_adam_step(params, grads, flax_params, flax_grads, to_flax, tol, rotary=False):
    grads, flax_grads = _zero_key_bias_grad(grads, flax_grads, to_flax, tol, rotary)
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


LAYERS = ["linear", "embedding", "embedding_attend", "norm", "feedforward", "attention", "block", *LLAMA_LAYERS]


def _layer_config(name: str, dtype: str) -> ModelConfig:
    c = _config(dtype)
    return _llama(c, **LLAMA_LAYERS[name]) if name in LLAMA_LAYERS else c


@pytest.mark.parametrize("name, impl", [(name, "einsum") for name in LAYERS] + [
    ("attention", "dot_product_attention"), ("block", "dot_product_attention"),
    ("grouped_attention", "dot_product_attention")])
def test_layer_matches_flax_float32(name, impl, key, rng):
    c = _layer_config(name, "float32").replace(attention=impl)
    params, our_fn, flax_fn, to_flax = _case(name, c, key, rng)
    _compare(params, our_fn, flax_fn, to_flax, TOLERANCE["float32"], rng, c.positions == "rotary")


@pytest.mark.parametrize("name", LAYERS)
def test_layer_matches_flax_float64(name, key, rng):
    with enable_x64():
        c = _layer_config(name, "float64")
        params, our_fn, flax_fn, to_flax = _case(name, c, key, rng)
        _compare(params, our_fn, flax_fn, to_flax, TOLERANCE["float64"], rng, c.positions == "rotary")


def _loss(params, tokens, targets, *, config):
    return train.cross_entropy(model.apply(params, tokens, config=config), targets)


def _model_case(c: ModelConfig, key: jax.Array, rng: np.random.Generator):
    params = model.init(key, c.replace(init_std=0.2))
    data = jnp.asarray(rng.integers(0, c.vocab_size, (3, 9)), jnp.int32)   # (B, T + 1)
    return params, data[:, :-1], data[:, 1:]


GPT2 = {"positions": "learned", "tie_embeddings": True}
LLAMA = {**defaults.ARCHS["llama"], "n_heads": 4, "n_kv_heads": 2}
QWEN2 = {**LLAMA, "qkv_bias": True, "n_kv_heads": 1}                 # multi-query, biases on q, k, v


@pytest.mark.parametrize("dtype, impl, block, remat, options", [
    ("float32", "einsum", 0, "none", {}),                     # the formulas as written, nothing recomputed
    ("float32", "einsum", 3, "matmuls", {}),                  # the defaults, with blocks at this T
    ("float64", "einsum", 3, "matmuls", {}),
    ("float32", "dot_product_attention", 3, "dots", {}),
    ("float32", "einsum", 5, "full", {}),
    ("float32", "einsum", 3, "matmuls", GPT2),                # GPT-2's learned positions and tied head
    ("float64", "einsum", 3, "matmuls", GPT2),
    ("float64", "einsum", 3, "matmuls", LLAMA),               # rotary, RMSNorm, SwiGLU, grouped-query, no biases
    ("float64", "einsum", 0, "none", {**QWEN2, "tie_embeddings": True}),
])
def test_model_matches_flax(dtype, impl, block, remat, options, key, rng):
    """Logits, loss, every gradient and one Adam update of the whole model.

    Attention blocks (3 and 5 rows over T = 8) and every rematerialisation policy
    must change nothing but rounding. With a tied head the token table's gradient
    is the sum of what the lookup and the head send it, on both sides. No float64 case for impl="dot_product_attention": `jax.nn.dot_product_attention`
    always computes its softmax in float32, so it agrees with float64 maths only to
    about 1e-7, not 1e-10.
    """
    with enable_x64() if dtype == "float64" else contextlib.nullcontext():
        c = _config(dtype).replace(attention=impl, attention_block=block, remat=remat, **options)
        tol = TOLERANCE[dtype]
        params, tokens, targets = _model_case(c, key, rng)
        to_flax = lambda p: ref.to_flax_model(p, c)  # noqa: E731
        fvars = to_flax(params)
        loss, grads = jax.jit(jax.value_and_grad(_loss), static_argnames="config")(params, tokens, targets, config=c)
        with standard_promotion():
            flax_logits = jax.jit(ref.FlaxLM(c).apply)(fvars, tokens)
            flax_loss, flax_grads = jax.jit(jax.value_and_grad(ref.flax_loss), static_argnums=3)(
                fvars, tokens, targets, c)
        assert_close_scaled(jax.jit(model.apply, static_argnames="config")(params, tokens, config=c),
                            flax_logits, tol)
        assert_close_scaled(loss, flax_loss, tol)
        _compare_grads_and_adam_step(params, grads, fvars, flax_grads, to_flax, tol, c.positions == "rotary")


@pytest.mark.parametrize("options", [{}, GPT2, LLAMA, QWEN2], ids=["sinusoidal-untied", "learned-tied", "llama",
                                                                   "qwen2"])
def test_converter_places_every_parameter_once(key, options):
    """The converter is a bijection on leaves: Flax's tree has the same number of
    values, and marking each of our leaves with its index shows up exactly once."""
    c = _config("float32").replace(**options)
    shapes = jax.eval_shape(model.init, key, c)           # shapes and dtypes: nothing compiled or drawn
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    # Shapes and dtypes only: eval_shape traces Flax's init without running it.
    flax_vars = jax.eval_shape(lambda: ref.FlaxLM(c).init(key, jnp.zeros((1, 4), jnp.int32)))
    converted = ref.to_flax_model(params, c)
    assert jax.tree.structure(converted) == jax.tree.structure(flax_vars)
    for ours, theirs in zip(jax.tree.leaves(converted), jax.tree.leaves(flax_vars)):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    n = model.count_params(params)
    assert n == sum(math.prod(a.shape) for a in jax.tree.leaves(flax_vars))
    marked = jax.tree.unflatten(jax.tree.structure(params),
                                [np.full(a.shape, i, np.int32) for i, a in enumerate(jax.tree.leaves(params))])
    flat = np.concatenate([np.ravel(a) for a in jax.tree.leaves(ref.to_flax_model(marked, c))])
    counts = np.bincount(flat, minlength=len(jax.tree.leaves(params)))
    assert counts.tolist() == [a.size for a in jax.tree.leaves(params)]


def test_converter_maps_attention_heads_to_flax_layout():
    """Column h*K + k of our Q block is Flax's query kernel [:, h, k] (hand-built example)."""
    d, h = 4, 2
    w = jnp.arange(d * 3 * d, dtype=jnp.float32).reshape(d, 3 * d)
    p = {"qkv": {"w": w, "b": jnp.arange(3 * d, dtype=jnp.float32)},
         "out": {"w": jnp.zeros((d, d)), "b": jnp.zeros((d,))}}
    mha = ref.to_flax_attention(p, h)["mha"]
    assert float(mha["query"]["kernel"][1, 1, 0]) == float(w[1, 2])      # head 1, k 0 -> column 2
    assert float(mha["key"]["kernel"][0, 0, 1]) == float(w[0, d + 1])
    assert float(mha["value"]["bias"][1, 1]) == float(2 * d + 3)


def test_sinusoidal_reference_table_by_hand():
    """Independent check of the reference table itself at a few hand-computed points."""
    import math
    pe = ref.sinusoidal_table(3, 4)
    assert pe[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert math.isclose(pe[2, 0], math.sin(2.0)) and math.isclose(pe[2, 3], math.cos(2 / 100.0))
