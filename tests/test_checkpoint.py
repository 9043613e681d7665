"""Checkpoints: exact round trip, atomic replacement, names numpy can read, and one
CheckpointError for anything damaged, truncated or hostile (fuzzed)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
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
from minitx_fn.errors import CheckpointError, RunFailed
from minitx_fn.tokenizer import CharTokenizer
from tests.helpers import legacy_meta, standard_promotion

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
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        checkpoint.load(str(tmp_path))
    with pytest.raises(CheckpointError, match="no run directory"):
        checkpoint.load(str(tmp_path / "nope"))


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


def test_a_version_6_checkpoint_upgrades_to_the_gpt_model_it_was(tmp_path, saved, capsys):
    """Format 7 added Llama's choices to ModelConfig; a run saved before them is the
    GPT model (LayerNorm, GELU, multi-head, biases), whatever today's defaults are.
    `minitx upgrade` rewrites it; a version 6 that claims a later field is refused."""
    from tests.helpers import run_main
    meta = legacy_meta(json.loads(saved[1]["meta.json"]), 6)
    _legacy(tmp_path, saved, meta)
    code, out, err = run_main(capsys, "upgrade", str(tmp_path))
    assert code == 0 and "from format 6 to format 9" in out, err
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


def test_a_patched_layer_never_decodes_a_saved_run_as_another_model(tmp_path, monkeypatch):
    """The issue that brought the provenance: attention.apply patched (to other maths)
    while a run trains, apply_cached not. The run is saved but the job refuses to call it
    done (its cached decode would be another model); loading it, patched or not, is
    refused; so is a layer patched after a save, whatever it changes (the code differs),
    until `upgrade` records code that was changed on purpose and computes the same."""
    from minitx_fn import job
    from minitx_fn.layers import attention, linear
    real, real_linear = attention.apply, linear.apply

    def shifted(params, x, spec, **kwargs):              # a layer of other maths
        return 3.0 * real(params, x, spec, **kwargs)

    run = str(tmp_path / "patched")
    model = {"d_model": 24, "n_heads": 2, "n_layers": 1, "max_len": 12}    # shapes no other test traces
    monkeypatch.setattr(attention, "apply", shifted)
    with pytest.raises(RunFailed, match="cached decode \\(apply_cached\\) disagrees with its apply.*the run is saved"):
        job.train(model=model, training={"steps": 40, "log_every": 40}, run_dir=run, sample_tokens=0,
                  log=io.StringIO())
    assert checkpoint.saved_step(run) == 40
    with pytest.raises(CheckpointError, match="cached decode \\(apply_cached\\) disagrees"):
        checkpoint.load_model(run)
    monkeypatch.setattr(attention, "apply", real)
    with pytest.raises(CheckpointError, match="the code of minitx_fn.layers.attention differs from the code that saved"):
        checkpoint.load_model(run)

    clean = str(tmp_path / "clean")            # another model: this process holds the patched one's compiled steps
    job.train(model={**model, "d_model": 20}, training={"steps": 40, "log_every": 40}, run_dir=clean, sample_tokens=0,
              log=io.StringIO())
    checkpoint.load_model(clean)
    # A patch of one logit column of the head, which no fixed probe of a few ids and
    # columns would see: refused for its code.
    monkeypatch.setattr(linear, "apply", lambda p, x, **k: (lambda y: y.at[..., 8:].add(3.0) if y.shape[-1] ==
                                                                       p["w"].shape[-1] else y)(real_linear(p, x, **k)))
    with pytest.raises(CheckpointError, match="the code of minitx_fn.layers.linear differs"):
        checkpoint.load_model(clean)
    monkeypatch.setattr(linear, "apply", real_linear)
    # With another release of the library the probe decides: an edited install whose
    # code (its digest) and logits moved is refused, naming the module. (Digests and
    # probe edited in meta.json: this process keeps its compiled probe of the real code.)
    meta_path = os.path.join(clean, "checkpoint", "meta.json")
    meta = json.load(open(meta_path))
    prov = meta["provenance"]
    edited_code = {**prov["library"], "minitx_fn.layers.linear": "0" * len(prov["library"]["minitx_fn.layers.linear"])}
    moved = " ".join(str(2 * float(x) + 1) for x in prov["probe"]["values"].split())
    json.dump({**meta, "provenance": {**prov, "minitx_fn": "0.0.9", "library": edited_code,
                                      "probe": {**prov["probe"], "values": moved}}}, open(meta_path, "w"))
    with pytest.raises(CheckpointError, match="does not compute what it computed when the run was saved.*its code "
                                              "changed \\(minitx_fn.layers.linear\\)"):
        checkpoint.load_model(clean)
    # Code changed on purpose, computing the same: refused until `upgrade` records it.
    json.dump({**meta, "provenance": {**prov, "library": edited_code}}, open(meta_path, "w"))
    with pytest.raises(CheckpointError, match="linear differs .*minitx upgrade RUN"):
        checkpoint.load_model(clean)
    assert checkpoint.upgrade(clean)[0] == 9
    checkpoint.load_model(clean)
