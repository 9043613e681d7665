"""Every layer: the init/apply contract (chex, including jit == no jit),
mathematical properties (hypothesis), and outputs, gradients and one Adam update
equal to the same layer built from Flax's (`tests/flax_reference.py`), in float32
(to 1e-5 of each value's scale) and float64 (1e-10).

Property inputs come from NumPy's generator, seeded by hypothesis, and each layer
runs under one jitted wrapper per shape: a fresh shape in eager mode would compile
every operation (and every jax.random draw) on its own."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minitx_fn import defaults, model, testing
from minitx_fn.config import AttentionSpec, BlockSpec, ModelConfig, RopeScaling
from minitx_fn.layers import (attention, block, dropout, embedding, feedforward, linear, norm, positional, rmsnorm,
                              rotary, swiglu)
from tests import flax_reference as ref
from tests.flax_reference import sinusoidal_table
from tests.helpers import assert_close_scaled, check_layer, enable_x64, standard_promotion

# Small sets of sizes, so the compiled functions are reused across examples.
WIDTHS = st.sampled_from([4, 8, 12])
LENGTHS = st.sampled_from([1, 3, 8])
BATCHES = st.sampled_from([1, 2])
SEEDS = st.integers(0, 2**31 - 1)

linear_apply = jax.jit(linear.apply)
norm_apply = jax.jit(norm.apply, static_argnames="eps")
feedforward_apply = jax.jit(feedforward.apply)
attention_weights = jax.jit(attention.attention_weights)
scaled_dot_product = jax.jit(attention.scaled_dot_product, static_argnames="impl")
causal_blockwise = jax.jit(attention.causal_blockwise, static_argnames=("block", "impl"))


def normal(seed: int, *shape, scale: float = 1.0) -> np.ndarray:
    """float32 standard normal draws from NumPy (no JAX compilation)."""
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("d_in, d_out", [(3, 5), (8, 8)])
def test_linear_contract(key, rng, d_in, d_out):
    x = rng.standard_normal((2, 4, d_in), np.float32)
    check_layer(lambda: linear.init(key, d_in=d_in, d_out=d_out), linear.apply,
                expected_shapes={"w": (d_in, d_out), "b": (d_out,)}, x=x, out_shape=(2, 4, d_out))


@pytest.mark.parametrize("v, d", [(5, 4), (65, 16)])
def test_embedding_contract(key, rng, v, d):
    ids = rng.integers(0, v, (3, 7)).astype(np.int32)
    check_layer(lambda: embedding.init(key, vocab_size=v, d_model=d), embedding.apply,
                expected_shapes={"table": (v, d)}, x=ids, out_shape=(3, 7, d))


@pytest.mark.parametrize("d", [4, 16])
def test_norm_contract(rng, d):
    check_layer(lambda: norm.init(d_model=d), norm.apply, expected_shapes={"scale": (d,), "bias": (d,)},
                x=rng.standard_normal((2, 3, d), np.float32), out_shape=(2, 3, d))


@pytest.mark.parametrize("d, f", [(4, 16), (8, 12)])
def test_feedforward_contract(key, rng, d, f):
    shapes = {"up": {"w": (d, f), "b": (f,)}, "down": {"w": (f, d), "b": (d,)}}
    check_layer(lambda: feedforward.init(key, d_model=d, d_ff=f), feedforward.apply,
                expected_shapes=shapes, x=rng.standard_normal((2, 3, d), np.float32), out_shape=(2, 3, d))


@pytest.mark.parametrize("d", [4, 16])
def test_rmsnorm_contract(rng, d):
    check_layer(lambda: rmsnorm.init(d_model=d), rmsnorm.apply, expected_shapes={"scale": (d,)},
                x=rng.standard_normal((2, 3, d), np.float32), out_shape=(2, 3, d))


@pytest.mark.parametrize("d, f, bias", [(4, 12, True), (8, 24, False)])
def test_swiglu_contract(key, rng, d, f, bias):
    b = lambda n: {"b": (n,)} if bias else {}  # noqa: E731
    shapes = {"gate": {"w": (d, f), **b(f)}, "up": {"w": (d, f), **b(f)}, "down": {"w": (f, d), **b(d)}}
    check_layer(lambda: swiglu.init(key, d_model=d, d_ff=f, bias=bias), swiglu.apply,
                expected_shapes=shapes, x=rng.standard_normal((2, 3, d), np.float32), out_shape=(2, 3, d))


@pytest.mark.parametrize("d, h, g", [(8, 4, 2), (12, 3, 1)])
def test_grouped_attention_contract(key, rng, d, h, g):
    k = d // h
    shapes = {"qkv": {"w": (d, (h + 2 * g) * k)}, "out": {"w": (d, d)}}
    spec = AttentionSpec(n_heads=h, n_kv_heads=g, bias=False, rope_theta=10000.0)
    check_layer(lambda: attention.init(key, spec, d_model=d), lambda p, x: attention.apply(p, x, spec),
                expected_shapes=shapes, x=rng.standard_normal((2, 5, d), np.float32), out_shape=(2, 5, d))


@pytest.mark.parametrize("d, h", [(8, 2), (12, 3)])
def test_attention_contract(key, rng, d, h):
    shapes = {"qkv": {"w": (d, 3 * d), "b": (3 * d,)}, "out": {"w": (d, d), "b": (d,)}}
    spec = AttentionSpec(n_heads=h)
    check_layer(lambda: attention.init(key, spec, d_model=d), lambda p, x: attention.apply(p, x, spec),
                expected_shapes=shapes, x=rng.standard_normal((2, 5, d), np.float32), out_shape=(2, 5, d))


@pytest.mark.parametrize("cfg", [ModelConfig(vocab_size=5, d_model=8, n_heads=2),
                                 ModelConfig(vocab_size=5, d_model=12, n_heads=3, d_ff=20)])
def test_block_contract(key, rng, cfg):
    d, f = cfg.d_model, cfg.d_ff
    shapes = {"ln1": {"scale": (d,), "bias": (d,)}, "ln2": {"scale": (d,), "bias": (d,)},
              "attn": {"qkv": {"w": (d, 3 * d), "b": (3 * d,)}, "out": {"w": (d, d), "b": (d,)}},
              "mlp": {"up": {"w": (d, f), "b": (f,)}, "down": {"w": (f, d), "b": (d,)}}}
    check_layer(lambda: block.init(key, cfg.block_spec, d_model=d, d_ff=f),
                lambda p, x: block.apply(p, x, cfg.block_spec),
                expected_shapes=shapes, x=rng.standard_normal((2, 5, d), np.float32), out_shape=(2, 5, d))


def test_bfloat16_compute_keeps_float32_outputs(key, rng):
    """Matmuls in bfloat16; layer norm, residual stream and logits stay float32."""
    cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, dtype="bfloat16")
    p = block.init(key, cfg.block_spec, d_model=8, d_ff=32)
    x = rng.standard_normal((2, 5, 8), np.float32)
    y = block.apply(p, x, cfg.block_spec)
    chex.assert_type(y, jnp.float32)
    y32 = block.apply(p, x, cfg.replace(dtype="float32").block_spec)
    np.testing.assert_allclose(y, y32, atol=5e-2)          # bfloat16 has 8 bits of mantissa


# ----------------------------------------------------------------------------- properties


@given(d_in=WIDTHS, d_out=WIDTHS, seed=SEEDS, a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_linear_is_affine(d_in, d_out, seed, a, b):
    """f(a x + b y) - f(0) = a (f(x) - f(0)) + b (f(y) - f(0))."""
    p = {"w": normal(seed, d_in, d_out), "b": normal(seed + 1, d_out)}
    x, y = normal(seed + 2, 2, 3, d_in)
    f0 = linear_apply(p, np.zeros((3, d_in), np.float32))
    lhs = linear_apply(p, a * x + b * y) - f0
    rhs = a * (linear_apply(p, x) - f0) + b * (linear_apply(p, y) - f0)
    np.testing.assert_allclose(lhs, rhs, atol=1e-4 * (1 + abs(a) + abs(b)) * d_in)


@given(v=st.sampled_from([3, 10]), d=WIDTHS, t=LENGTHS, seed=SEEDS)
def test_embedding_is_one_hot_times_table(v, d, t, seed):
    p = {"table": normal(seed, v, d)}
    ids = np.random.default_rng(seed).integers(0, v, (2, t)).astype(np.int32)
    expected = np.eye(v)[ids] @ p["table"].astype(np.float64)                     # one_hot(ids) @ table
    np.testing.assert_allclose(jax.jit(embedding.apply)(p, ids), expected, rtol=1e-6, atol=1e-6)


@given(v=st.sampled_from([3, 10]), d=WIDTHS, t=LENGTHS, seed=SEEDS)
def test_embedding_attend_scores_every_row(v, d, t, seed):
    """attend(x)[..., v] = <x, table[v]>, in float64 by numpy; and the tied head is the
    transpose of the lookup: <one_hot(i), attend(x)> = <embedding(i), x>."""
    p = {"table": normal(seed, v, d)}
    x = normal(seed + 1, 2, t, d)
    scores = jax.jit(embedding.attend)(p, x)
    chex.assert_shape(scores, (2, t, v))
    np.testing.assert_allclose(scores, x.astype(np.float64) @ p["table"].astype(np.float64).T, rtol=1e-5,
                               atol=1e-5 * d)
    ids = np.random.default_rng(seed).integers(0, v, (2, t)).astype(np.int32)
    lhs = np.take_along_axis(np.asarray(scores), ids[..., None], -1)[..., 0]
    rhs = (np.asarray(embedding.apply(p, ids)) * x).sum(-1)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5 * d)


@given(length=st.sampled_from([1, 7, 50]), d=st.sampled_from([2, 5, 16, 64]), start=st.sampled_from([0, 1000]))
def test_positional_matches_formula_and_is_bounded(length, d, start):
    """Equals the paper's formula evaluated in numpy float64; all entries in [-1, 1]."""
    pe = np.asarray(jax.jit(positional.encode, static_argnums=1)(np.arange(start, start + length), d))
    assert pe.shape == (length, d)
    assert np.all(np.abs(pe) <= 1.0)
    expected = sinusoidal_table(start + length, d)[start:]
    np.testing.assert_allclose(pe, expected, atol=2e-4 if start else 2e-6)  # float32 angles near 1000


