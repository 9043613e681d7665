"""Save and load a run: its job (model, training, data), vocabulary, parameters,
optimiser state, step.

A checkpoint is a directory `RUN/checkpoint/`:

    meta.json       format version, step, the job (below), the tokenizer (kind and
                    vocabulary, `tokenizer.to_meta`), its origin, its provenance (the
                    model's code and what it computes), and each array file's SHA-256
    params.npz      one array per parameter, named by its tree path ("blocks/attn/qkv/w")
    opt_state.npz   the optimiser state, named the same way ("1/0/mu/blocks/attn/qkv/w"
                    is Adam's first moment of that parameter; "1/0/count" its step count)

No pickle: JSON and numpy's npz, so numpy alone can read a run (the README shows
how). The batch key is not stored: it is `train.keys(seed).data`.

The job, as a dict: {"model": {"code": "module:qualname", "config": {...its fields}},
"training": {...TrainConfig's fields, optimizer and lora nested}, "data": ...}. The
model's code names its class (the built-in `minitx_fn.config:ModelConfig`, or a model
of one's own, as Hugging Face's `auto_map` does); loading a run whose code is not the
built-in imports that class only when the caller says so (`trust_code=True`, the CLI's
`--trust-code`): a run from elsewhere never runs code by being loaded. A field a
config lacks in an older run takes its default, so a new setting needs no new format.

`data` says what the run trained on, so `--resume` trains on the same text:
    {"builtin": true}               the built-in corpus
    {"path": PATH, "sha256": HEX}   a text file (its absolute path and SHA-256)
    {"path": null, "sha256": HEX}   a text or ids given in memory (`corpus.Corpus.source`)
    null                            not recorded: resuming needs the data given again

The provenance (`provenance.py`): digests of the code that computes the model, and a
probe of what it computed. Loading refuses library code patched or edited since the
save, and a model that no longer computes the probe (with `apply`, and with the cached
decode), so nothing decodes a saved run as a model it is not.

Formats: this version reads format 9 and the one before it (8, read as 9 in memory);
`upgrade` (`minitx upgrade RUN`) rewrites any older run (2 to 8) as format 9, replacing
its files only once the new ones are whole.

Saving writes everything into a temporary directory and renames it into place
(the previous checkpoint is `checkpoint.old` for the instant between the two
renames), so a crash never leaves a half-written checkpoint where a good one stood.
Only finite values are saved (the loop checks). Loading validates the whole of
meta.json (types, ranges, consistency) before it reads an array, checks each
array file's size and SHA-256 before parsing it, then every array's name, shape,
dtype and finiteness; every failure is one CheckpointError saying what is wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from minitx_fn import defaults, lora, runs, signals
from minitx_fn.config import INT32_MAX, LanguageModel, ModelConfig, OptimizerConfig, TrainConfig, job_dict  # noqa: F401
from minitx_fn import provenance
from minitx_fn.provenance import BUILTIN_CODE, check_importable, from_dict, probe_problem, record, resolve, verify
from minitx_fn.errors import CheckpointError
from minitx_fn import tokenizer as tokenizers
from minitx_fn.tokenizer import CharTokenizer, Tokenizer  # noqa: F401  (CharTokenizer: the doctests)
from minitx_fn.train import TrainState, init_state, lora_state

# 9: the job as a dict ({"model": {"code", "config"}, "training" with the optimizer and lora
#    nested, "data"}), and its provenance; a field missing from a config takes its default.
# 8: ModelConfig.rope_scaling; a bpe tokenizer may carry "special" (read as format 9).
# 2 to 7: `upgrade` rewrites them (their field tables are in `_legacy_as_8`).
FORMAT_VERSION = 9
READABLE_VERSIONS = (8, 9)
UPGRADABLE_VERSIONS = (2, 3, 4, 5, 6, 7, 8)
BUILTIN = {"builtin": True}       # `data` of a run on the built-in corpus
MAX_BASES = 16                    # LoRA runs on LoRA runs: how deep load_model follows their bases
IMPORTED = ("gpt2", "hf")         # origin {KEY: folder} of a model imported from Hugging Face
NAME = runs.CHECKPOINT
ARRAY_FILES = ("params.npz", "opt_state.npz")
META_KEYS = {"format_version", "step", "job", "tokenizer", "origin", "provenance", "files"}
PROVENANCE_KEYS = {"minitx_fn", "python", "library", "own", "probe"}
JOB_KEYS = {"model", "training", "data"}


class Checkpoint(NamedTuple):
    state: TrainState
    model: LanguageModel
    train_config: TrainConfig
    tokenizer: Tokenizer
    data: dict | None          # what the run trained on (the module docstring), None if not recorded
    meta: dict                 # meta.json as read (format 8 as format 9)
    base: dict | None = None   # a LoRA run's frozen parameters (its base's, `base_params`)

    @property
    def origin(self) -> dict | None:
        """{"gpt2": folder} ({"hf": folder} for a Llama or Qwen2) for a model `minitx
        import-hf` wrote; {"init_from": {"path", "sha256"}} for a run started from another
        run's parameters; None for a run trained here from scratch."""
        return self.meta.get("origin")

    @property
    def params(self) -> dict:
        """The model's parameters: a LoRA run's adapters merged into its base."""
        if self.base is None:
            return self.state.params
        return lora.merge(self.base, self.state.params, scale=self.train_config.lora.scale)


