"""Checkpoints (`minitx_fn.checkpoint`): exact round trip, names numpy can read,
atomic replacement (a failed save, a full disk, a process killed at any moment, a
reader racing a writer), what `save` refuses before writing, one CheckpointError for
anything damaged, truncated or hostile (fuzzed), older formats upgraded, and runs
whose model is code of their own loaded only with consent."""

from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import random
import stat
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitx_fn import checkpoint, corpus, job, runs, train
from minitx_fn.config import ModelConfig, TrainConfig
from minitx_fn.errors import CheckpointError, DataError
from minitx_fn.tokenizer import CharTokenizer
from tests.helpers import TINY, Snapshot, fail_fsync, legacy_meta, run_main, standard_promotion

TOK = CharTokenizer.from_text("abcdefg")
MC = ModelConfig(vocab_size=TOK.vocab_size, d_model=8, n_heads=2, n_layers=2, max_len=8)
TC = TrainConfig(steps=10, optimizer={"warmup": 1})
DATA = {"path": "/somewhere/text.txt", "sha256": "ab" * 32}


@pytest.fixture(autouse=True)
def _optax_promotion():
    with standard_promotion():
        yield


def _save(run_dir, key, step=3):
    state = train.init_state(key, MC, TC.optimizer)._replace(step=jax.numpy.asarray(step, jax.numpy.int32))
    checkpoint.save(str(run_dir), state, model=MC, train_config=TC, tokenizer=TOK, data=DATA)
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
    assert ck.model == MC and ck.train_config == TC and ck.tokenizer == TOK and int(ck.state.step) == 3
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
    fail_fsync(monkeypatch, errno.ENOSPC)                  # the disk is full when the new files are synced
    with pytest.raises(OSError, match="No space"):
        _save(tmp_path, key, step=9)
    monkeypatch.undo()
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


def _model(meta: dict) -> dict:
    return meta["job"]["model"]["config"]


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format_version=1), "version 1 is not supported"),
    (lambda m: m.pop("step"), r"lacks \['step'\]"),
    (lambda m: m.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda m: m.update(step=-1), "step -1"),
    (lambda m: m.update(step=True), "step True"),
    (lambda m: _model(m).update(d_model="8"), "d_model = '8' is not of type"),
    (lambda m: _model(m).update(d_model=16), "does not match|has shape"),
    (lambda m: _model(m).update(colour="blue"), r"unknown fields \['colour'\]"),
    (lambda m: _model(m).update(n_heads=3), "divisible by n_heads=3"),
    (lambda m: _model(m).pop("vocab_size"), "says vocab_size=None"),           # a field left out takes its default
    (lambda m: m["job"]["training"]["optimizer"].update(lr=float("nan")), "lr=nan is invalid"),
    (lambda m: m["job"]["training"].update(lr=1e-3), r"unknown fields \['lr'\]"),
    (lambda m: m["job"]["model"].update(code="minitx_fn.config:TrainConfig"), "code of its own.*trust_code=True"),
    (lambda m: m["job"]["model"].update(code="not code"), "is not 'module:qualname'"),
    (lambda m: m["job"].pop("training"), "job must be"),
    (lambda m: m["provenance"].update(probe=[[1.0, "x"]]), "probe must be"),
    (lambda m: m.update(provenance=None), "provenance must be"),
    (lambda m: m["provenance"]["probe"].update(values="1 2 x"), "probe must be"),
    (lambda m: m["provenance"]["probe"].update(values="900 " * math.prod(m["provenance"]["probe"]["shape"])),
     "does not compute what it computed"),
    (lambda m: m["provenance"]["probe"].update(shape=[1, 4, 2], values="1 " * 8), r"the probe recorded is \[1, 4, 2\]"),
    (lambda m: m["provenance"]["library"].update({"minitx_fn.layers.linear": "0" * 64}),
     "the code of minitx_fn.layers.linear differs from the code that saved the run"),
    (lambda m: m["tokenizer"].update(chars="abc"), "char tokenizer has 3 ids but the model says vocab_size=7"),
    (lambda m: m["tokenizer"].update(chars="aabcdef"), "repeats a character"),
    (lambda m: m.update(tokenizer={"kind": "byte"}), "byte tokenizer has 256 ids but the model says vocab_size=7"),
    (lambda m: m.update(tokenizer={"kind": "words"}), "kind is one of"),
    (lambda m: m["tokenizer"].update(json="{}"), "a char tokenizer is an object of the strings"),
    (lambda m: m["tokenizer"].update(special={"eos_token_id": 1}), "a char tokenizer is an object of the strings"),
    (lambda m: m.update(tokenizer={"kind": "bpe", "json": "{not json"}), "not a valid tokenizers JSON|pip install"),
    (lambda m: m["job"].update(data={"path": 3}), "data must be null"),
    (lambda m: m["files"].pop("params.npz"), "files must give"),
    (lambda m: m["files"]["params.npz"].update(bytes=10**15), "params.npz.*is damaged"),      # a petabyte
    (lambda m: _model(m).update(max_len=10**9), "the probe recorded is.*its config in meta.json, or the probe, was "
                                                "edited"),
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
    parts = {"job": meta["job"], "files": meta["files"], "tokenizer": meta["tokenizer"],
             "model": _model(meta), "training": meta["job"]["training"]}
    paths = [(k,) for k in meta] + [(k, sub) for k, part in parts.items() for sub in part]
    return st.tuples(st.sampled_from(paths), st.sampled_from(["replace", "remove", "add"]), json_values,
                     st.text(max_size=5))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_fuzzed_metadata_gives_checkpoint_error_or_a_valid_checkpoint(tmp_path, saved, data):
    meta = json.loads(saved[1]["meta.json"])
    path, action, value, new_key = data.draw(_mutations(meta))
    mutated = copy.deepcopy(meta)
    parent = {"model": _model(mutated), "training": mutated["job"]["training"]}.get(path[0], mutated)
    for k in path[:-1]:
        parent = parent[k] if k in parent else parent
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
    for read in (checkpoint.load, checkpoint.load_model, checkpoint.read_job):
        with pytest.raises(CheckpointError, match="holds no checkpoint"):
            read(str(tmp_path))
        with pytest.raises(CheckpointError, match="no run directory"):
            read(str(tmp_path / "nope"))


