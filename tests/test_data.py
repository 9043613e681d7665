"""The built-in corpus, the train/validation split, batches and validation windows."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import corpus, data
from minitx_fn.errors import DataError


def test_builtin_text_is_the_corpus_cycle():
    text = data.builtin_text()
    assert text == data.BUILTIN_CORPUS * data.BUILTIN_REPEATS
    assert data.BUILTIN_CORPUS == "hello world! hello jax! hello flax! "


@given(n=st.integers(1, 500))
def test_the_training_part_is_the_largest_at_most_nine_tenths(n):
    """corpus.train_boundary(n) = b: b / n <= 0.9 < (b + 1) / n, in exact rationals."""
    from fractions import Fraction
    b = corpus.train_boundary(n)
    assert Fraction(b, n) <= Fraction(9, 10) < Fraction(b + 1, n)


@given(n=st.integers(2, 300), t=st.integers(1, 20))
def test_eval_windows_predict_every_position_once(n, t):
    """Window w covers ids[w T .. w T + T]; its targets are ids[w T + 1 .. w T + T], so the
    targets of all windows are ids[1 .. W T], each once, in order."""
    if n < t + 1:
        return
    ids = np.arange(n)
    windows = np.asarray(data.eval_windows(ids, t))
    assert windows.shape == ((n - 1) // t, t + 1)
    np.testing.assert_array_equal(windows[:, 1:].ravel(), ids[1:len(windows) * t + 1])
    np.testing.assert_array_equal(windows[:, :-1].ravel(), ids[:len(windows) * t])


def test_check_length_names_the_context():
    data.check_length(np.arange(9), 8, "training")
    with pytest.raises(DataError, match="5 tokens.*context plus one \\(9\\).*max_len=8"):
        data.check_length(np.arange(5), 8, "training")


def test_sample_batch_windows_lie_inside_the_text(key):
    ids = jax.numpy.arange(30)
    sample = jax.jit(data.sample_batch, static_argnames=("batch_size", "context"))
    for i in range(5):
        x, y = sample(ids, jax.random.fold_in(key, i), batch_size=16, context=10)
        assert int(x.min()) >= 0 and int(y.max()) <= 29
        np.testing.assert_array_equal(np.diff(np.asarray(x), axis=1), 1)     # consecutive text


def test_a_failed_download_removes_the_folders_it_made_and_no_other(tmp_path):
    """A wrong checksum leaves nothing: no file, no temporary, none of the folders the
    call created; a folder that was already there (even empty) stays."""
    source = tmp_path / "wrong.txt"
    source.write_text("not the file")
    found = tmp_path / "found"
    found.mkdir()
    target = found / "new" / "deeper" / "ts.txt"
    with pytest.raises(data.DownloadError, match="nothing was written"):
        data.download(f"file://{source}", str(target), "0" * 64)
    assert found.is_dir() and list(found.iterdir()) == []