def path_name(path) -> str:
    """A tree path as "a/b/c": dict keys, sequence indices and NamedTuple fields.

    Example:
        >>> [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path({"a": [1, {"b": 2}]})]
        ['a/0', 'a/1/b']
    """
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def named_arrays(tree) -> dict[str, np.ndarray]:
    """{tree path: numpy array} for every leaf.

    Example:
        >>> named_arrays({"w": np.zeros(2)})
        {'w': array([0., 0.])}
    """
    arrays = {}
    for p, a in jax.tree_util.tree_leaves_with_path(tree):
        name = path_name(p)
        if name in arrays:          # {"a/b": x, "a": {"b": y}}: one name, two arrays; a file would keep one
            raise CheckpointError(f"two arrays of the tree are both named {name!r}; rename a key so that tree paths "
                                  f"are unique")
        arrays[name] = np.asarray(a)
    return arrays


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _sync_dir(path: str) -> None:
    """Make a rename inside `path` durable (where the OS allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(run_dir: str, state: TrainState, *, model: LanguageModel, train_config: TrainConfig,
         tokenizer: Tokenizer, data, origin: dict | None = None, base: dict | None = None) -> str:
    """Write RUN/checkpoint atomically; returns its path.

    `model` is the model value the parameters belong to (its code and fields are
    recorded, and its probe). `data` says what the run trained on (the module
    docstring): pass the training corpus's `source` (`corpus.Corpus.source`, or the
    Corpus itself), `BUILTIN`, or None when it is not known (a later resume then needs
    the data given again). `origin` is None for a run trained here, {"gpt2": path} (or
    {"hf": path}) for one imported from Hugging Face, {"init_from": ...} for one started
    from another run (a LoRA run's adapters then apply to `base`, its parameters).
    What `load` would refuse is refused here, before anything is written: a model whose
    class could not be imported back, a state whose parameters or optimiser state are
    not those of `model` and `make_optimizer(train_config.optimizer)` (CheckpointError
    naming the arrays). OSError (a full or read-only disk) leaves the previous
    checkpoint as it was.

    Example:
        >>> cfg, tc, tok = ModelConfig(vocab_size=3, d_model=8, n_heads=2), TrainConfig(), CharTokenizer('abc')
        >>> run = tempfile.mkdtemp()
        >>> state = init_state(jax.random.key(0), cfg, tc.optimizer)
        >>> path = save(run, state, model=cfg, train_config=tc, tokenizer=tok, data=BUILTIN)
        >>> sorted(os.listdir(path))
        ['meta.json', 'opt_state.npz', 'params.npz']
        >>> ck = load(run)
        >>> int(ck.state.step), ck.tokenizer.chars, ck.model == cfg, ck.data
        (0, 'abc', True, {'builtin': True})
    """
    data = getattr(data, "source", data)                 # a Corpus stands for its source
    problem = _data_problem(data) or _origin_problem(origin) or _lora_problem(train_config, origin)
    if problem:
        raise CheckpointError(f"cannot save: {problem}")
    try:
        check_importable(model)
    except CheckpointError as e:
        raise CheckpointError(f"cannot save: {e}") from None
    problem = vocabulary_problem(tokenizer, model)
    if problem:
        raise CheckpointError(f"cannot save: {problem}")
    if not isinstance(state, TrainState):
        raise CheckpointError(f"cannot save: the state must be a train.TrainState, not {type(state).__name__}")
    if (train_config.lora is None) != (base is None):
        raise CheckpointError("cannot save: a LoRA run's state holds adapters and needs base= (the parameters they "
                              "apply to), and only a LoRA run takes one")
    template = _template(model, train_config)
    host = jax.device_get(state)
    step = np.asarray(host.step)
    if not (step.shape == () and np.issubdtype(step.dtype, np.integer) and 0 <= int(step) <= INT32_MAX):
        raise CheckpointError(f"cannot save: the step must be a whole number in [0, {INT32_MAX}], not "
                              f"{step.tolist()!r} ({step.dtype})")
    arrays = {name: named_arrays(tree) for name, tree in zip(ARRAY_FILES, (host.params, host.opt_state))}
    for name, t in zip(ARRAY_FILES, (template.params, template.opt_state)):
        _check_arrays(t, arrays[name], f"cannot save: {name}")
    params = host.params if base is None else lora.merge(base, host.params, scale=train_config.lora.scale)
    recorded = record(model, params)
    os.makedirs(run_dir, mode=runs.dir_mode(), exist_ok=True)
    runs.remove_temporaries(run_dir)                                   # left by a killed save
    final = os.path.join(run_dir, NAME)
    tmp = tempfile.mkdtemp(prefix=runs.TEMPORARY_PREFIX, dir=run_dir)
    try:
        os.chmod(tmp, runs.dir_mode())                                  # mkdtemp makes it 0700
        files = {}
        for name in ARRAY_FILES:
            blob = _npz_bytes(arrays[name])
            _write(os.path.join(tmp, name), blob)
            files[name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        meta = {"format_version": FORMAT_VERSION, "step": int(host.step), "job": job_dict(model, train_config, data),
                "tokenizer": tokenizer.to_meta(), "origin": origin, "provenance": recorded, "files": files}
        _write(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1, allow_nan=False).encode())
        _sync_dir(tmp)
        old = final + ".old"
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _sync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def locate(run_dir: str) -> str:
    """The checkpoint directory of a run (or a checkpoint directory given directly).

    If a crash fell between the two renames of `save`, only `checkpoint.old` exists:
    it is the last complete checkpoint, so use it.

    Example:
        >>> locate(tempfile.mkdtemp())
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: ... holds no checkpoint (no checkpoint/meta.json); train first, or give the directory of a training run
    """
    for candidate in (run_dir, os.path.join(run_dir, NAME), os.path.join(run_dir, NAME + ".old")):
        if os.path.isfile(os.path.join(candidate, "meta.json")):
            return candidate
        if runs.not_regular(os.path.join(candidate, "meta.json")):
            raise CheckpointError(f"{os.path.join(candidate, 'meta.json')!r} is not a regular file (a pipe or a "
                                  f"device); the checkpoint is damaged: use an earlier copy of the run")
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"no run directory {run_dir!r}; give the directory of a training run")
    raise CheckpointError(f"{run_dir!r} holds no checkpoint (no {NAME}/meta.json); train first, "
                          f"or give the directory of a training run")


# ----------------------------------------------------------------------------- validation



# ----------------------------------------------------------------------------- validation


def vocabulary_problem(tokenizer: Tokenizer, model: LanguageModel) -> str:
    """What keeps a tokenizer from serving a model, or "". Their sizes are equal, but
    for a bpe tokenizer, which may have fewer ids than the model has rows: a table
    padded past the tokenizer, as Qwen2's (import-hf); generation never draws those
    rows (`Sampler.id_limit`). Runs trained here always have them equal, so a char or
    byte tokenizer of another size is a swapped or edited one.

    Example:
        >>> vocabulary_problem(CharTokenizer("abc"), ModelConfig(vocab_size=5))
        'the char tokenizer has 3 ids but the model says vocab_size=5'
    """
    n, v = tokenizer.vocab_size, model.vocab_size
    if v is None or n > v or (n < v and not tokenizer.padded_table):
        return f"the {tokenizer.kind} tokenizer has {n} ids but the model says vocab_size={v}"
    return ""


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _data_problem(data: Any) -> str:
    """What is wrong with a checkpoint's `data` (the module docstring), or ""."""
    if data is None or data == BUILTIN:
        return ""
    if (isinstance(data, dict) and set(data) == {"path", "sha256"} and isinstance(data["sha256"], str)
            and _HEX64.fullmatch(data["sha256"])
            and (data["path"] is None or (isinstance(data["path"], str) and data["path"] and "\0" not in data["path"]))):
        return ""
    return ('data must be null, {"builtin": true} or {"path": a path or null, "sha256": 64 hex digits} '
            '(pass the training corpus\'s .source)')


def _path_problem(path: Any) -> bool:
    return not (isinstance(path, str) and path and "\0" not in path)


def _origin_problem(origin: Any) -> str:
    """What is wrong with a checkpoint's `origin`, or "": null (trained here from scratch),
    {"gpt2" or "hf": folder} (imported), or {"init_from": {"path", "sha256"}} (started from
    another run's parameters, the SHA-256 of its params.npz)."""
    if origin is None or (isinstance(origin, dict) and len(origin) == 1 and set(origin) <= set(IMPORTED)
                          and not _path_problem(next(iter(origin.values())))):
        return ""
    source = origin.get("init_from") if isinstance(origin, dict) and set(origin) == {"init_from"} else None
    if (isinstance(source, dict) and set(source) == {"path", "sha256"} and not _path_problem(source["path"])
            and isinstance(source["sha256"], str) and _HEX64.fullmatch(source["sha256"])):
        return ""
    return ('origin must be null, {"gpt2" or "hf": the path of a folder} or {"init_from": {"path": a run, "sha256": '
            '64 hex digits}}')


def _lora_problem(train_config: TrainConfig, origin: Any) -> str:
    """A LoRA run's adapters mean nothing without their base: its origin must name it."""
    if train_config.lora is not None and not (isinstance(origin, dict) and "init_from" in origin):
        return 'a LoRA run (lora_rank > 0) needs origin {"init_from": ...}, the run its adapters apply to'
    return ""


def _template(model: LanguageModel, train_config: TrainConfig) -> TrainState:
    """The shapes and dtypes of a run's state (jax.ShapeDtypeStruct leaves, nothing computed):
    a LoRA run's parameters are its adapters."""
    key, oc = jax.random.key(0), train_config.optimizer
    if train_config.lora is None:
        return jax.eval_shape(lambda: init_state(key, model, oc))
    return jax.eval_shape(lambda: lora_state(key, model, model.init(key), oc, train_config.lora))


# ----------------------------------------------------------------------------- meta.json and its formats


def _current(meta: Any, where: str, *, upgrading: bool = False) -> dict:
    """meta.json as format 9, its structure checked (the model, the training config and
    the tokenizer are checked as `_parse` builds them). Format 8 is read as 9; older
    formats only when `upgrading` (`upgrade`)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} holds {type(meta).__name__}, not an object")
    version = meta.get("format_version")
    readable = READABLE_VERSIONS + (UPGRADABLE_VERSIONS if upgrading else ())
    if type(version) is not int or version not in readable:     # 4.0 and True are not versions
        if type(version) is int and version in UPGRADABLE_VERSIONS:
            raise CheckpointError(f"{where}: checkpoint format version {version} is older than this minitx_fn reads "
                                  f"({READABLE_VERSIONS}); rewrite the run as format {FORMAT_VERSION} with `minitx "
                                  f"upgrade RUN` (checkpoint.upgrade)")
        raise CheckpointError(f"checkpoint format version {version!r} is not supported (this minitx_fn reads "
                              f"versions {READABLE_VERSIONS}); train a new run, or load it with the version that "
                              f"wrote it")
    if version < FORMAT_VERSION:
        meta = _from_8(_legacy_as_8(meta, where) if version < 8 else meta, where)
    unknown, missing = sorted(set(meta) - META_KEYS), sorted(META_KEYS - set(meta))
    if unknown or missing:
        raise CheckpointError(f"{where} " + (f"has unknown keys {unknown}" if unknown else f"lacks {missing}"))
    step, job = meta["step"], meta["job"]
    if not (_whole(step) and 0 <= step <= INT32_MAX):
        raise CheckpointError(f"{where}: step {step!r} is not a whole number in [0, {INT32_MAX}]")
    if not (isinstance(job, dict) and set(job) == JOB_KEYS and isinstance(job["model"], dict)
            and set(job["model"]) == {"code", "config"}):
        raise CheckpointError(f"{where}: job must be {{\"model\": {{\"code\", \"config\"}}, \"training\", \"data\"}}")
    recorded = meta["provenance"]
    if not (recorded is None and version < FORMAT_VERSION):
        hexes = lambda d: isinstance(d, dict) and all(isinstance(v, str) and _HEX64.fullmatch(v) for v in d.values())  # noqa: E731
        problem = probe_problem(recorded.get("probe")) if isinstance(recorded, dict) else "not an object"
        if problem or set(recorded) != PROVENANCE_KEYS or not all(isinstance(recorded[k], str)
                                                                 for k in ("minitx_fn", "python")) \
                or not (hexes(recorded["library"]) and hexes(recorded["own"])):
            raise CheckpointError(f"{where}: provenance must be {{minitx_fn, python, library, own, probe}}"
                                  + (f": {problem}" if problem and problem != "not an object" else ""))
    problem = _data_problem(job["data"]) or _origin_problem(meta["origin"])
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    files = meta["files"]
    if not (isinstance(files, dict) and set(files) == set(ARRAY_FILES) and all(
            isinstance(f, dict) and set(f) == {"bytes", "sha256"} and _whole(f["bytes"]) and f["bytes"] >= 0
            and isinstance(f["sha256"], str) and _HEX64.fullmatch(f["sha256"]) for f in files.values())):
        raise CheckpointError(f"{where}: files must give bytes and sha256 of {list(ARRAY_FILES)}")
    return meta


def _parse(meta: dict, where: str, trust_code: bool) -> tuple[LanguageModel, TrainConfig, Tokenizer]:
    """The model, training config and tokenizer of a format-9 meta.json, each checked."""
    job = meta["job"]
    model = resolve(job["model"]["code"], job["model"]["config"], trust_code=trust_code, where=where)
    train_config = from_dict(TrainConfig, job["training"], where)
    try:
        tokenizer = tokenizers.from_meta(meta["tokenizer"])
    except ValueError as e:
        raise CheckpointError(f"{where}: tokenizer: {e}") from None
    problem = vocabulary_problem(tokenizer, model) or _lora_problem(train_config, meta["origin"])
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    return model, train_config, tokenizer


def validate_meta(meta: Any, where: str = "meta.json", *, trust_code: bool = False
                  ) -> tuple[LanguageModel, TrainConfig, Tokenizer]:
    """The model, training config and tokenizer of a checkpoint's meta.json (format 9,
    or 8), after checking every field: types, ranges and consistency. CheckpointError
    names the first problem.

    Example:
        >>> validate_meta({"format_version": 9})
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: meta.json lacks ['files', 'job', 'origin', 'provenance', 'step', 'tokenizer']
    """
    return _parse(_current(meta, where), where, trust_code)


def _from_8(meta: dict, where: str) -> dict:
    """A format-8 meta.json as format 9: its configs become the job (the built-in model,
    the training config's optimizer and LoRA fields nested), with no provenance. A
    model config that format 8 could not have written (positions "none") is refused."""
    unknown, missing = sorted(set(meta) - LEGACY_KEYS), sorted(LEGACY_KEYS - set(meta))
    if unknown or missing:
        raise CheckpointError(f"{where} " + (f"has unknown keys {unknown}" if unknown else f"lacks {missing}"))
    tc = meta["train_config"]
    if not isinstance(tc, dict):
        raise CheckpointError(f"{where}: TrainConfig is {type(tc).__name__}, not an object")
    if isinstance(meta["model_config"], dict) and meta["model_config"].get("positions") == "none":
        raise CheckpointError(f"{where}: format version 8 has no positions 'none'; it came with version 9")
    tc = dict(tc)
    optimizer = {f.name: tc.pop(f.name) for f in dataclasses.fields(OptimizerConfig) if f.name in tc}
    rank, alpha, targets = tc.pop("lora_rank", 0), tc.pop("lora_alpha", None), tc.pop("lora_targets", "attn")
    lora_config = None if rank == 0 else {"rank": rank, "alpha": alpha, "targets": targets}
    return {"format_version": meta["format_version"], "step": meta["step"],
            "job": {"model": {"code": BUILTIN_CODE, "config": meta["model_config"]},
                    "training": {**tc, "optimizer": optimizer, "lora": lora_config}, "data": meta["data"]},
            "tokenizer": meta["tokenizer"], "origin": meta["origin"], "provenance": None, "files": meta["files"]}


# Formats 2 to 7 (`upgrade` only): the config fields a version added, with the value
# every earlier run had. 3: the tokenizer's kind and TrainConfig.eval_tokens; 4:
# ModelConfig.positions and tie_embeddings, and "origin"; 5: "data" explicit ({"builtin":
# true}, null only when not recorded) and TrainConfig.grad_accum; 6: LoRA; 7: Llama's
# choices; 8: ModelConfig.rope_scaling.
ADDED_TRAIN_FIELDS = {5: {"grad_accum": 1}, 6: {"lora_rank": 0, "lora_alpha": None, "lora_targets": "attn"}}
ADDED_MODEL_FIELDS = {7: {"norm": "layernorm", "mlp": "gelu", "n_kv_heads": None, "rope_theta": defaults.ROPE_THETA,
                          "bias": True, "qkv_bias": None},
                      8: {"rope_scaling": None}}
LEGACY_KEYS = {"format_version", "step", "tokenizer", "model_config", "train_config", "data", "origin", "files"}


def _legacy_as_8(meta: dict, where: str) -> dict:
    """A meta.json of format 2 to 7 as format 8: what each later version added, with
    the value its runs had; a field a version cannot have is refused (an edited or
    mislabelled meta.json)."""
    version = meta["format_version"]
    if version == 2:                     # its "vocab" string is a char tokenizer; it evaluated whole splits
        meta = dict(meta)
        if "vocab" in meta:
            if not isinstance(meta["vocab"], str):
                raise CheckpointError(f"{where}: vocab is {type(meta['vocab']).__name__}, not a string")
            meta["tokenizer"] = {"kind": "char", "chars": meta.pop("vocab")}
        if isinstance(meta.get("train_config"), dict):
            meta["train_config"] = {"eval_tokens": None, **meta["train_config"]}
    model_fields = meta["model_config"] if isinstance(meta.get("model_config"), dict) else {}
    if version in (2, 3):
        # Runs before version 4 were trained here, with sinusoidal positions and an untied
        # head; those versions have none of the three fields, and may not claim them.
        newer = sorted({"origin"} & set(meta)) + sorted({"positions", "tie_embeddings"} & set(model_fields))
        if newer:
            raise CheckpointError(f"{where}: format version {version} has no {newer}; they came with version 4")
        meta = {**meta, "origin": None}
        if model_fields:
            meta["model_config"] = {**model_fields, "positions": "sinusoidal", "tie_embeddings": False}
    for added in range(version + 1, 9):
        claimed = sorted(set(ADDED_MODEL_FIELDS.get(added, {})) & set(model_fields))
        if claimed:
            raise CheckpointError(f"{where}: format version {version} has no {claimed}; they came with version {added}")
        for part, fields in (("train_config", ADDED_TRAIN_FIELDS), ("model_config", ADDED_MODEL_FIELDS)):
            if isinstance(meta.get(part), dict):
                meta = {**meta, part: {**fields.get(added, {}), **meta[part]}}
    if version < 5:
        if isinstance(meta.get("data"), dict) and not isinstance(meta["data"].get("path"), str):
            raise CheckpointError(f"{where}: format version {version} has only null or a file as data; the rest "
                                  f"came with version 5")
        if meta.get("data") is None:
            meta = {**meta, "data": BUILTIN}       # before format 5 only the built-in corpus was null
    return meta


def _read_arrays(path: str, expected: dict) -> dict[str, np.ndarray]:
    """An npz file's arrays, after checking its size and SHA-256 against meta.json."""
    if runs.not_regular(path):
        raise CheckpointError(f"checkpoint file {path!r} is not a regular file (a pipe or a device); the checkpoint "
                              f"is damaged: use an earlier copy of the run, or train again")
    try:
        with open(path, "rb") as f:
            # The size first: meta.json may claim any number, and only a file of the
            # recorded size is worth reading.
            blob = f.read() if os.fstat(f.fileno()).st_size == expected["bytes"] else b""
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path!r} is missing; the checkpoint is incomplete") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path!r}: {e.strerror}") from None
    if len(blob) != expected["bytes"] or hashlib.sha256(blob).hexdigest() != expected["sha256"]:
        raise CheckpointError(f"checkpoint file {path!r} is damaged: its size or SHA-256 differs from what was "
                              f"saved; use an earlier copy of the run, or train again")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:        # the checksum matched, so meta.json was written to match a bad file
        raise CheckpointError(f"checkpoint file {path!r} is not a valid npz file ({type(e).__name__})") from None