@pytest.mark.parametrize("content, said", [(b"{not json", "is corrupt"), (b"[1, 2]", "holds list, not an object")])
def test_a_meta_json_that_is_no_json_object_is_named(tmp_path, saved, content, said):
    _write(tmp_path, {**saved[1], "meta.json": content})
    with pytest.raises(CheckpointError, match=said):
        checkpoint.load(str(tmp_path))


def _legacy(tmp_path, saved, meta: dict):
    """An old run's files, which `load` refuses (an upgrade away) and `upgrade` rewrites."""
    files = {**saved[1], "meta.json": json.dumps(meta).encode()}
    _write(tmp_path, files)
    if meta["format_version"] < 8:
        with pytest.raises(CheckpointError, match=r"older than this minitx_fn reads.*minitx upgrade RUN"):
            checkpoint.load(str(tmp_path))


def test_a_version_2_checkpoint_upgrades_to_a_char_run_that_evaluates_everything(tmp_path, saved):
    """Runs saved before the tokenizer kinds (format 2: a "vocab" string, no eval_tokens)."""
    meta = legacy_meta(json.loads(saved[1]["meta.json"]), 2)
    meta["vocab"] = meta.pop("tokenizer")["chars"]
    del meta["train_config"]["eval_tokens"]
    for name in ("positions", "tie_embeddings"):
        del meta["model_config"][name]
    del meta["origin"]
    _legacy(tmp_path, saved, meta)
    assert checkpoint.upgrade(str(tmp_path))[0] == 2
    loaded = checkpoint.load(str(tmp_path))
    assert loaded.tokenizer == TOK and loaded.train_config.eval_tokens is None
    assert loaded.model == MC and loaded.meta["format_version"] == checkpoint.FORMAT_VERSION
    jax.tree.map(np.testing.assert_array_equal, loaded.state, saved[0])           # the arrays as they were
    with pytest.raises(CheckpointError, match="in format 9 and its code is the code now; nothing to upgrade"):
        checkpoint.upgrade(str(tmp_path))


@pytest.mark.parametrize("version, drop, error", [
    (3, ("positions", "tie_embeddings", "origin"), None),
    (4, ("positions", "tie_embeddings"), None),           # fields a run lacks take their defaults
    (4, ("origin",), r"lacks \['origin'\]"),
    (3, ("positions", "tie_embeddings"), r"format version 3 has no \['origin'\]"),
    (3, ("origin",), r"format version 3 has no \['positions', 'tie_embeddings'\]"),
    (4.0, (), "version 4.0 is not supported"),
])
def test_the_fields_of_version_4_are_there_exactly_when_it_says_4(tmp_path, saved, version, drop, error):
    """Format 3 knew only sinusoidal positions, an untied head and runs trained here:
    it upgrades as such, and may not claim the fields of 4; format 4 must have them."""
    meta = legacy_meta(json.loads(saved[1]["meta.json"]), 4)
    meta["format_version"] = version
    for name in drop:
        del (meta if name == "origin" else meta["model_config"])[name]
    _write(tmp_path, {**saved[1], "meta.json": json.dumps(meta).encode()})
    if error is None:
        checkpoint.upgrade(str(tmp_path))
        loaded = checkpoint.load(str(tmp_path))
        assert loaded.model == MC and loaded.origin is None
    else:
        with pytest.raises(CheckpointError, match=error):
            checkpoint.upgrade(str(tmp_path))


