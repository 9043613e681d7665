"""Checkpoints: exact round trip, atomic replacement, and clear errors for bad files."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from minitx_fn import checkpoint, train
from minitx_fn.config import ModelConfig, TrainConfig
from minitx_fn.tokenizer import Tokenizer
from tests.helpers import standard_promotion

TOK = Tokenizer.from_text("abcdefg")
MC = ModelConfig(vocab_size=TOK.vocab_size, d_model=8, n_heads=2, n_layers=2, max_len=8)
TC = TrainConfig(steps=10, warmup=1)


@pytest.fixture(autouse=True)
def _optax_promotion():
    with standard_promotion():
        yield


def _save(run_dir, key, step=3):
    init_key, data_key = jax.random.split(key)
    state = train.init_state(init_key, MC, TC)._replace(step=jax.numpy.asarray(step, jax.numpy.int32))
    checkpoint.save(str(run_dir), state, data_key=data_key, model_config=MC, train_config=TC, tokenizer=TOK,
                    extra={"data_path": None})
    return state, data_key


def test_round_trip_is_exact(tmp_path, key):
    state, data_key = _save(tmp_path, key)
    ck = checkpoint.load(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, ck.state, state)
    np.testing.assert_array_equal(jax.random.key_data(ck.data_key), jax.random.key_data(data_key))
    assert ck.model_config == MC and ck.train_config == TC and ck.tokenizer == TOK and int(ck.state.step) == 3
    assert not any(name.startswith(".checkpoint.tmp") for name in os.listdir(tmp_path))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, key, monkeypatch):
    _save(tmp_path, key, step=3)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_npz", crash)
    with pytest.raises(OSError):
        _save(tmp_path, key, step=9)
    assert int(checkpoint.load(str(tmp_path)).state.step) == 3
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_crash_between_renames_falls_back_to_old(tmp_path, key):
    _save(tmp_path, key)
    os.rename(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    assert int(checkpoint.load(str(tmp_path)).state.step) == 3


def test_truncated_array_file(tmp_path, key):
    _save(tmp_path, key)
    path = tmp_path / "checkpoint" / "params.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(checkpoint.CheckpointError, match="params.npz.*corrupt or truncated"):
        checkpoint.load(str(tmp_path))


def test_garbage_metadata(tmp_path, key):
    _save(tmp_path, key)
    (tmp_path / "checkpoint" / "meta.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="meta.json.*corrupt"):
        checkpoint.load(str(tmp_path))


def test_shape_mismatch_names_the_array(tmp_path, key):
    _save(tmp_path, key)
    meta_path = tmp_path / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["d_model"] = 16
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match=r"'blocks/attn/out/b' has shape \(2, 8\).*needs shape \(2, 16\)"):
        checkpoint.load(str(tmp_path))


def test_missing_file_and_wrong_version(tmp_path, key):
    _save(tmp_path, key)
    os.remove(tmp_path / "checkpoint" / "opt_state.npz")
    with pytest.raises(checkpoint.CheckpointError, match="opt_state.npz.*missing"):
        checkpoint.load(str(tmp_path))
    meta_path = tmp_path / "checkpoint" / "meta.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"format_version": 99}))
    with pytest.raises(checkpoint.CheckpointError, match="version 99"):
        checkpoint.load(str(tmp_path))


def test_no_checkpoint_here(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
        checkpoint.load(str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="no run directory"):
        checkpoint.load(str(tmp_path / "nope"))
