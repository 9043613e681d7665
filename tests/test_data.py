"""Reading text, splitting it, batches and validation windows."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import data
from minitx_fn.errors import DataError


def test_builtin_text_is_the_corpus_cycle():
    text = data.builtin_text()
    assert text == data.BUILTIN_CORPUS * data.BUILTIN_REPEATS
    assert data.BUILTIN_CORPUS == "hello world! hello jax! hello flax! "


def test_read_text_and_its_errors(tmp_path):
    (tmp_path / "a.txt").write_text("héllo", encoding="utf-8")
    assert data.read_text(str(tmp_path / "a.txt")) == "héllo"
    for path, match in ((tmp_path / "missing", "does not exist"), (tmp_path, "is a directory")):
        with pytest.raises(DataError, match=match):
            data.read_text(str(path))
    (tmp_path / "empty").write_text("")
    with pytest.raises(DataError, match="is empty"):
        data.read_text(str(tmp_path / "empty"))
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match="not UTF-8.*offset 3"):
        data.read_text(str(tmp_path / "latin1"))


def test_text_sha256_is_the_sha256_of_the_utf8_bytes():
    assert data.text_sha256("héllo") == hashlib.sha256("héllo".encode()).hexdigest()


@given(n=st.integers(1, 500))
def test_split_keeps_every_token_once_in_order(n):
    ids = np.arange(n)
    train, val = data.split(ids)
    assert len(train) == int(0.9 * n) and np.array_equal(np.concatenate([train, val]), ids)


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