def test_a_version_6_checkpoint_upgrades_to_the_gpt_model_it_was(tmp_path, saved):
    """Format 7 added Llama's choices to ModelConfig; a run saved before them is the
    GPT model (LayerNorm, GELU, multi-head, biases), whatever today's defaults are.
    `upgrade` rewrites it; a version 6 that claims a later field is refused."""
    meta = legacy_meta(json.loads(saved[1]["meta.json"]), 6)
    _legacy(tmp_path, saved, meta)
    assert checkpoint.upgrade(str(tmp_path)) == (6, str(tmp_path / "checkpoint"))
    loaded = checkpoint.load(str(tmp_path))
    assert loaded.model == MC and (loaded.model.norm, loaded.model.mlp, loaded.model.bias) == ("layernorm", "gelu",
                                                                                                True)
    meta["model_config"] = {**meta["model_config"], "norm": "rmsnorm"}
    _write(tmp_path, {**saved[1], "meta.json": json.dumps(meta).encode()})
    with pytest.raises(CheckpointError, match=r"format version 6 has no \['norm'\]; they came with version 7"):
        checkpoint.upgrade(str(tmp_path))
    del meta["model_config"]["norm"]
    meta["format_version"] = 7                                            # a field it lacks takes its default
    _write(tmp_path, {**saved[1], "meta.json": json.dumps(meta).encode()})
    checkpoint.upgrade(str(tmp_path))
    assert checkpoint.load(str(tmp_path)).model == MC


def test_a_version_8_checkpoint_loads_as_it_is_and_upgrades(tmp_path, saved):
    """Format 8, the one before this one, is read as it stands (the configs beside each
    other, no probe to hold the model to); format 7 had no rope_scaling, and may not claim it."""
    meta = legacy_meta(json.loads(saved[1]["meta.json"]), 8)
    _legacy(tmp_path, saved, meta)
    loaded = checkpoint.load(str(tmp_path))
    assert loaded.model == MC and loaded.train_config == TC and loaded.meta["provenance"] is None
    assert checkpoint.upgrade(str(tmp_path)) == (8, str(tmp_path / "checkpoint"))
    assert checkpoint.load(str(tmp_path)).meta["provenance"] == json.loads(saved[1]["meta.json"])["provenance"]
    meta = legacy_meta(json.loads(saved[1]["meta.json"]), 7)
    meta["model_config"]["rope_scaling"] = None
    _write(tmp_path, {**saved[1], "meta.json": json.dumps(meta).encode()})
    with pytest.raises(CheckpointError, match=r"format version 7 has no \['rope_scaling'\]; they came with version 8"):
        checkpoint.upgrade(str(tmp_path))


def test_a_checkpoint_read_while_a_live_run_replaces_it_is_one_whole_checkpoint(tmp_path, key):
    """A reader racing a writer that saves again and again (generate, or a resume
    refused by the lock, while a run trains): every read is one save's meta.json with
    that save's arrays, never "damaged" (meta of one save, arrays of the next)."""
    import threading
    base = train.init_state(key, MC, TC.optimizer)
    states = [base._replace(step=jax.numpy.int32(s), params=jax.tree.map(lambda a, s=s: a * 0 + s, base.params))
              for s in range(1, 4)]
    checkpoint.save(str(tmp_path), states[0], model=MC, train_config=TC, tokenizer=TOK, data=DATA)
    stop = threading.Event()

    def writer():
        with standard_promotion():
            while not stop.is_set():
                for state in states:
                    checkpoint.save(str(tmp_path), state, model=MC, train_config=TC, tokenizer=TOK, data=DATA)

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