def test_positional_by_hand():
    """Position 1, D = 4: [sin 1, cos 1, sin(1/100), cos(1/100)]."""
    np.testing.assert_allclose(positional.table(2, 4)[1],
                               [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)], rtol=1e-6)


@given(d=WIDTHS, t=LENGTHS, seed=SEEDS, shift=st.floats(-10, 10), scale=st.floats(0.1, 10))
def test_norm_standardises_and_ignores_shift_and_scale(d, t, seed, shift, scale):
    x = normal(seed, 2, t, d, scale=2.0) + 1.0
    p = norm.init(d_model=d)
    y = np.asarray(norm_apply(p, x, eps=1e-6))
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1.0, atol=1e-3)
    np.testing.assert_allclose(norm_apply(p, np.float32(scale) * x + np.float32(shift), eps=1e-6), y, atol=1e-3)


@given(d=WIDTHS, t=st.sampled_from([3, 8]), seed=SEEDS, pos=st.integers(0, 7))
def test_feedforward_acts_on_each_position_alone(d, t, seed, pos):
    """Changing the input at one position changes the output there and nowhere else."""
    pos = pos % t
    p = {"up": {"w": normal(seed, d, 2 * d, scale=0.5), "b": normal(seed + 1, 2 * d)},
         "down": {"w": normal(seed + 2, 2 * d, d, scale=0.5), "b": normal(seed + 3, d)}}
    x = normal(seed + 4, 2, t, d)
    x2 = x.copy()
    x2[:, pos] = normal(seed + 5, 2, d)
    y, y2 = np.asarray(feedforward_apply(p, x)), np.asarray(feedforward_apply(p, x2))
    others = np.arange(t) != pos
    np.testing.assert_array_equal(y[:, others], y2[:, others])
    # And equals the layer applied to that position alone.
    assert_close_scaled(feedforward_apply(p, x[:, pos:pos + 1])[:, 0], y[:, pos], 1e-5, floor=1.0)


