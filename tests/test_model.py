"""The language model: properties, compilation behaviour and bad input."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import model, train
from minitx_fn.config import ModelConfig
from minitx_fn.layers import block
from tests.helpers import assert_close_scaled

CFG = ModelConfig(vocab_size=13, d_model=16, n_heads=2, n_layers=2, max_len=12, init_std=0.3)
PARAMS = model.init(jax.random.key(7), CFG)
apply_jit = jax.jit(model.apply, static_argnames="config")


def test_param_tree_shapes():
    L, D, F, V = 2, 16, 64, 13
    expected = {
        "embed": {"table": (V, D)},
        "blocks": {"ln1": {"scale": (L, D), "bias": (L, D)}, "ln2": {"scale": (L, D), "bias": (L, D)},
                   "attn": {"qkv": {"w": (L, D, 3 * D), "b": (L, 3 * D)}, "out": {"w": (L, D, D), "b": (L, D)}},
                   "mlp": {"up": {"w": (L, D, F), "b": (L, F)}, "down": {"w": (L, F, D), "b": (L, D)}}},
        "ln_f": {"scale": (D,), "bias": (D,)},
        "head": {"w": (D, V), "b": (V,)},
    }
    assert model.param_shapes(PARAMS) == expected
    assert model.count_params(PARAMS) == sum(math.prod(s) for s in jax.tree.leaves(
        expected, is_leaf=lambda x: isinstance(x, tuple)))


def test_learned_positions_and_tied_head_change_only_their_parameters(key):
    """positions="learned" adds one (S, D) table "pos"; tie_embeddings drops "head";
    every other leaf is drawn as before, so the options share the rest of the tree."""
    gpt2 = CFG.replace(positions="learned", tie_embeddings=True)
    params = model.init(jax.random.key(7), gpt2)
    shapes = model.param_shapes(params)
    assert shapes["pos"] == {"table": (CFG.max_len, CFG.d_model)} and "head" not in shapes
    assert {k: v for k, v in shapes.items() if k != "pos"} == {
        k: v for k, v in model.param_shapes(PARAMS).items() if k != "head"}
    for name in ("embed", "blocks", "ln_f"):
        chex.assert_trees_all_equal(params[name], PARAMS[name])
    assert float(jnp.std(params["pos"]["table"])) == pytest.approx(gpt2.init_std, rel=0.2)


def test_learned_positions_and_tied_head_by_hand(rng):
    """The learned model is written out with the layers: the position table's rows
    added to the tokens' rows, and the logits are LayerNorm(x) @ E^T with no bias."""
    gpt2 = CFG.replace(positions="learned", tie_embeddings=True)
    params = model.init(jax.random.key(3), gpt2.replace(init_std=0.3))
    tokens = rng.integers(0, CFG.vocab_size, (2, 6)).astype(np.int32)
    from minitx_fn.layers import norm

    x = params["embed"]["table"][tokens] + params["pos"]["table"][:6][None]
    for i in range(CFG.n_layers):
        x = block.apply(jax.tree.map(lambda a, i=i: a[i], params["blocks"]), x, gpt2.block_spec)
    expected = norm.apply(params["ln_f"], x) @ params["embed"]["table"].T
    np.testing.assert_allclose(apply_jit(params, tokens, config=gpt2), expected, rtol=1e-5, atol=1e-5)


def test_scan_equals_blocks_one_by_one(rng):
    """lax.scan over the stacked blocks = applying block 0, then block 1, by hand."""
    tokens = rng.integers(0, CFG.vocab_size, (2, 6)).astype(np.int32)
    from minitx_fn.layers import embedding, linear, norm, positional

    @jax.jit
    def by_hand(params, tokens):
        x = embedding.apply(params["embed"], tokens) + positional.table(6, CFG.d_model)[None]
        for i in range(CFG.n_layers):
            x = block.apply(jax.tree.map(lambda a, i=i: a[i], params["blocks"]), x, CFG.block_spec)
        return linear.apply(params["head"], norm.apply(params["ln_f"], x))

    np.testing.assert_allclose(apply_jit(PARAMS, tokens, config=CFG), by_hand(PARAMS, tokens), rtol=1e-5, atol=1e-5)


