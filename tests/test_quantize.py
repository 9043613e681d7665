"""Quantized weights (`minitx_fn/quantize.py`), as laws against a float64 NumPy
reference: every weight within half a step, a matrix-vector product within
s_j ||x||_1 / 2 per output, quantizing a dequantized matrix gives its integers back, an
all-zero row is safe, scaling a row scales its step; decoding from quantized
parameters keeps the decode laws; and the compiled decode step reads int8 weights
without writing a float32 copy of them at batch 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import generate, quantize, testing
from minitx_fn.config import ModelConfig
from minitx_fn.errors import ConfigError
from minitx_fn.layers import embedding, linear

SIZES = st.sampled_from([1, 2, 3, 8, 17])
EPS = 1e-6                                   # float32's rounding of W / s, relative to a step


def _matrix(seed: int, d_in: int, d_out: int, spread: float) -> np.ndarray:
    """(D_in, D_out) float32 with columns of very different scales (10^-spread .. 1)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((d_in, d_out)) * 10.0 ** rng.uniform(-spread, 0, d_out)).astype(np.float32)


@given(seed=st.integers(0, 2**31), d_in=SIZES, d_out=SIZES, spread=st.sampled_from([0.0, 3.0, 30.0]))
def test_every_weight_lies_within_half_a_step_and_a_product_within_its_bound(seed, d_in, d_out, spread):
    w = _matrix(seed, d_in, d_out, spread)
    q = quantize.quantize_matrix(w)
    wq, s = np.asarray(q["wq"], np.float64), np.asarray(q["scale"], np.float64)           # (D_out, D_in), (D_out,)
    assert q["wq"].dtype == jnp.int8 and np.abs(wq).max() <= 127
    assert (np.abs(w.T.astype(np.float64) - s[:, None] * wq) <= s[:, None] / 2 * (1 + EPS)).all()
    x = np.random.default_rng(seed + 1).standard_normal((3, d_in))
    exact = x @ w.astype(np.float64)                                                     # (3, D_out)
    assert (np.abs(exact - x @ (s[:, None] * wq).T) <= s * np.abs(x).sum(1, keepdims=True) / 2 * (1 + EPS)).all()
    got = np.asarray(linear.apply(q, jnp.asarray(x, jnp.float32)), np.float64)           # the decode path, float32
    slack = 1e-5 * np.abs(x).sum(1, keepdims=True) * np.abs(w).max()                     # float32's own rounding
    assert (np.abs(exact - got) <= s * np.abs(x).sum(1, keepdims=True) / 2 + slack).all()


@given(seed=st.integers(0, 2**31), d_in=SIZES, d_out=SIZES, power=st.integers(-20, 20))
def test_requantizing_gives_the_integers_back_and_scaling_a_row_scales_its_step(seed, d_in, d_out, power):
    w = _matrix(seed, d_in, d_out, 3.0)
    q = quantize.quantize_matrix(w)
    again = quantize.quantize_matrix(quantize.dequantize_matrix(q))
    np.testing.assert_array_equal(again["wq"], q["wq"])
    np.testing.assert_allclose(again["scale"], q["scale"], rtol=1e-6)
    column = seed % d_out
    scaled = w.copy()
    scaled[:, column] *= np.float32(2.0 ** power)                                        # exact in float32
    q2 = quantize.quantize_matrix(scaled)
    np.testing.assert_array_equal(q2["wq"], q["wq"])
    np.testing.assert_allclose(q2["scale"][column], q["scale"][column] * 2.0 ** power, rtol=1e-6)


@given(seed=st.integers(0, 2**31), vocab=SIZES, d=SIZES)
def test_a_quantized_token_table_looks_up_and_heads_within_half_a_step(seed, vocab, d):
    """The token table is quantized a row per id: a looked-up row lies within half its
    step of the float row, and the tied head's scores x E^T within s_v ||x||_1 / 2."""
    table = _matrix(seed, d, vocab, 3.0).T                                              # (V, D), rows of any scale
    q = quantize.quantize({"embed": {"table": table}})["embed"]
    s = np.asarray(q["scale"], np.float64)                                               # (V,)
    ids = np.random.default_rng(seed).integers(0, vocab, (2, 5))
    rows = np.asarray(embedding.apply(q, jnp.asarray(ids)), np.float64)                  # (2, 5, D)
    assert (np.abs(rows - table[ids].astype(np.float64)) <= s[ids][..., None] / 2 * (1 + EPS)).all()
    x = np.random.default_rng(seed + 1).standard_normal((3, d))
    exact = x @ table.T.astype(np.float64)                                               # (3, V)
    got = np.asarray(embedding.attend(q, jnp.asarray(x, jnp.float32)), np.float64)
    slack = 1e-5 * np.abs(x).sum(1, keepdims=True) * np.abs(table).max()
    assert (np.abs(exact - got) <= s * np.abs(x).sum(1, keepdims=True) / 2 + slack).all()
    np.testing.assert_array_equal(quantize.dequantize({"embed": q})["embed"]["table"].shape, table.shape)