@given(h=st.sampled_from([1, 2]), t=LENGTHS, seed=SEEDS)
def test_attention_weights_are_causal_distributions(h, t, seed):
    """Rows sum to one and are zero above the diagonal."""
    q, k = normal(seed, 2, 2, t, h, 4, scale=3.0)
    w = np.asarray(attention_weights(q, k, attention.causal_mask(t)[None, None]))
    assert w.shape == (2, h, t, t)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert np.all(w[..., np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] == 0.0)
    assert np.all(w >= 0)


def test_causal_mask_by_hand():
    np.testing.assert_array_equal(attention.causal_mask(2, 4, offset=1),
                                  [[True, True, False, False], [True, True, True, False]])


def test_attention_first_position_returns_its_own_value_projection(key, rng):
    """Position 0 can only see itself: its output is out(v_0), a hand-checkable case."""
    p = attention.init(key, AttentionSpec(n_heads=2), d_model=8, std=0.5)
    x = rng.standard_normal((1, 4, 8), np.float32)
    v0 = linear.apply(p["qkv"], x[:, :1])[..., 16:]
    assert_close_scaled(attention.apply(p, x, AttentionSpec(n_heads=2))[:, 0], linear.apply(p["out"], v0)[:, 0], 1e-5,
                        floor=1.0)