@given(t=st.sampled_from([4, 12]), seed=st.integers(0, 2**31 - 1))
def test_without_positions_order_shows_only_through_the_causal_mask(t, seed):
    """positions="none", one layer: a query sees the set of its keys, so swapping the
    first two tokens changes no logit from position 2 on (and does change them with
    positions). A second layer would see them apart: the outputs at positions 0 and 1
    differ by what each could read."""
    tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, (1, t)).astype(np.int32)
    while tokens[0, 0] == tokens[0, 1]:
        tokens[0, 1] = (tokens[0, 1] + 1) % CFG.vocab_size
    swapped = tokens.copy()
    swapped[0, :2] = tokens[0, 1::-1]
    one = CFG.replace(n_layers=1)
    params = model.init(jax.random.key(7), one)
    none = one.replace(positions="none")
    assert model.param_shapes(model.init(jax.random.key(7), none)) == model.param_shapes(params)
    assert_close_scaled(apply_jit(params, tokens, config=none)[:, 2:], apply_jit(params, swapped, config=none)[:, 2:],
                        1e-5, floor=1.0)
    assert not np.allclose(apply_jit(params, tokens, config=one)[:, 2:], apply_jit(params, swapped, config=one)[:, 2:],
                           atol=1e-4)


def test_a_model_without_its_vocabulary_yet_says_so():
    with pytest.raises(ValueError, match="vocab_size=None is not set"):
        ModelConfig(d_model=8, n_heads=2).init(jax.random.key(0))


@given(t=st.sampled_from([4, 12]), cut=st.integers(0, 11), seed=st.integers(0, 2**31 - 1))
def test_future_tokens_never_change_past_logits(t, cut, seed):
    cut = cut % t
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (2, t)).astype(np.int32)
    changed = tokens.copy()
    changed[:, cut + 1:] = rng.integers(0, CFG.vocab_size, (2, t - cut - 1))
    a, b = apply_jit(PARAMS, tokens, config=CFG), apply_jit(PARAMS, changed, config=CFG)
    assert_close_scaled(a[:, :cut + 1], b[:, :cut + 1], 1e-5, floor=1.0)


