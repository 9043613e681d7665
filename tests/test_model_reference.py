"""The model against two references written apart from it: the same architecture built
from Flax's layers (`tests/flax_reference.py`: logits, loss, every gradient and one
Adam update, float32 to 1e-5 of each value's scale, float64 to 1e-10), and the model
written from the formulas in plain NumPy float64 (`tests/numpy_model.py`: logits to
1e-12 of their scale). Then checks of the Flax reference itself: its converter places
every parameter once, heads as Flax lays them out, its sinusoid table by hand.
(Each layer against Flax is in test_layers.py; greedy generation against the NumPy
model in test_generate.py.)
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitx_fn import defaults, model, train
from minitx_fn.config import ModelConfig
from tests import flax_reference as ref
from tests import numpy_model
from tests.helpers import assert_close_scaled, enable_x64, standard_promotion


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
        c = ref.reference_config(dtype).replace(attention=impl, attention_block=block, remat=remat, **options)
        tol = ref.TOLERANCE[dtype]
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
        ref.compare_grads_and_adam_step(params, grads, fvars, flax_grads, to_flax, tol, c.positions == "rotary")


@pytest.mark.parametrize("options", [{}, GPT2, LLAMA, QWEN2], ids=["sinusoidal-untied", "learned-tied", "llama",
                                                                   "qwen2"])
def test_converter_places_every_parameter_once(key, options):
    """The converter is a bijection on leaves: Flax's tree has the same number of
    values, and marking each of our leaves with its index shows up exactly once."""
    c = ref.reference_config("float32").replace(**options)
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


# ----------------------------------------------------------------------------- the NumPy model


NUMPY_LLAMA = {**defaults.ARCHS["llama"], "n_kv_heads": 2}


@pytest.mark.parametrize("d_model, n_heads, max_len, t, attention_block, impl, options", [
    (12, 3, 16, 1, 128, "einsum", {}),                  # one token
    (12, 3, 16, 16, 128, "einsum", {}),                 # T = max_len, one attention block
    (12, 3, 16, 16, 5, "einsum", {}),                   # blocks of 5, 5, 5, 1 query rows
    (9, 3, 12, 7, 3, "einsum", {}),                     # odd width: the sinusoid table's last pair is cut
    (10, 5, 8, 8, 0, "einsum", {}),                     # the whole score matrix at once, K = 2
    (12, 3, 16, 11, 4, "dot_product_attention", {}),
    (12, 3, 16, 16, 5, "einsum", {"positions": "learned", "tie_embeddings": True}),   # GPT-2's choices
    (16, 4, 16, 13, 5, "einsum", NUMPY_LLAMA),          # Llama's: rotary, RMSNorm, SwiGLU, 2 key/value heads
    (16, 4, 16, 9, 4, "einsum", {**NUMPY_LLAMA, "n_kv_heads": 1, "qkv_bias": True, "tie_embeddings": True}),
])
def test_model_apply_equals_the_numpy_model(d_model, n_heads, max_len, t, attention_block, impl, options, key):
    with enable_x64():
        cfg = ModelConfig(vocab_size=13, d_model=d_model, n_heads=n_heads, n_layers=3, max_len=max_len,
                          attention_block=attention_block, attention=impl, dtype="float64", param_dtype="float64",
                          init_std=0.3, **options)
        params = model.init(key, cfg)
        tokens = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (2, t), 0, cfg.vocab_size))
        ours = np.asarray(jax.jit(model.apply, static_argnames="config")(params, tokens, config=cfg))
    host = jax.device_get(params)
    # jax.nn.dot_product_attention computes its softmax in float32, whatever the input.
    tol = 1e-12 if impl == "einsum" else 1e-6
    for row in range(2):
        expected = numpy_model.logits(host, tokens[row], n_heads=n_heads, **numpy_model.config_args(cfg))
        assert np.abs(ours[row] - expected).max() <= tol * np.abs(expected).max()
