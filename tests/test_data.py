"""Batches (sampled on the device, gathered from a memory map, prefetched), validation
windows and the fixed validation sample, the length check, and downloads (checked by
SHA-256, never leaving a partial file)."""

from __future__ import annotations

import hashlib
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import data, train
from minitx_fn.errors import DataError
from minitx_fn.signals import Interrupted, StopSignals


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


@given(step=st.integers(0, 2**31 - 1), dtype=st.sampled_from([np.uint8, np.uint16, np.uint32]))
def test_memory_mapped_batches_equal_device_batches_bit_for_bit(tmp_path_factory, step, dtype):
    ids = (np.arange(500) * 7919 % 251).astype(dtype)
    path = tmp_path_factory.mktemp("m") / "ids.bin"
    ids.tofile(path)
    mapped = np.memmap(path, dtype=dtype, mode="r")
    key = train.keys(3).data
    host = data.host_batch_at(mapped, key, step, batch_size=4, context=16)
    device = train.batch_at(jnp.asarray(ids.astype(np.int32)), key, jnp.int32(step), batch_size=4, context=16)
    for a, b in zip(host, device):
        assert a.dtype == b.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_prefetcher_gives_batches_in_order_and_raises_the_workers_error():
    def make(t):
        if t == 4:
            raise ValueError("no batch 4")
        return t * 10

    with data.Prefetcher(make, start=2) as next_batch:
        assert [next_batch(2), next_batch(3)] == [20, 30]
        with pytest.raises(ValueError, match="no batch 4"):
            next_batch(4)
    with data.Prefetcher(make, start=0) as next_batch:
        with pytest.raises(ValueError, match="expected step 0"):
            next_batch(1)


def test_the_validation_sample_is_fixed_and_all_is_every_window():
    ids = np.arange(10_000) % 97
    every = data.eval_windows(ids, 16)
    assert len(every) == (10_000 - 1) // 16
    a, b = data.eval_windows(ids, 16, 1000), data.eval_windows(ids, 16, 1000)
    assert len(a) == 63 and a.starts.tolist() == b.starts.tolist()             # ceil(1000 / 16), the same windows
    assert set(a.starts.tolist()) <= set(every.starts.tolist())
    assert np.array_equal(np.asarray(a), np.asarray(every)[a.starts // 16])
    assert len(data.eval_windows(ids, 16, 10**9)) == len(every)              # more than there is: all


# ----------------------------------------------------------------------------- downloads


@pytest.mark.parametrize("setup, target, said", [
    (lambda tmp: (tmp / "ts.txt").write_text("mine"), "ts.txt", "exists and is not the expected file"),
    (lambda tmp: (tmp / "d").mkdir(), "d", "is a directory"),
    (lambda tmp: (tmp / "f").write_text(""), "f/ts.txt", "cannot write into"),
])
def test_a_download_never_writes_over_or_through_what_is_there(tmp_path, setup, target, said):
    source = tmp_path / "source.txt"
    source.write_text("to be or not to be")
    setup(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DataError, match=said):
        data.download(f"file://{source}", str(tmp_path / target), hashlib.sha256(b"to be or not to be").hexdigest())
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(DataError, match="the output path is empty"):
        data.download(f"file://{source}", "", "0" * 64)


def test_a_download_without_a_network_says_where_to_put_the_file(tmp_path):
    target = str(tmp_path / "ts.txt")
    with pytest.raises(data.DownloadError, match=f"cannot download.*put it at {target}"):
        data.download("http://127.0.0.1:1/input.txt", target, "0" * 64, timeout=5)
    assert os.listdir(tmp_path) == []


def test_a_download_checks_its_checksum_and_keeps_what_it_fetched(tmp_path):
    source = tmp_path / "source.txt"
    source.write_text("to be or not to be")
    target, sha256 = str(tmp_path / "d" / "ts.txt"), hashlib.sha256(b"to be or not to be").hexdigest()
    assert data.download(f"file://{source}", target, sha256) is True
    assert open(target).read() == "to be or not to be"
    assert data.download(f"file://{source}", target, sha256) is False          # already there: kept


def test_a_signal_during_a_download_leaves_no_partial_file(tmp_path, monkeypatch):
    """The bytes arrive in pieces; SIGTERM after the first: Interrupted at the next piece,
    and neither the target nor the temporary .download-* file is left."""
    class Slow:
        def __init__(self):
            self.sent = 0

        def read(self, n):
            self.sent += 1
            if self.sent == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return b"x" * 10 if self.sent < 5 else b""

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: Slow())
    with StopSignals(), pytest.raises(Interrupted):
        data.download("http://example.invalid/x", str(tmp_path / "d" / "ts.txt"), "0" * 64)
    assert os.listdir(tmp_path) == []                              # the folder it made, removed too


SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tinyshakespeare.txt")


@pytest.mark.skipif(not os.path.exists(SHARED), reason="../shared/data/tinyshakespeare.txt is not beside this "
                    "repository (it is in this project's workspace)")
def test_the_recorded_checksum_is_tiny_shakespeares(tmp_path):
    target = str(tmp_path / "ts.txt")
    data.download("file://" + os.path.abspath(SHARED), target, data.SHAKESPEARE_SHA256)
    assert len(open(target, encoding="utf-8").read()) == 1_115_394