@given(b=st.sampled_from([1, 3]), t=st.sampled_from([1, 5, 12]), seed=st.integers(0, 2**31 - 1))
def test_any_batch_and_length_up_to_max_len(b, t, seed):
    tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
    logits = apply_jit(PARAMS, tokens, config=CFG)
    chex.assert_shape(logits, (b, t, CFG.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    # Rows are independent: each row alone gives the same logits.
    assert_close_scaled(apply_jit(PARAMS, tokens[:1], config=CFG), logits[:1], 1e-5, floor=1.0)


@given(v=st.sampled_from([2, 13, 65]), seed=st.integers(0, 2**31 - 1))
def test_loss_of_uniform_logits_is_log_v(v, seed):
    targets = np.random.default_rng(seed).integers(0, v, (2, 5)).astype(np.int32)
    np.testing.assert_allclose(jax.jit(train.cross_entropy)(np.zeros((2, 5, v), np.float32), targets), math.log(v),
                               rtol=1e-6)


def test_cross_entropy_by_hand():
    """logits [0, ln 3] -> p = [1/4, 3/4]; targets 1 and 0 -> mean(-ln 3/4, -ln 1/4)."""
    logits = jnp.array([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    np.testing.assert_allclose(train.cross_entropy(logits, jnp.array([[1, 0]])), expected, rtol=1e-6)


def test_jitted_model_compiles_once_per_shape(rng):
    traces = []

    def forward(params, tokens, *, config):   # a fresh function: its own jit cache
        traces.append(tokens.shape)           # runs only while tracing
        return model.apply(params, tokens, config=config)

    f = jax.jit(forward, static_argnames="config")
    tokens = rng.integers(0, CFG.vocab_size, (2, 8)).astype(np.int32)
    f(PARAMS, tokens, config=CFG).block_until_ready()
    f(PARAMS, (tokens + 1) % CFG.vocab_size, config=CFG).block_until_ready()
    f(PARAMS, tokens, config=ModelConfig(**CFG.to_dict())).block_until_ready()   # equal config, new object
    assert len(traces) == 1
    f(PARAMS, tokens[:, :4], config=CFG)
    assert len(traces) == 2                                               # a new shape does compile


# ----------------------------------------------------------------------------- bad input


def test_token_ids_outside_vocabulary_are_named():
    with pytest.raises(ValueError, match=r"\[0, 13\).*\[13, 20\]"):
        model.apply(PARAMS, jnp.array([[1, 13, 20]]), config=CFG)
    with pytest.raises(ValueError, match=r"-1"):
        model.apply(PARAMS, jnp.array([[-1, 2]]), config=CFG)


def test_sequence_longer_than_context_is_refused_at_trace_time():
    with pytest.raises(ValueError, match=r"T=13 exceeds the context window max_len=12"):
        jax.eval_shape(lambda t: model.apply(PARAMS, t, config=CFG), jax.ShapeDtypeStruct((1, 13), jnp.int32))


@pytest.mark.parametrize("shape", [(5,), (1, 2, 3)])
def test_wrong_rank_is_refused_at_trace_time(shape):
    with pytest.raises(ValueError, match=rf"shape \(B, T\), got shape {re_tuple(shape)}"):
        jax.eval_shape(lambda t: model.apply(PARAMS, t, config=CFG), jax.ShapeDtypeStruct(shape, jnp.int32))


def re_tuple(shape) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_float_tokens_are_refused_at_trace_time():
    with pytest.raises(TypeError, match="integer ids, got dtype float32"):
        jax.eval_shape(lambda t: model.apply(PARAMS, t, config=CFG), jax.ShapeDtypeStruct((1, 3), jnp.float32))


def test_bfloat16_compute_keeps_float32_parameters_softmax_logits_and_loss(key, rng):
    """dtype="bfloat16": matmuls in bfloat16, everything delicate in float32.

    The loss and the gradient direction must match the float32 model's to bfloat16
    precision (8 bits of mantissa), gradients and updated parameters stay float32.
    """
    from minitx_fn.config import TrainConfig
    from minitx_fn.layers import attention
    from tests.helpers import standard_promotion

    c32 = ModelConfig(vocab_size=13, d_model=32, n_heads=4, n_layers=2, max_len=16, attention_block=4,
                      init_std=0.1)
    c16 = c32.replace(dtype="bfloat16")
    params = model.init(key, c32)
    data = rng.integers(0, 13, (4, 17)).astype(np.int32)
    x, y = data[:, :-1], data[:, 1:]
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, x, y, config: train.cross_entropy(config.apply(p, x), y)),
                             static_argnames="config")
    logits = apply_jit(params, x, config=c16)
    chex.assert_type(logits, jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 5, 2, 4)), jnp.bfloat16)
    chex.assert_type(attention.attention_weights(q, q, attention.causal_mask(5)[None, None]), jnp.float32)

    (loss16, g16), (loss32, g32) = (value_and_grad(params, x, y, config=c) for c in (c16, c32))
    chex.assert_type([loss16, *jax.tree.leaves(g16)], jnp.float32)
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    flat16, flat32 = (jnp.concatenate([a.ravel() for a in jax.tree.leaves(g)]) for g in (g16, g32))
    cosine = float(flat16 @ flat32 / (jnp.linalg.norm(flat16) * jnp.linalg.norm(flat32)))
    assert cosine > 0.99, cosine

    tc = TrainConfig(steps=3, batch_size=4, optimizer={"warmup": 0})
    with standard_promotion():                                       # optax is not strict-promotion clean
        state, metrics = train.train_step(train.init_state(key, c16, tc.optimizer), (x, y), model=c16,
                                          optimizer_config=tc.optimizer)
    chex.assert_type([*jax.tree.leaves(state.params), metrics["loss"]], jnp.float32)
    assert np.isfinite(float(metrics["loss"]))


def test_attention_maps_match_the_attention_layer(key):
    """The maps are the weights the forward pass uses: layer 0 checked by hand."""
    from minitx_fn.config import ModelConfig
    from minitx_fn.layers import attention, embedding, norm, positional
    cfg = ModelConfig(vocab_size=7, d_model=8, n_heads=2, n_layers=2, init_std=0.3)
    params = model.init(key, cfg)
    tokens = jax.random.randint(key, (1, 5), 0, 7)
    x = embedding.apply(params["embed"], tokens) + positional.table(5, 8)[None]
    layer0 = jax.tree.map(lambda a: a[0], params["blocks"])
    q, k, _ = attention.project_qkv(layer0["attn"], norm.apply(layer0["ln1"], x), cfg.attention_spec)
    expected = attention.attention_weights(q, k, attention.causal_mask(5)[None, None])
    np.testing.assert_allclose(model.attention_maps(params, tokens, config=cfg)[0], expected, rtol=1e-6)