def test_a_run_naming_code_of_its_own_loads_only_with_consent_and_only_code_that_fits_it(tmp_path, saved):
    """A run whose model is not the built-in one runs no code by being loaded: without
    trust_code it is refused, naming the code; with it, a class that cannot be imported,
    or is no model, or whose parameters do not fit the arrays, is one error naming the
    run and the code."""
    from tests.variants import Parallel
    meta = json.loads(saved[1]["meta.json"])
    for code, trust, said in (("tests.variants:Parallel", False, "'tests.variants:Parallel', code of its own"),
                              ("nowhere:Thing", True, "'nowhere:Thing' cannot be imported \\(ModuleNotFoundError"),
                              ("tests.variants:jnp", True, "is no model class"),
                              ("tests.variants:Parallel", True, r"params.npz \(for model tests.variants:Parallel\) does "
                                                                r"not match its config: missing \[\], unexpected "
                                                                r"\['blocks/ln2/bias', 'blocks/ln2/scale'\]")):
        meta["job"]["model"]["code"] = code
        _write(tmp_path, {**saved[1], "meta.json": json.dumps(meta).encode()})
        for load in (checkpoint.load, checkpoint.load_model, checkpoint.read_job):
            if load is checkpoint.read_job and "params.npz" in said:
                assert load(str(tmp_path), trust_code=trust).model == Parallel(**MC.to_dict())   # meta.json alone fits
                continue
            with pytest.raises(CheckpointError, match=str(tmp_path) + ".*" + said):
                load(str(tmp_path), trust_code=trust)


def test_a_model_class_a_run_could_not_name_is_refused_before_anything_is_written(tmp_path, key):
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Local(ModelConfig):
        pass

    state = train.init_state(key, MC, TC.optimizer)
    with pytest.raises(CheckpointError, match="cannot save: .*Local' cannot be imported"):
        checkpoint.save(str(tmp_path), state, model=Local(**MC.to_dict()), train_config=TC, tokenizer=TOK, data=DATA)
    assert runs.artifacts(str(tmp_path)) == []

# ----------------------------------------------------------------------------- what save refuses


SMALL_MC = ModelConfig(vocab_size=13, d_model=32, n_layers=1, n_heads=2, max_len=16)     # the built-in corpus's 13 ids


def test_save_wants_to_be_told_what_the_run_trained_on(tmp_path, monkeypatch):
    """data= has no default; None says "not recorded", and a resume then asks for the data
    instead of taking the built-in corpus."""
    monkeypatch.chdir(tmp_path)
    mc = SMALL_MC
    tc = TrainConfig(steps=4)
    state = train.init_state(jax.random.key(0), mc, tc.optimizer)
    tok = corpus.builtin().tokenizer
    with pytest.raises(TypeError, match="data"):
        checkpoint.save("r", state, model=mc, train_config=tc, tokenizer=tok)
    checkpoint.save("r", state, model=mc, train_config=tc, tokenizer=tok, data=None)
    with pytest.raises(DataError, match="does not record what it trained on"):
        job.plan(job.make(resume="r", training={"steps": 6}), log=io.StringIO())
    with pytest.raises(CheckpointError, match="data must be"):
        checkpoint.save("r", state, model=mc, train_config=tc, tokenizer=tok, data={"path": "x"})
    # Saved with the corpus itself (or its .source): the built-in corpus, said explicitly.
    checkpoint.save("b", state, model=mc, train_config=tc, tokenizer=tok, data=corpus.builtin())
    assert checkpoint.load("b").data == {"builtin": True}
    assert job.plan(job.make(resume="b", training={"steps": 6}), log=io.StringIO()).corpus.source == corpus.BUILTIN_SOURCE


def test_save_refuses_what_load_would_refuse_before_writing_anything(tmp_path, monkeypatch):
    """A model variant's parameters, or an optimiser state of another shape
    (optax.MultiSteps), were written and then refused by load."""
    monkeypatch.chdir(tmp_path)
    mc = SMALL_MC
    tc = TrainConfig(steps=4)
    state = train.init_state(jax.random.key(0), mc, tc.optimizer)
    tok = corpus.builtin().tokenizer
    variant = state._replace(params={**state.params, "extra": {"w": jnp.zeros(3)}})
    multi = optax.MultiSteps(train.make_optimizer(tc.optimizer), every_k_schedule=2)
    accumulating = train.new_state(state.params, multi)
    for bad, named in ((variant, "unexpected ['extra/w']"), (accumulating, "opt_state.npz")):
        with pytest.raises(CheckpointError, match=r"cannot save: .*" + named.replace("[", r"\[").replace("]", r"\]")):
            checkpoint.save("r", bad, model=mc, train_config=tc, tokenizer=tok, data=None)
        assert not os.path.exists("r/checkpoint") and runs.artifacts("r") == []


