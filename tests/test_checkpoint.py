"""Checkpoints: exact round trip, atomic replacement, names numpy can read, and one
CheckpointError for anything damaged, truncated or hostile (fuzzed)."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import stat

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitx_fn import checkpoint, runs, train
from minitx_fn.config import ModelConfig, TrainConfig
from minitx_fn.errors import CheckpointError
from minitx_fn.tokenizer import CharTokenizer
from tests.helpers import standard_promotion

TOK = CharTokenizer.from_text("abcdefg")
MC = ModelConfig(vocab_size=TOK.vocab_size, d_model=8, n_heads=2, n_layers=2, max_len=8)
TC = TrainConfig(steps=10, warmup=1)
DATA = {"path": "/somewhere/text.txt", "sha256": "ab" * 32}


@pytest.fixture(autouse=True)
def _optax_promotion():
    with standard_promotion():
        yield


def _save(run_dir, key, step=3):
    state = train.init_state(key, MC, TC.optimizer)._replace(step=jax.numpy.asarray(step, jax.numpy.int32))
    checkpoint.save(str(run_dir), state, model_config=MC, train_config=TC, tokenizer=TOK, data=DATA)
    return state


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved checkpoint; tests copy its files rather than saving again."""
    run = tmp_path_factory.mktemp("saved")
    with standard_promotion():
        state = _save(run, jax.random.key(5))
    files = {name: (run / "checkpoint" / name).read_bytes() for name in os.listdir(run / "checkpoint")}
    return state, files


def _write(run_dir, files):
    (run_dir / "checkpoint").mkdir(exist_ok=True)
    for name, blob in files.items():
        (run_dir / "checkpoint" / name).write_bytes(blob)


def test_round_trip_is_exact(tmp_path, saved):
    state, files = saved
    _write(tmp_path, files)
    ck = checkpoint.load(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, ck.state, state)
    assert ck.model_config == MC and ck.train_config == TC and ck.tokenizer == TOK and int(ck.state.step) == 3
    assert ck.data == DATA


def test_arrays_are_named_by_tree_path_so_numpy_alone_reads_them(tmp_path, saved):
    state, files = saved
    params = np.load(io.BytesIO(files["params.npz"]))
    np.testing.assert_array_equal(params["blocks/attn/qkv/w"], state.params["blocks"]["attn"]["qkv"]["w"])
    opt = np.load(io.BytesIO(files["opt_state.npz"]))
    np.testing.assert_array_equal(opt["1/0/mu/head/w"], state.opt_state[1][0].mu["head"]["w"])
    assert "1/0/count" in opt.files and not any(name.startswith("leaf_") for name in opt.files)