@pytest.mark.parametrize("impl", ["dot_product_attention"])
def test_attention_impls_agree(key, rng, impl):
    p = attention.init(key, AttentionSpec(n_heads=3), d_model=12, std=0.5)
    x = rng.standard_normal((2, 9, 12), np.float32)
    mask = attention.causal_mask(9)[None, None] & (jnp.arange(9) >= 2)[None, None, None, :]
    for m in (None, mask):
        assert_close_scaled(attention.apply(p, x, AttentionSpec(n_heads=3, impl=impl), mask=m),
                            attention.apply(p, x, AttentionSpec(n_heads=3), mask=m), 1e-5, floor=1.0)


@given(t=LENGTHS, block=st.sampled_from([0, 1, 2, 3, 8]), impl=st.sampled_from(["einsum", "dot_product_attention"]),
       seed=SEEDS)
def test_causal_blockwise_equals_the_whole_score_matrix(t, block, impl, seed):
    """Skipping the masked key blocks changes nothing but rounding, for every block
    size, dividing T or not (ragged last block), larger than T or 0 (one block)."""
    q, k, v = normal(seed, 3, 2, t, 2, 4, scale=2.0)
    whole = scaled_dot_product(q, k, v, attention.causal_mask(t)[None, None], impl=impl)
    assert_close_scaled(causal_blockwise(q, k, v, block=block, impl=impl), whole, 1e-5, floor=1.0)


@given(t=st.integers(1, 40), block=st.integers(0, 12))
def test_query_blocks_tile_the_rows_in_order(t, block):
    spans = attention.query_blocks(t, block)
    assert spans[0][0] == 0 and spans[-1][1] == t
    assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))           # contiguous
    assert all(0 < b - a <= (block or t) for a, b in spans)
    assert len(spans) == (math.ceil(t / block) if block else 1)


def test_split_and_merge_heads_are_inverse(rng):
    x = rng.standard_normal((2, 3, 12), np.float32)
    h = attention.split_heads(x, 3)
    assert h.shape == (2, 3, 3, 4)
    np.testing.assert_array_equal(h[0, 1, 2], x[0, 1, 8:12])     # head 2 = features 8..11
    np.testing.assert_array_equal(attention.merge_heads(h), x)


# ----------------------------------------------------------------------------- dropout