def _check_arrays(template, arrays: dict[str, np.ndarray], what: str) -> None:
    """CheckpointError unless arrays (named by tree path) are exactly the leaves of
    template, each of its shape and dtype, and finite."""
    named = [(path_name(p), want) for p, want in jax.tree_util.tree_leaves_with_path(template)]
    missing, unknown = sorted({n for n, _ in named} - arrays.keys()), sorted(arrays.keys() - {n for n, _ in named})
    if missing or unknown:
        raise CheckpointError(f"{what} does not match its config: missing {missing[:5]}, unexpected "
                              f"{unknown[:5]}")
    for name, want in named:
        got = arrays[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{what}: array {name!r} has shape {got.shape} and dtype {got.dtype}, "
                                  f"but its config needs shape {want.shape} and dtype {want.dtype}")
        if np.issubdtype(got.dtype, np.inexact) and not np.isfinite(got).all():
            raise CheckpointError(f"{what}: array {name!r} holds non-finite values (NaN or infinity); this "
                                  f"checkpoint cannot be used")


def _build(template, arrays: dict[str, np.ndarray], what: str):
    """The tree of `template` from arrays named by tree path, each checked (`_check_arrays`)."""
    _check_arrays(template, arrays, what)
    leaves = [jax.numpy.asarray(arrays[path_name(p)]) for p, _ in jax.tree_util.tree_leaves_with_path(template)]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def _arrays_of(path: str, name: str, model: LanguageModel) -> str:
    """How an array file's problems name it: the file, and the model it must fit."""
    return f"{os.path.join(path, name)} (for model {model.code})"


