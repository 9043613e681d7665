"""Cached decoding equals recomputing the full, cropped context, token for token."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import generate as gen
from minitx_fn import model
from minitx_fn.config import ModelConfig
from minitx_fn.sampling import GREEDY, Sampler

CFG = ModelConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_len=8, init_std=0.5)
PARAMS = model.init(jax.random.key(11), CFG)


@given(b=st.sampled_from([1, 3]), prompt_len=st.sampled_from([1, 5, 8]), n_new=st.sampled_from([6, 30]),
       seed=st.integers(0, 2**31 - 1), impl=st.sampled_from(["einsum", "dot_product_attention"]),
       scan=st.booleans())
def test_cached_greedy_equals_recompute_inside_and_after_the_window(b, prompt_len, n_new, seed, impl, scan):
    """n_new = 30 with a window of 8 slides the window several times."""
    cfg = CFG.replace(attention=impl, scan_layers=scan)
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = model.init(k1, cfg)
    prompts = np.asarray(jax.random.randint(k2, (b, prompt_len), 0, cfg.vocab_size))
    ids, logits = gen.generate(params, list(prompts), config=cfg, key=k2, max_new_tokens=n_new, return_logits=True)
    ref_ids, ref_logits = gen.generate_recompute(params, prompts, config=cfg, key=k2, max_new_tokens=n_new)
    np.testing.assert_array_equal(np.stack(ids), ref_ids)
    # Within 1e-5 of the logits' scale (this test model's logits reach about 5): the
    # cached step multiplies (1, D) rows where the recompute multiplies (S, D) blocks,
    # and XLA's kernels for the two round differently in the last bits.
    scale = max(1.0, float(np.abs(ref_logits).max()))
    np.testing.assert_allclose(np.stack(logits), ref_logits, atol=1e-5 * scale, rtol=0)


def test_cached_sampling_equals_recompute_with_the_same_keys(key):
    prompts = np.asarray(jax.random.randint(key, (4, 3), 0, CFG.vocab_size))
    sampler = Sampler(temperature=1.0, top_k=5, top_p=0.95)
    ids = gen.generate(PARAMS, list(prompts), config=CFG, key=key, max_new_tokens=20, sampler=sampler)
    ref_ids, _ = gen.generate_recompute(PARAMS, prompts, config=CFG, key=key, max_new_tokens=20, sampler=sampler)
    np.testing.assert_array_equal(np.stack(ids), ref_ids)


def test_padded_batch_rows_equal_their_own_runs(key):
    """Inside the window, left padding changes nothing: each row of a batch of
    different-length prompts equals that prompt decoded alone."""
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    n_new = 3                                    # 5 + 3 = 8 slots: no slide
    batch = gen.generate(PARAMS, prompts, config=CFG, key=key, max_new_tokens=n_new, return_logits=True)
    for row, p in enumerate(prompts):
        alone = gen.generate(PARAMS, [p], config=CFG, key=key, max_new_tokens=n_new, return_logits=True)
        np.testing.assert_array_equal(batch[0][row], alone[0][0])
        np.testing.assert_allclose(batch[1][row], alone[1][0], atol=1e-5)


def test_stop_sequence_ends_a_row_and_the_loop(key):
    first = gen.generate(PARAMS, [[1, 2]], config=CFG, key=key, max_new_tokens=12)[0]
    stop = tuple(int(t) for t in first[3:5])
    stopped = gen.generate(PARAMS, [[1, 2]], config=CFG, key=key, max_new_tokens=12, stop=stop)[0]
    # It ends right after the first occurrence of the stop sequence.
    first_end = next(i + len(stop) for i in range(len(first)) if tuple(first[i:i + len(stop)]) == stop)
    np.testing.assert_array_equal(stopped, first[:first_end])


def test_no_recompilation_per_token_or_within_a_bucket(key):
    gen._decode.clear_cache() if hasattr(gen._decode, "clear_cache") else None
    before = gen._decode._cache_size()
    gen.generate(PARAMS, [[1, 2, 3]], config=CFG, key=key, max_new_tokens=20)       # 20 tokens, one compile
    gen.generate(PARAMS, [[4, 5, 6, 7, 1]], config=CFG, key=key, max_new_tokens=20)  # same bucket (8)
    gen.generate(PARAMS, [[1, 2], [3, 4, 5]], config=CFG, key=key, max_new_tokens=20)  # batch 2: new shape
    assert gen._decode._cache_size() - before == 2


def test_bucket_lengths():
    assert [gen.bucket_length(n, 64) for n in (1, 8, 9, 16, 17, 63, 64)] == [8, 8, 16, 16, 32, 64, 64]
    assert gen.bucket_length(5, 4) == 4


def test_time_per_token_does_not_depend_on_position():
    """The decode step's cost is fixed by construction: every step attends over all S
    slots under a mask. Checked structurally: one compiled loop serves prompts at the
    start and at the end of the window (timings belong in benchmarks)."""
    key = jax.random.key(0)
    a = gen.generate(PARAMS, [[1]], config=CFG, key=key, max_new_tokens=4)
    b = gen.generate(PARAMS, [[1] * 8], config=CFG, key=key, max_new_tokens=4)
    assert len(a[0]) == len(b[0]) == 4


@pytest.mark.parametrize("prompts, match", [([[]], "empty"), ([[1, 99]], "outside"), ([], "no prompts")])
def test_bad_prompts(prompts, match):
    with pytest.raises(ValueError, match=match):
        gen.generate(PARAMS, prompts, config=CFG, key=jax.random.key(0), max_new_tokens=2)


def test_greedy_default_is_deterministic(key):
    a = gen.generate(PARAMS, [[1, 2]], config=CFG, key=key, max_new_tokens=5, sampler=GREEDY)
    b = gen.generate(PARAMS, [[1, 2]], config=CFG, key=jax.random.fold_in(key, 1), max_new_tokens=5)
    np.testing.assert_array_equal(a[0], b[0])