@given(rate=st.sampled_from([0.1, 0.5, 0.9]), seed=SEEDS)
def test_dropout_keeps_a_binomial_fraction_scaled_by_one_over_keep(rate, seed):
    """Of n entries, the kept count is Binomial(n, 1 - p): within 6 standard deviations.
    Kept entries are x / (1 - p), dropped ones 0, and the whole equals an independently
    written x * mask / (1 - p) with the mask drawn from the same key."""
    n = 20_000
    x = normal(seed, n) + 3.0                              # no zeros of its own
    key = jax.random.key(seed)
    y = np.asarray(jax.jit(dropout.apply, static_argnames="rate")(x, rate=rate, key=key))
    kept = y != 0
    sd = math.sqrt(n * rate * (1 - rate))
    assert abs(kept.sum() - n * (1 - rate)) <= 6 * sd
    np.testing.assert_allclose(y[kept], x[kept] / (1 - rate), rtol=1e-6)
    mask = np.asarray(jax.random.bernoulli(key, 1 - rate, x.shape))
    np.testing.assert_allclose(y, x * mask / (1 - rate), rtol=1e-6)


def test_dropout_without_a_key_or_at_rate_zero_is_the_identity(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    assert dropout.apply(x, rate=0.5, key=None) is x
    assert dropout.apply(x, rate=0.0, key=jax.random.key(0)) is x


def test_attention_dropout_drops_weights_not_rows(key, rng):
    """Dropped attention weights: each output row mixes fewer values, so outputs change,
    but a rate-0 key changes nothing."""
    p = attention.init(key, AttentionSpec(n_heads=2), d_model=8, std=0.5)
    x = rng.standard_normal((2, 6, 8)).astype(np.float32)
    plain = attention.apply(p, x, AttentionSpec(n_heads=2))
    np.testing.assert_array_equal(attention.apply(p, x, AttentionSpec(n_heads=2, dropout=0.0), key=key), plain)
    assert not np.allclose(attention.apply(p, x, AttentionSpec(n_heads=2, dropout=0.5), key=key), plain)


# ----------------------------------------------------------------------------- Llama's layers

DTYPES = testing.dtypes()
TOL = {"float32": 1e-5, "float64": 1e-12}
rotary_apply = jax.jit(rotary.apply, static_argnames=("rope_theta", "scaling"))
# Scaled rotary positions (config.RopeScaling): one of each kind, factor 1 included.
SCALINGS = st.sampled_from([None, RopeScaling(kind="linear", factor=4.0),
                            RopeScaling(kind="llama3", factor=8.0, original_max_len=64),
                            RopeScaling(kind="yarn", factor=4.0, original_max_len=32),
                            RopeScaling(kind="yarn", factor=1.0, original_max_len=32, beta_fast=8.0, truncate=False)])
rmsnorm_apply = jax.jit(rmsnorm.apply, static_argnames="eps")


def _precision(dtype: str):
    return enable_x64() if dtype == "float64" else contextlib.nullcontext()


@given(head=st.sampled_from([2, 8]), m=st.integers(0, 2000), n=st.integers(0, 2000), shift=st.integers(-500, 500),
       theta=st.sampled_from([100.0, 10000.0, 1e6]), scaling=SCALINGS, dtype=DTYPES, seed=SEEDS)
def test_rotary_scores_depend_only_on_the_offset_and_rotation_keeps_lengths(head, m, n, shift, theta, scaling, dtype,
                                                                            seed):
    """q turned to position m and k to n: q_m . k_n = q_{m+s} . k_{n+s} for any shift s
    (with both positions >= 0), and |R_m q| = |q|. At position 0 nothing turns. Scaled
    positions keep both (YaRN's lengths times its attention_factor)."""
    shift = max(shift, -min(m, n))
    stretch = scaling.attention_factor if scaling and scaling.attention_factor else 1.0
    with _precision(dtype):
        q, k = (jnp.asarray(normal(seed + i, 1, 1, 1, head), dtype) for i in (0, 1))   # (B, T, H, K) = 1, 1, 1, K
        turn = lambda x, p: rotary_apply(x, jnp.array([[p]], jnp.int32), rope_theta=theta,  # noqa: E731
                                         scaling=scaling)[0, 0, 0] / stretch
        score = float(jnp.dot(turn(q, m), turn(k, n)))
        moved = float(jnp.dot(turn(q, m + shift), turn(k, n + shift)))
        # An angle of 2,500 radians carries float32 rounding of about 2500 * 6e-8 into the sines.
        tol = {"float32": 2e-3, "float64": 1e-9}[dtype] * float(jnp.linalg.norm(q) * jnp.linalg.norm(k))
        assert abs(score - moved) <= tol
        np.testing.assert_allclose(float(jnp.linalg.norm(turn(q, m))), float(jnp.linalg.norm(q)), rtol=TOL[dtype])
        np.testing.assert_allclose(turn(q, 0), q[0, 0, 0], rtol=TOL[dtype])


def _turns(head: int, theta: float, original: int) -> np.ndarray:
    """How often each pair turns over `original` positions, unscaled: original theta_i / (2 pi)."""
    return original * theta ** (-2 * np.arange(head // 2) / head) / (2 * math.pi)


@settings(max_examples=50)       # no compiling: cheap enough for many draws
@given(head=st.sampled_from([16, 64, 128]), theta=st.sampled_from([1e4, 5e5]), factor=st.sampled_from([1.0, 2.0, 8.0]),
       original=st.sampled_from([512, 4096]), low_high=st.sampled_from([(1.0, 4.0), (2.0, 3.0)]),
       fast_slow=st.sampled_from([(32.0, 1.0), (16.0, 2.0)]), dtype=DTYPES)
def test_scaled_rotary_frequencies_keep_fast_pairs_and_divide_slow_ones(head, theta, factor, original, low_high,
                                                                          fast_slow, dtype):
    """The laws of each scaling, from the papers' definitions (the numbers themselves
    are held against transformers in tests/test_llama.py): every frequency lies between
    theta_i / factor and theta_i, and slower pairs are divided at least as much; factor
    1 is no scaling; linear divides every pair; Llama 3.1 keeps pairs whose wavelength
    is below original / high_freq_factor and divides those above original /
    low_freq_factor; YaRN keeps pairs turning at least beta_fast times over the
    original context and divides those turning at most beta_slow times."""
    low, high = low_high
    fast, slow = fast_slow
    with _precision(dtype):
        base = np.asarray(rotary.frequencies(head, rope_theta=theta, dtype=getattr(jnp, dtype)))
        wavelength, turns = 2 * math.pi / base, _turns(head, theta, original)
        for s in (RopeScaling(kind="linear", factor=factor),
                  RopeScaling(kind="llama3", factor=factor, original_max_len=original, low_freq_factor=low,
                              high_freq_factor=high),
                  RopeScaling(kind="yarn", factor=factor, original_max_len=original, beta_fast=fast, beta_slow=slow)):
            ratio = np.asarray(rotary.frequencies(head, rope_theta=theta, scaling=s, dtype=getattr(jnp, dtype))) / base
            kept, divided = np.isclose(ratio, 1, rtol=TOL[dtype]), np.isclose(ratio, 1 / factor, rtol=TOL[dtype])
            assert np.all((ratio >= 1 / factor - TOL[dtype]) & (ratio <= 1 + TOL[dtype])), s
            assert np.all(np.diff(ratio) <= TOL[dtype]), s
            if factor == 1:
                assert kept.all(), s
            if s.kind == "linear":
                assert divided.all(), s
            elif s.kind == "llama3":
                assert kept[wavelength < original / high].all() and divided[wavelength > original / low].all(), s
            else:
                assert kept[turns >= fast].all() and divided[turns <= slow].all(), s
                assert s.attention_factor == pytest.approx(1 + 0.1 * math.log(factor))


def test_rotary_turns_the_pairs_of_the_rotate_half_layout_by_hand():
    """K = 4: pairs (x0, x2) and (x1, x3), turned by m and m / theta^(1/2) (theta = 100: m / 10)."""
    x = jnp.array([[[[1.0, 2.0, 3.0, 4.0]]]])
    y = np.asarray(rotary.apply(x, jnp.array([[5]]), rope_theta=100.0))[0, 0, 0]
    a, b = 5.0, 0.5
    expected = [math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
                3 * math.cos(a) + math.sin(a), 4 * math.cos(b) + 2 * math.sin(b)]
    np.testing.assert_allclose(y, expected, rtol=1e-6)


@given(d=WIDTHS, c=st.sampled_from([1e-3, 0.5, 7.0, 1e4]), dtype=DTYPES, seed=SEEDS)
def test_rmsnorm_ignores_a_positive_scale_and_is_layernorm_on_zero_mean_inputs(d, c, dtype, seed):
    """RMSNorm(c x) = RMSNorm(x) for c > 0 (eps far below the mean square), and on
    inputs of zero mean RMSNorm equals LayerNorm with the same scale and bias 0."""
    with _precision(dtype):
        x = jnp.asarray(normal(seed, 3, d) + 0.1, dtype)
        scale = jnp.asarray(1 + normal(seed + 1, d, scale=0.1), dtype)
        eps = 1e-30 if dtype == "float64" else 1e-20
        y = rmsnorm_apply({"scale": scale}, x, eps=eps)
        assert_close_scaled(rmsnorm_apply({"scale": scale}, c * x, eps=eps), y, TOL[dtype])
        centred = x - x.mean(axis=-1, keepdims=True)
        assert_close_scaled(rmsnorm_apply({"scale": scale}, centred, eps=1e-5),
                            norm_apply({"scale": scale, "bias": jnp.zeros(d, dtype)}, centred, eps=1e-5), TOL[dtype])


def _repeat_kv(params: dict, n_heads: int, n_kv_heads: int) -> dict:
    """Grouped-query parameters -> multi-head ones: each key and value head's K columns
    copied for each of its R = H / G query heads, as the paper defines the layer."""
    w, b = params["qkv"]["w"], params["qkv"].get("b")
    k = w.shape[0] // n_heads
    r = n_heads // n_kv_heads

    def expand(a):
        q, key, v = np.split(np.asarray(a), [n_heads * k, (n_heads + n_kv_heads) * k], axis=-1)
        grow = lambda t: np.repeat(t.reshape(*t.shape[:-1], n_kv_heads, k), r, axis=-2).reshape(*t.shape[:-1], -1)  # noqa: E731
        return np.concatenate([q, grow(key), grow(v)], axis=-1)
    qkv = {"w": expand(w), **({} if b is None else {"b": expand(b)})}
    return {**params, "qkv": qkv}


@given(shape=st.sampled_from([(4, 2), (4, 1), (6, 3), (2, 2)]), rotary_theta=st.sampled_from([None, 10000.0]),
       impl=st.sampled_from(["einsum", "dot_product_attention"]), dtype=DTYPES, seed=SEEDS)
def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_heads(shape, rotary_theta, impl, dtype,
                                                                                      seed):
    """G key/value heads equal H heads whose keys and values are copies within each
    group (G = H: today's multi-head attention, the same parameters), with rotary
    positions or without, for both attention implementations; the cache holds G heads."""
    h, g = shape
    if impl == "dot_product_attention" and dtype == "float64":
        dtype = "float32"                           # jax.nn.dot_product_attention's softmax is float32
    with _precision(dtype):
        dt = getattr(jnp, dtype)
        spec = AttentionSpec(n_heads=h, n_kv_heads=g, qkv_bias=True, impl=impl, rope_theta=rotary_theta)
        p = attention.init(jax.random.key(seed % 1000), spec, d_model=4 * h, std=0.5, dtype=dt)
        x = jnp.asarray(normal(seed, 2, 5, 4 * h), dt)
        run = jax.jit(lambda p, n_kv: attention.apply(p, x, dataclasses.replace(spec, n_kv_heads=n_kv)),
                      static_argnums=1)
        grouped = run(p, g)
        assert_close_scaled(grouped, run(_repeat_kv(p, h, g), h), TOL[dtype])
    cache = model.init_cache(ModelConfig(vocab_size=5, d_model=4 * h, n_heads=h, n_kv_heads=g, max_len=8), 3)
    assert len(cache) == 2 and cache[0].k.shape == (3, 8, g, 4)


def test_llama_layers_misused_say_what_they_need(key):
    """What a student got wrong first (#28 review): a rotary input not split into heads,
    positions of the wrong rank, an odd head width; grouped-query weights applied
    without their n_kv_heads; a Llama block applied with GPT's norm and MLP."""
    with pytest.raises(ValueError, match=r"x \(B, T, H, K\) and positions \(B\|1, T\); got x \(1, 7, 32\)"):
        rotary.apply(jnp.ones((1, 7, 32)), jnp.arange(7)[None])
    with pytest.raises(ValueError, match="positions \\(7,\\)"):
        rotary.apply(jnp.ones((1, 7, 4, 8)), jnp.arange(7))
    with pytest.raises(ValueError, match="K=7 must be even"):
        rotary.apply(jnp.ones((1, 7, 4, 7)), jnp.arange(7)[None])
    p = attention.init(key, AttentionSpec(n_heads=4, n_kv_heads=2, bias=False), d_model=32)
    with pytest.raises(ValueError, match="made for n_kv_heads=2: pass that"):
        attention.apply(p, jnp.ones((1, 3, 32)), AttentionSpec(n_heads=4))
    llama = BlockSpec(attention=AttentionSpec(n_heads=4, n_kv_heads=2, bias=False), norm="rmsnorm", mlp="swiglu",
                      bias=False)
    bp = block.init(key, llama, d_model=32, d_ff=48)
    with pytest.raises(ValueError, match="hold norm='rmsnorm' and mlp='swiglu'; apply was given norm='layernorm'"):
        block.apply(bp, jnp.ones((1, 3, 32)), BlockSpec(attention=llama.attention))


# ----------------------------------------------------------------------------- against Flax


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
                flax_apply(ref.layer_norm(c, None), (3.0 * x + 1.0,)), ref.to_flax_norm)
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
                flax_apply(ref.layer_norm(c.replace(norm="rmsnorm"), None), (3.0 * x + 1.0,)), ref.to_flax_norm)
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


def _compare_with_flax(params, our_fn, flax_fn, to_flax, tol, rng, rotary=False):
    """Outputs, gradients of <y, probe> for every parameter, and the parameters after one Adam step."""
    # Jitted only to make the suite fast; jit(apply) == apply is tested in test_layers.
    y = jax.jit(our_fn)(params)
    assert_close_scaled(y, jax.jit(flax_fn)(to_flax(params)), tol)
    probe = jnp.asarray(rng.standard_normal(y.shape), y.dtype)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(our_fn(p) * probe)))(params)
    with standard_promotion():
        flax_grads = jax.jit(jax.grad(lambda fp: jnp.sum(flax_fn(fp) * probe)))(to_flax(params))
    ref.compare_grads_and_adam_step(params, grads, to_flax(params), flax_grads, to_flax, tol, rotary)