def test_an_all_zero_row_is_safe_and_bfloat16_rounds_each_weight():
    w = np.zeros((4, 3), np.float32)
    w[:, 1] = [1.0, -0.5, 0.25, 2.0]
    q = quantize.quantize_matrix(w)
    assert np.isfinite(np.asarray(q["scale"])).all() and not np.asarray(q["wq"])[[0, 2]].any()
    np.testing.assert_array_equal(quantize.dequantize_matrix(q)[:, [0, 2]], 0.0)
    b = quantize.quantize_matrix(_matrix(0, 8, 5, 3.0), "bfloat16")
    w8 = _matrix(0, 8, 5, 3.0).astype(np.float64)
    assert b["wq"].dtype == jnp.bfloat16
    assert (np.abs(np.asarray(quantize.dequantize_matrix(b), np.float64) - w8) <= np.abs(w8) * 2.0 ** -8).all()
    with pytest.raises(ConfigError, match="to='int4' is not a kind of quantization"):
        quantize.quantize_matrix(w, "int4")


MODEL = ModelConfig(vocab_size=40, d_model=32, n_heads=2, n_layers=2, max_len=12)


@pytest.mark.parametrize("to", quantize.KINDS)
def test_a_quantized_model_decodes_cached_as_it_recomputes_and_near_the_float_model(to):
    """The linear layers and the token table change (norms and biases stay float32);
    cached decode of the quantized tree equals its recompute (past the window too), and
    its logits stay near the float model's."""
    params = MODEL.init(jax.random.key(0))
    q = quantize.quantize(params, to)
    assert set(q["embed"]) == {"tableq", "scale"} and "w" not in q["blocks"]["mlp"]["up"]
    assert q["ln_f"] == params["ln_f"]
    assert quantize.weight_bytes(q) < quantize.weight_bytes(params)
    prompts = [[1, 2, 3], [4]]
    ids, logits = generate.generate(q, prompts, model=MODEL, max_new_tokens=14, return_logits=True)
    ref_ids, ref = generate.generate_recompute(q, prompts, model=MODEL, max_new_tokens=14, return_logits=True)
    for b in range(2):
        np.testing.assert_array_equal(ids[b], ref_ids[b])
        testing.assert_close_scaled(logits[b], ref[b], 2e-4, floor=1.0)
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]])
    testing.assert_close_scaled(MODEL.apply(q, tokens), MODEL.apply(params, tokens), 0.05, floor=1.0)


def test_the_decode_step_reads_int8_weights_and_writes_no_float_copy_at_batch_one():
    """The law on the compiled program: at batch 1 the decode step's parameters are
    int8 and no buffer outside a fusion holds a float array of a weight's shape (each
    row is converted inside the product); at batch 8 XLA does write one, which shows
    the check sees a copy when there is one."""
    model = ModelConfig(vocab_size=40, d_model=48, n_heads=2, n_layers=1, max_len=12, mlp="swiglu", d_ff=80)
    q = quantize.quantize(model.init(jax.random.key(0)))
    shapes = {a.shape[-2:] for a in jax.tree.leaves(q) if a.dtype == jnp.int8}
    shapes |= {s[::-1] for s in shapes}
    step = jax.jit(lambda p, tokens, cache, index: model.apply_cached(p, tokens, cache, index=index))

    def copies(batch):
        compiled = step.lower(model.decode_params(q), jnp.zeros((batch, 1), jnp.int32), model.init_cache(batch, 12),
                              jnp.zeros((batch,), jnp.int32)).compile().as_text()
        assert "s8[" in compiled.split("ENTRY", 1)[1].split("\n", 1)[0]                # int8 parameters
        return testing.float_copies(compiled, shapes)
    assert copies(1) == []
    assert copies(8)


def test_a_run_is_quantized_from_its_directory_once_and_never_compared_with_itself(tmp_path):
    """`quantized` takes a run's directory as `complete` does; a run quantized already is
    refused there and by `job.evaluate(quantize=)`, which would compare it with itself."""
    import io

    from minitx_fn import checkpoint, job
    from minitx_fn.tokenizer import CharTokenizer
    from tests.helpers import standard_promotion
    run = str(tmp_path / "r")
    model = ModelConfig(vocab_size=3, d_model=8, n_heads=2, max_len=8)
    with standard_promotion():
        job.new_run(run, model.init(jax.random.key(0)), model=model, tokenizer=CharTokenizer("abc"))
        from_dir = quantize.quantized(run)
        assert quantize.is_quantized(from_dir.params) and not quantize.is_quantized(checkpoint.load_model(run).params)
        with pytest.raises(ConfigError, match="quantized already"):
            quantize.quantized(from_dir)
        (tmp_path / "t.txt").write_text("abcab" * 10)
        with pytest.raises(ConfigError, match="quantize='int8' compares quantized weights.*quantized already"):
            job.evaluate(from_dir, str(tmp_path / "t.txt"), quantize="int8", cache_dir=str(tmp_path / "c"),
                         log=io.StringIO())