def test_the_checkpoint_folder_has_the_mode_of_the_run_files(tmp_path, key):
    _save(tmp_path, key)
    mode = stat.S_IMODE(os.stat(tmp_path / "checkpoint").st_mode)
    assert mode == runs.dir_mode()                       # 0o755 under umask 022, not mkdtemp's 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "checkpoint" / "meta.json").st_mode) == runs.file_mode()


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path, key, monkeypatch):
    before = _save(tmp_path, key, step=3)

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write", full_disk)
    with pytest.raises(OSError, match="No space"):
        _save(tmp_path, key, step=9)
    ck = checkpoint.load(str(tmp_path))
    assert int(ck.state.step) == 3
    jax.tree.map(np.testing.assert_array_equal, ck.state.params, before.params)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_a_save_removes_what_a_killed_save_left(tmp_path, key):
    os.mkdir(tmp_path / (runs.TEMPORARY_PREFIX + "killed"))
    _save(tmp_path, key)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_crash_between_renames_falls_back_to_old(tmp_path, saved):
    _write(tmp_path, saved[1])
    os.rename(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    assert int(checkpoint.load(str(tmp_path)).state.step) == 3


@pytest.mark.parametrize("name", ["params.npz", "opt_state.npz"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "remove"])
def test_damaged_array_files_are_reported_not_used(tmp_path, saved, name, damage):
    files = dict(saved[1])
    blob = bytearray(files[name])
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x01                     # one bit, in the middle of an array
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "append":
        blob += b"\0"
    files[name] = bytes(blob)
    if damage == "remove":
        del files[name]
    _write(tmp_path, files)
    with pytest.raises(CheckpointError, match=f"{name}.*(damaged|missing)"):
        checkpoint.load(str(tmp_path))


def _resign(files: dict, name: str, arrays: dict) -> dict:
    """Replace an array file and record its new checksum, as a hostile editor would."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    blob = buffer.getvalue()
    meta = json.loads(files["meta.json"])
    meta["files"][name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    return {**files, name: blob, "meta.json": json.dumps(meta).encode()}


def test_non_finite_values_are_refused_even_with_a_matching_checksum(tmp_path, saved):
    arrays = dict(np.load(io.BytesIO(saved[1]["params.npz"])))
    arrays["head/b"] = np.full_like(arrays["head/b"], np.nan)
    _write(tmp_path, _resign(saved[1], "params.npz", arrays))
    with pytest.raises(CheckpointError, match="'head/b' holds non-finite values"):
        checkpoint.load(str(tmp_path))


def test_an_array_of_the_wrong_shape_is_named(tmp_path, saved):
    arrays = dict(np.load(io.BytesIO(saved[1]["params.npz"])))
    arrays["blocks/attn/out/b"] = np.zeros((2, 9), np.float32)
    _write(tmp_path, _resign(saved[1], "params.npz", arrays))
    with pytest.raises(CheckpointError, match=r"'blocks/attn/out/b' has shape \(2, 9\).*needs shape \(2, 8\)"):
        checkpoint.load(str(tmp_path))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format_version=1), "version 1 is not supported"),
    (lambda m: m.pop("step"), r"lacks \['step'\]"),
    (lambda m: m.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda m: m.update(step=-1), "step -1"),
    (lambda m: m.update(step=True), "step True"),
    (lambda m: m["model_config"].update(d_model="8"), "d_model = '8' is not of type"),
    (lambda m: m["model_config"].update(d_model=16), "does not match|has shape"),
    (lambda m: m["model_config"].update(colour="blue"), r"unknown fields \['colour'\]"),
    (lambda m: m["model_config"].update(n_heads=3), "divisible by n_heads=3"),
    (lambda m: m["train_config"].update(lr=float("nan")), "lr=nan is invalid"),
    (lambda m: m["tokenizer"].update(chars="abc"), "char tokenizer has 3 ids but model_config says vocab_size=7"),
    (lambda m: m["tokenizer"].update(chars="aabcdef"), "repeats a character"),
    (lambda m: m.update(tokenizer={"kind": "byte"}), "byte tokenizer has 256 ids but model_config says vocab_size=7"),
    (lambda m: m.update(tokenizer={"kind": "words"}), "kind is one of"),
    (lambda m: m["tokenizer"].update(json="{}"), "a char tokenizer is an object of the strings"),
    (lambda m: m["tokenizer"].update(special={"eos_token_id": 1}), "a char tokenizer is an object of the strings"),
    (lambda m: m.update(tokenizer={"kind": "bpe", "json": "{not json"}), "not a valid tokenizers JSON|pip install"),
    (lambda m: m.update(data={"path": 3}), "data must be null"),
    (lambda m: m["files"].pop("params.npz"), "files must give"),
])
def test_edited_metadata_is_one_clear_error(tmp_path, saved, edit, match):
    files = dict(saved[1])
    meta = json.loads(files["meta.json"])
    edit(meta)
    files["meta.json"] = json.dumps(meta).encode()
    _write(tmp_path, files)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(str(tmp_path))


def _mutations(meta: dict):
    """Hypothesis strategy: meta.json with one field anywhere replaced by any JSON value,
    a key removed, or a key added."""
    json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                           max_size=3), max_leaves=5)
    paths = [(k,) for k in meta] + [(k, sub) for k in ("model_config", "train_config", "files", "data", "tokenizer")
                                      if isinstance(meta[k], dict) for sub in meta[k]]
    return st.tuples(st.sampled_from(paths), st.sampled_from(["replace", "remove", "add"]), json_values,
                     st.text(max_size=5))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_fuzzed_metadata_gives_checkpoint_error_or_a_valid_checkpoint(tmp_path, saved, data):
    meta = json.loads(saved[1]["meta.json"])
    path, action, value, new_key = data.draw(_mutations(meta))
    mutated = copy.deepcopy(meta)
    parent = mutated
    for k in path[:-1]:
        parent = parent[k]
    if action == "replace":
        parent[path[-1]] = value
    elif action == "remove":
        del parent[path[-1]]
    else:
        target = parent[path[-1]] if isinstance(parent[path[-1]], dict) else parent
        target[new_key or "x"] = value
    files = {**saved[1], "meta.json": json.dumps(mutated).encode()}
    _write(tmp_path, files)
    try:
        checkpoint.load(str(tmp_path))
    except CheckpointError:
        pass


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(name=st.sampled_from(["params.npz", "opt_state.npz", "meta.json"]), cut=st.floats(0, 1),
       garbage=st.binary(max_size=64), where=st.floats(0, 1))
def test_fuzzed_files_give_checkpoint_error(tmp_path, saved, name, cut, garbage, where):
    """Any file truncated at any point, or with bytes overwritten anywhere: CheckpointError
    (or, for meta.json, a load that still validates), never another exception."""
    files = dict(saved[1])
    blob = bytearray(files[name][: int(len(files[name]) * cut)] if cut < 1 else files[name])
    at = int(len(blob) * where)
    blob[at:at + len(garbage)] = garbage
    files[name] = bytes(blob)
    _write(tmp_path, files)
    try:
        checkpoint.load(str(tmp_path))
    except CheckpointError:
        pass


def test_no_checkpoint_here(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        checkpoint.load(str(tmp_path))
    with pytest.raises(CheckpointError, match="no run directory"):
        checkpoint.load(str(tmp_path / "nope"))


def _without_newer_model_fields(meta: dict, version: int = 6) -> None:
    """A meta.json of `version` has none of the fields later versions added (they are refused there)."""
    for added, fields in checkpoint.ADDED_MODEL_FIELDS.items():
        for name in fields if added > version else ():
            meta["model_config"].pop(name, None)


def test_a_version_2_checkpoint_still_loads_as_a_char_run_that_evaluates_everything(tmp_path, saved):
    """Runs saved before the tokenizer kinds (format 2: a "vocab" string, no eval_tokens)."""
    files = dict(saved[1])
    meta = json.loads(files["meta.json"])
    meta["format_version"] = 2
    _without_newer_model_fields(meta)
    meta["vocab"] = meta.pop("tokenizer")["chars"]
    del meta["train_config"]["eval_tokens"]
    for name in ("positions", "tie_embeddings"):
        del meta["model_config"][name]
    del meta["origin"]
    files["meta.json"] = json.dumps(meta).encode()
    _write(tmp_path, files)
    loaded = checkpoint.load(str(tmp_path))
    assert loaded.tokenizer == TOK and loaded.train_config.eval_tokens is None
    assert loaded.model_config == MC


@pytest.mark.parametrize("version, drop, error", [
    (3, ("positions", "tie_embeddings", "origin"), None),
    (4, ("positions", "tie_embeddings"), r"ModelConfig lacks \['positions', 'tie_embeddings'\]"),
    (4, ("origin",), r"lacks \['origin'\]"),
    (3, ("positions", "tie_embeddings"), r"format version 3 has no \['origin'\]"),
    (3, ("origin",), r"format version 3 has no \['positions', 'tie_embeddings'\]"),
    (4.0, (), "version 4.0 is not supported"),
])
def test_the_fields_of_version_4_are_there_exactly_when_it_says_4(tmp_path, saved, version, drop, error):
    """Format 3 knew only sinusoidal positions, an untied head and runs trained here:
    it loads as such, and may not claim the fields of 4; format 4 must have them."""
    files = dict(saved[1])
    meta = json.loads(files["meta.json"])
    meta["format_version"] = version
    _without_newer_model_fields(meta)
    for name in drop:
        del (meta if name == "origin" else meta["model_config"])[name]
    files["meta.json"] = json.dumps(meta).encode()
    _write(tmp_path, files)
    if error is None:
        loaded = checkpoint.load(str(tmp_path))
        assert loaded.model_config == MC and loaded.origin is None
    else:
        with pytest.raises(CheckpointError, match=error):
            checkpoint.load(str(tmp_path))


def test_a_version_6_checkpoint_loads_as_the_gpt_model_it_was(tmp_path, saved):
    """Format 7 added Llama's choices to ModelConfig; a run saved before them is the
    GPT model (LayerNorm, GELU, multi-head, biases), whatever today's defaults are."""
    files = dict(saved[1])
    meta = json.loads(files["meta.json"])
    meta["format_version"] = 6
    _without_newer_model_fields(meta)
    files["meta.json"] = json.dumps(meta).encode()
    _write(tmp_path, files)
    loaded = checkpoint.load(str(tmp_path))
    assert loaded.model_config == MC
    assert (loaded.model_config.norm, loaded.model_config.mlp, loaded.model_config.bias) == ("layernorm", "gelu", True)
    assert loaded.model_config.n_kv_heads == loaded.model_config.n_heads
    meta["format_version"] = 6                                            # a version 6 may not claim them
    meta["model_config"] = {**meta["model_config"], "norm": "rmsnorm"}
    files["meta.json"] = json.dumps(meta).encode()
    _write(tmp_path, files)
    with pytest.raises(CheckpointError, match=r"format version 6 has no \['norm'\]; they came with version 7"):
        checkpoint.load(str(tmp_path))
    del meta["model_config"]["norm"]
    meta["format_version"] = 7                                            # a version 7 must have them
    files["meta.json"] = json.dumps(meta).encode()
    _write(tmp_path, files)
    with pytest.raises(CheckpointError, match="ModelConfig lacks"):
        checkpoint.load(str(tmp_path))


def test_a_version_7_checkpoint_loads_without_scaled_rotary_positions_and_may_not_claim_them(tmp_path, saved):
    """Format 8 added ModelConfig.rope_scaling: a run of 7 had none."""
    files = dict(saved[1])
    meta = json.loads(files["meta.json"])
    meta["format_version"] = 7
    _without_newer_model_fields(meta, 7)
    assert "rope_scaling" not in meta["model_config"]
    files["meta.json"] = json.dumps(meta).encode()
    _write(tmp_path, files)
    assert checkpoint.load(str(tmp_path)).model_config.rope_scaling is None
    meta["model_config"]["rope_scaling"] = None
    files["meta.json"] = json.dumps(meta).encode()
    _write(tmp_path, files)
    with pytest.raises(CheckpointError, match=r"format version 7 has no \['rope_scaling'\]; they came with version 8"):
        checkpoint.load(str(tmp_path))


def test_a_checkpoint_read_while_a_live_run_replaces_it_is_one_whole_checkpoint(tmp_path, key):
    """A reader racing a writer that saves again and again (generate, or a resume
    refused by the lock, while a run trains): every read is one save's meta.json with
    that save's arrays, never "damaged" (meta of one save, arrays of the next)."""
    import threading
    base = train.init_state(key, MC, TC.optimizer)
    states = [base._replace(step=jax.numpy.int32(s), params=jax.tree.map(lambda a, s=s: a * 0 + s, base.params))
              for s in range(1, 4)]
    checkpoint.save(str(tmp_path), states[0], model_config=MC, train_config=TC, tokenizer=TOK, data=DATA)
    stop = threading.Event()

    def writer():
        with standard_promotion():
            while not stop.is_set():
                for state in states:
                    checkpoint.save(str(tmp_path), state, model_config=MC, train_config=TC, tokenizer=TOK, data=DATA)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(40):
            model = checkpoint.load_model(str(tmp_path))
            assert float(model.params["ln_f"]["scale"][0]) == model.meta["step"]     # arrays of that very save
            ck = checkpoint.load(str(tmp_path))
            assert float(ck.state.params["ln_f"]["scale"][0]) == int(ck.state.step)
    finally:
        stop.set()
        thread.join()