LAYERS = ["linear", "embedding", "embedding_attend", "norm", "feedforward", "attention", "block", *LLAMA_LAYERS]


def _layer_config(name: str, dtype: str) -> ModelConfig:
    c = ref.reference_config(dtype)
    return _llama(c, **LLAMA_LAYERS[name]) if name in LLAMA_LAYERS else c


@pytest.mark.parametrize("name, impl", [(name, "einsum") for name in LAYERS] + [
    ("attention", "dot_product_attention"), ("block", "dot_product_attention"),
    ("grouped_attention", "dot_product_attention")])
def test_layer_matches_flax_float32(name, impl, key, rng):
    c = _layer_config(name, "float32").replace(attention=impl)
    params, our_fn, flax_fn, to_flax = _case(name, c, key, rng)
    _compare_with_flax(params, our_fn, flax_fn, to_flax, ref.TOLERANCE["float32"], rng, c.positions == "rotary")


@pytest.mark.parametrize("name", LAYERS)
def test_layer_matches_flax_float64(name, key, rng):
    with enable_x64():
        c = _layer_config(name, "float64")
        params, our_fn, flax_fn, to_flax = _case(name, c, key, rng)
        _compare_with_flax(params, our_fn, flax_fn, to_flax, ref.TOLERANCE["float64"], rng, c.positions == "rotary")
