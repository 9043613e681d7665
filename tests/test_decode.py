"""The pieces every decode loop shares (`minitx_fn.decode`): prompt lengths rounded to a
few buckets, the cache's slots, the slide, row keys and stop sequences, each against
its definition. (The loops themselves, cached against recomputed: test_generate.py
and test_speculative.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import decode, testing


def test_bucket_lengths():
    assert [decode.bucket_length(n, 64) for n in (1, 8, 9, 16, 17, 63, 64)] == [8, 8, 16, 16, 32, 64, 64]
    assert decode.bucket_length(5, 4) == 4


@given(n=st.integers(1, 4096), max_len=st.integers(1, 4096))
def test_a_bucket_is_the_smallest_power_of_two_that_holds_the_prompt(n, max_len):
    """At least 8 and n, at most max_len: a prompt length compiles one of log2(S) loops."""
    b = decode.bucket_length(n, max_len)
    if n <= max_len:
        assert n <= b <= max_len
    assert b == max_len or (b >= 8 and b & (b - 1) == 0 and (b == 8 or b // 2 < n))


@given(prompt=st.integers(1, 64), new=st.integers(1, 64), max_len=st.integers(1, 64))
def test_the_cache_holds_every_token_or_the_whole_window(prompt, new, max_len):
    slots = decode.cache_slots(prompt, new, max_len)
    assert slots == (prompt + new if prompt + new <= max_len else max_len)
    assert decode.slide_keep(max_len) == max_len // 2


@given(key=testing.keys(), batch=st.integers(1, 4))
def test_row_b_samples_with_fold_in_of_its_index(key, batch):
    keys = decode.row_keys(key, batch)
    for b in range(batch):
        np.testing.assert_array_equal(jax.random.key_data(keys[b]), jax.random.key_data(jax.random.fold_in(key, b)))


@given(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=12), stop=st.lists(st.integers(0, 3), min_size=1,
                                                                                      max_size=3))
def test_a_stop_sequence_ends_where_its_ids_end_and_never_in_the_padding(tokens, stop):
    ends = np.arange(len(tokens))[None]
    got = np.asarray(decode.stop_ends(jnp.asarray([tokens], jnp.int32), jnp.asarray(ends, jnp.int32),
                                      jnp.asarray(stop, jnp.int32)))[0]
    expected = [i + 1 >= len(stop) and tokens[i + 1 - len(stop):i + 1] == stop for i in range(len(tokens))]
    assert got.tolist() == expected