def test_save_refuses_steps_and_trees_that_would_not_come_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mc = SMALL_MC
    tc = TrainConfig(steps=4)
    state = train.init_state(jax.random.key(0), mc, tc.optimizer)
    tok = corpus.builtin().tokenizer
    for step in (jnp.int32(-5), jnp.float32(3.7)):
        with pytest.raises(CheckpointError, match="the step must be a whole number"):
            checkpoint.save("r", state._replace(step=step), model=mc, train_config=tc, tokenizer=tok, data=None)
    with pytest.raises(CheckpointError, match="train.TrainState"):
        checkpoint.save("r", {"params": state.params}, model=mc, train_config=tc, tokenizer=tok, data=None)
    assert not os.path.exists("r/checkpoint")
    for tree, said in (({"a/b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}, "both named 'a/b'"),
                       ({"w": jnp.ones(2, jnp.bfloat16)}, "bfloat16"), ({"w": jnp.array([1.0, jnp.nan])}, "non-finite")):
        with pytest.raises(CheckpointError, match=said):
            checkpoint.save_params("p.npz", tree)
        assert not os.path.exists("p.npz")
    checkpoint.save_params("p.npz", {"w": np.ones(2), "n": 3.0})
    assert checkpoint.load_params("p.npz", like={"w": np.zeros(2), "n": 0.0})["n"] == 3.0     # plain numbers as like


# ----------------------------------------------------------------------------- killed processes, a real full disk


@pytest.mark.heavy
def test_sigkill_at_random_moments_never_leaves_a_damaged_checkpoint(tmp_path):
    """Three times: a training process saving every step is killed with SIGKILL at a random
    moment (often mid-save); whatever checkpoint is left loads, and the next process
    resumes it. A final resume finishes with no temporary folder left."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "minitx_fn", "train"]
    first = [*TINY, "--save-every", "1", "--log-every", "5", "--steps", "100000", "--out", "k"]
    rng = random.Random(1234)
    steps = []
    for i in range(3):
        proc = subprocess.Popen(argv + (first if i == 0 else ["--resume", "k", "--save-every", "1"]),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
        try:
            for line in proc.stdout:
                if line.startswith("Step "):                  # training, and saving every step
                    break
            time.sleep(rng.uniform(0.0, 0.3))
            proc.kill()
            proc.wait(timeout=60)
        finally:
            proc.kill()
        with standard_promotion():
            steps.append(int(checkpoint.load(str(tmp_path / "k")).meta["step"]))
    assert steps == sorted(steps) and steps[-1] > 0
    done = subprocess.run(argv + ["--resume", "k", "--steps", str(steps[-1] + 3)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not [n for n in os.listdir(tmp_path / "k") if n.startswith(runs.TEMPORARY_PREFIX) or n == runs.LOCK]


def _mount_tmpfs(path, size: str) -> bool:
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_real_full_disk(tmp_path, capsys, monkeypatch):
    """A 1 MB tmpfs: the first checkpoints fit, later ones cannot. Needs mount (root);
    without it, test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary
    (and test_job.py's full disk during a save) cover the same path with os.fsync failing."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount); the simulated full disk covers this")
    try:
        monkeypatch.chdir(disk)
        # The checkpoint of this model is about 100 KB: a few fit, then the padding fills the disk.
        code, out, err = run_main(capsys, "train", *TINY, "--steps", "40", "--save-every", "10", "--out", "r")
        assert code == 0, err
        intact = Snapshot("r")
        with open("padding", "wb", buffering=0) as f:        # fill what is left ...
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        with open("padding", "r+b") as f:                    # ... but for room for the lock and a few records
            f.truncate(os.path.getsize("padding") - 16384)
        code, out, err = run_main(capsys, "train", "--resume", "r", "--steps", "80")
        assert code == 1 and "No space left on device" in err and "last good checkpoint (step 40)" in err, err
        intact.assert_unchanged()
        assert not [n for n in os.listdir("r") if n.startswith(runs.TEMPORARY_PREFIX)]
    finally:
        os.chdir(tmp_path)
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=10)


def test_a_pipe_in_place_of_the_parameters_is_refused_at_once(work):
    """A FIFO as params.npz would block the read until a writer came, past any signal."""
    import signal

    def hung(signum, frame):
        raise TimeoutError("params.npz as a FIFO was waited on")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        os.remove("builtin/checkpoint/params.npz")
        os.mkfifo("builtin/checkpoint/params.npz")
        with pytest.raises(CheckpointError, match="params.npz' is not a regular file"):
            checkpoint.load_model("builtin")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