def _read_meta(run_dir: str, *, upgrading: bool = False) -> tuple[str, dict]:
    """(checkpoint folder, its meta.json as format 9), the structure checked (`_current`)."""
    path = locate(run_dir)
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read())
    except OSError as e:
        raise CheckpointError(f"cannot read {meta_path!r}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:          # JSONDecodeError, bad UTF-8, absurd nesting
        raise CheckpointError(f"checkpoint metadata {meta_path!r} is corrupt ({type(e).__name__})") from None
    return path, _current(meta, meta_path, upgrading=upgrading)


READ_TRIES = 5      # a checkpoint read while a live run replaces it is read again, up to this many times


def _consistently(run_dir: str, read, *, upgrading: bool = False):
    """read(path, meta) on one whole checkpoint: a save by a live run can replace the
    checkpoint while it is read (meta.json of one save, arrays of the next, or a folder
    renamed away mid-read); then it is read again, while what is on disk keeps
    changing, up to READ_TRIES times. A checkpoint that is damaged and stays so is
    reported as it is."""
    for attempt in range(READ_TRIES):
        seen = None
        try:
            seen = _read_meta(run_dir, upgrading=upgrading)
            return read(*seen)
        except CheckpointError:
            try:
                now = _read_meta(run_dir, upgrading=upgrading)
            except CheckpointError:
                now = None
            if attempt == READ_TRIES - 1 or (now is not None and now == seen) or (now is None and seen is None
                                                                                 and attempt >= 1):
                raise
            time.sleep(0.05 * (attempt + 1))


def saved_step(run_dir: str) -> int:
    """The step of a run's checkpoint, from its meta.json alone (checked, no array read).

    Example:
        >>> saved_step('/no/such/run')
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: no run directory '/no/such/run'; give the directory of a training run
    """
    return int(_read_meta(run_dir)[1]["step"])


def load(run_dir: str, *, trust_code: bool = False) -> Checkpoint:
    """Read and validate a checkpoint, a LoRA run's base with it (`base_params`), and
    check that its model still computes what it did when saved (`verify`);
    CheckpointError says exactly what is wrong. trust_code: a run whose model is code of
    its own (not the built-in) imports that code only with it (the module docstring).

    Example:
        >>> load('/no/such/run')
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: no run directory '/no/such/run'; give the directory of a training run
    """
    def read(path, meta):
        model, train_config, tokenizer = _parse(meta, path, trust_code)
        template = _template(model, train_config)
        params, opt_state = (_build(t, _read_arrays(os.path.join(path, name), meta["files"][name]),
                                    _arrays_of(path, name, model))
                             for t, name in zip((template.params, template.opt_state), ARRAY_FILES))
        state = TrainState(params, opt_state, jax.numpy.asarray(meta["step"], jax.numpy.int32))
        base = None if train_config.lora is None else base_params(meta, model, trust_code=trust_code,
                                                                 _seen=frozenset({os.path.realpath(path)}))
        ck = Checkpoint(state, model, train_config, tokenizer, meta["job"]["data"], meta, base)
        verify(model, ck.params, meta["provenance"], path)
        return ck
    return _consistently(run_dir, read)


class SavedJob(NamedTuple):
    """What a run's meta.json says of its job (`read_job`): no array read."""

    model: LanguageModel
    train_config: TrainConfig
    tokenizer: Tokenizer
    data: dict | None
    origin: dict | None
    step: int


def read_job(run_dir: str, *, trust_code: bool = False) -> SavedJob:
    """The job a run was saved with, from its meta.json alone (every field checked, no
    array read): what a resume continues and a fine-tuning run starts from.

    Example:
        >>> read_job('/no/such/run')
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: no run directory '/no/such/run'; give the directory of a training run
    """
    path, meta = _read_meta(run_dir)
    model, train_config, tokenizer = _parse(meta, path, trust_code)
    return SavedJob(model, train_config, tokenizer, meta["job"]["data"], meta["origin"], int(meta["step"]))


def run_of(path: str) -> str:
    """The run directory that a run, or one of its checkpoint folders, belongs to (its
    real path, links followed): where its lock lives and what a run started from it records.

    Example:
        >>> run_of('/no/such/run')
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: no run directory '/no/such/run'; give the directory of a training run
    """
    found = os.path.realpath(locate(path))
    return os.path.dirname(found) if os.path.basename(found) in (NAME, NAME + ".old") else found


def lora_depth(run_dir: str, *, trust_code: bool = False) -> int:
    """How many LoRA runs deep a run's chain of bases is, from meta.json alone: 0 for a
    run of its own parameters, 1 + its base's for a LoRA run (`load_model` follows a
    chain of at most MAX_BASES - 1; deeper than MAX_BASES, it stops counting).

    Example:
        >>> lora_depth('/no/such/run')
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: no run directory '/no/such/run'; give the directory of a training run
    """
    depth = 0
    while depth <= MAX_BASES:
        saved = read_job(run_dir, trust_code=trust_code)
        if saved.train_config.lora is None or not (saved.origin or {}).get("init_from"):
            return depth
        depth, run_dir = depth + 1, saved.origin["init_from"]["path"]
    return depth


class Model(NamedTuple):
    """A trained model, ready to use: what `load_model` reads (no optimiser state)."""

    params: dict               # the parameter tree, on the device
    model: LanguageModel       # the model value the parameters belong to
    tokenizer: Tokenizer
    meta: dict                 # the checkpoint's meta.json (its step, what it trained on, ...)


def load_model(run_dir: str, *, trust_code: bool = False, _seen: frozenset = frozenset()) -> Model:
    """The parameters, model and tokenizer of a run: only params.npz is read and
    checked (its checksum, names, shapes, dtypes, finiteness), no optimiser state is
    built, and the model is held to what it computed when saved (`verify`).
    `generate.complete(model, prompt)` continues a text with it. A LoRA run's adapters
    come merged into its base (`base_params`), so it is an ordinary model. trust_code
    as in `load`.

    Example:
        >>> cfg, tc = ModelConfig(vocab_size=3, d_model=8, n_heads=2), TrainConfig()
        >>> run = tempfile.mkdtemp()
        >>> _ = save(run, init_state(jax.random.key(0), cfg, tc.optimizer), model=cfg, train_config=tc,
        ...          tokenizer=CharTokenizer('abc'), data=BUILTIN)
        >>> m = load_model(run)
        >>> m.model == cfg, m.tokenizer.chars, m.params["embed"]["table"].shape
        (True, 'abc', (3, 8))
    """
    def read(path, meta):
        model, train_config, tokenizer = _parse(meta, path, trust_code)
        template = _template(model, train_config).params
        params = _build(template, _read_arrays(os.path.join(path, ARRAY_FILES[0]), meta["files"][ARRAY_FILES[0]]),
                        _arrays_of(path, ARRAY_FILES[0], model))
        if train_config.lora is not None:
            base = base_params(meta, model, trust_code=trust_code, _seen=_seen | {os.path.realpath(path)})
            params = lora.merge(base, params, scale=train_config.lora.scale)
        verify(model, params, meta["provenance"], path)
        return Model(params, model, tokenizer, meta)
    return _consistently(run_dir, read)


class _ChainTooDeep(CheckpointError):
    """Said once, from the deepest base, not wrapped again by each run above it."""


def base_params(meta: dict, model: LanguageModel, *, trust_code: bool = False, _seen: frozenset = frozenset()) -> dict:
    """The parameters a run started from (its origin "init_from"), as that run used them:
    loaded (`load_model`, so a base that is itself a LoRA run comes merged), checked
    against the SHA-256 recorded when the run started, and cut to its context
    (`model.with_context`). What a LoRA run's adapters apply to.

    Example:
        >>> base_params({"origin": None}, ModelConfig(vocab_size=3))
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: this run did not start from another run's parameters; it has no base
    """
    source = (meta.get("origin") or {}).get("init_from")
    if source is None:
        raise CheckpointError("this run did not start from another run's parameters; it has no base")
    where = source["path"]
    if len(_seen) >= MAX_BASES:
        raise _ChainTooDeep(f"{where!r} starts a chain of bases more than {MAX_BASES} runs deep (LoRA runs on LoRA "
                            f"runs); start a shorter one from a run of the chain in full, without LoRA, which merges it")
    try:
        if os.path.realpath(locate(where)) in _seen:
            raise CheckpointError("through its own bases, it is the run itself")
        base = load_model(where, trust_code=trust_code, _seen=_seen)
    except _ChainTooDeep:
        raise
    except CheckpointError as e:
        raise CheckpointError(f"the base this run's adapters apply to, {where!r}, cannot be loaded: {e}") from None
    if base.meta["files"][ARRAY_FILES[0]]["sha256"] != source["sha256"]:
        raise CheckpointError(f"the base this run's adapters apply to, {where!r}, has changed since the run started "
                              f"(its parameters' SHA-256 differs from the one recorded); restore that run as it was")
    free = {name: getattr(model, name) for name in ("max_len", "dropout") if hasattr(model, name)}
    if base.model.replace(**free) != model:
        raise CheckpointError(f"the base {where!r} holds another model than this run's (its config differs beyond "
                              f"context and dropout)")
    return model.with_context(base.params, model.max_len)


def upgrade(run_dir: str, *, trust_code: bool = False) -> tuple[int, str]:
    """Rewrite a run of an older format (2 to 8) as format 9, or record anew the
    provenance of a format-9 run whose code changed on purpose (once the model still
    computes what it did), under the run's lock: its arrays are read and checked as they
    are and saved again with the job and the provenance now (`save`), which replaces the
    old checkpoint only once the new one is whole. Returns (the format it had, the
    checkpoint's path). CheckpointError for a run that is already current, damaged, or
    a LoRA run whose base cannot be loaded (upgrade the base first); RunDirError for a
    run being trained.

    Example:
        >>> upgrade('/no/such/run')
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: no run directory '/no/such/run'; give the directory of a training run
    """
    path = locate(run_dir)
    if os.path.basename(path) in (NAME, NAME + ".old"):                         # the run holding it
        run_dir = os.path.dirname(path)
    with runs.Lock(run_dir):
        def read(path, meta):
            version = meta["format_version"]                                     # as written
            model, train_config, tokenizer = _parse(meta, path, trust_code)
            template = _template(model, train_config)
            params, opt_state = (_build(t, _read_arrays(os.path.join(path, name), meta["files"][name]),
                                        _arrays_of(path, name, model))
                                 for t, name in zip((template.params, template.opt_state), ARRAY_FILES))
            base = None if train_config.lora is None else base_params(meta, model, trust_code=trust_code,
                                                                       _seen=frozenset({path}))
            state = TrainState(params, opt_state, jax.numpy.asarray(meta["step"], jax.numpy.int32))
            if version == FORMAT_VERSION:
                recorded, now = meta["provenance"], provenance.digests(model)
                if all(recorded[k] == now[k] for k in now):
                    raise CheckpointError(f"{run_dir!r} is in format {FORMAT_VERSION} and its code is the code now; "
                                          f"nothing to upgrade")
                merged = params if base is None else lora.merge(base, params, scale=train_config.lora.scale)
                verify(model, merged, recorded, path, code_may_differ=True)     # the same maths, or refused
            signals.check()                     # a stop asked while reading: nothing written
            return version, save(run_dir, state, model=model, train_config=train_config, tokenizer=tokenizer,
                                 data=meta["job"]["data"], origin=meta["origin"], base=base)
        return _consistently(run_dir, read, upgrading=True)


def save_params(path: str, params) -> str:
    """Any pytree of arrays (a model of one's own) -> one npz file at path, each array
    named by its tree path, written under a temporary name and renamed into place.
    `load_params(path, like=...)` reads it back. Returns path.

    Example:
        >>> path = os.path.join(tempfile.mkdtemp(), "mine.npz")
        >>> _ = save_params(path, {"w": np.ones((2, 3), np.float32), "layers": [{"b": np.zeros(3, np.float32)}]})
        >>> sorted(np.load(path).files)
        ['layers/0/b', 'w']
    """
    arrays = named_arrays(jax.device_get(params))
    for name, array in arrays.items():             # what load_params would refuse, refused before writing
        if not (array.dtype.kind in "biuf" and array.dtype.isnative or array.dtype == np.bool_):
            raise CheckpointError(f"cannot save {name!r}: dtype {array.dtype} has no npz form numpy reads back "
                                  f"(bfloat16: cast to float32 first)")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise CheckpointError(f"cannot save {name!r}: it holds non-finite values (NaN or infinity)")
    blob = _npz_bytes(arrays)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".params-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, runs.file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def load_params(path: str, *, like):
    """The pytree `save_params` wrote, with the structure of `like` (a tree of arrays or
    of jax.ShapeDtypeStruct: `jax.eval_shape(my_init, key)` builds one without
    computing anything). CheckpointError for a missing, damaged or foreign file, or
    arrays whose names, shapes, dtypes or finiteness differ from `like`'s.

    Example:
        >>> path = save_params(os.path.join(tempfile.mkdtemp(), "p.npz"), {"w": np.ones(2, np.float32)})
        >>> load_params(path, like={"w": jax.ShapeDtypeStruct((2,), np.float32)})["w"].tolist()
        [1.0, 1.0]
        >>> load_params(path, like={"w": jax.ShapeDtypeStruct((3,), np.float32)})
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: ...: array 'w' has shape (2,) and dtype float32, but its config needs shape (3,) and dtype float32
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path!r} does not exist; give a file save_params wrote") from None
    except Exception as e:           # a truncated or edited file: zip's own checksums fail, or it is no npz
        raise CheckpointError(f"{path!r} is not a whole npz file ({type(e).__name__}); save it again") from None
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.result_type(a)), like)   # arrays or structs
    return _build(like, arrays, repr(path))
