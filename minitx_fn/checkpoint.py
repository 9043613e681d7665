"""Save and load a run: config, vocabulary, parameters, optimiser state, step.

A checkpoint is a directory `RUN/checkpoint/`:

    meta.json       format version, step, model and train configs, the tokenizer
                    (kind and vocabulary, `tokenizer.to_meta`), what the run trained on
                    (`data`, below), and each array file's SHA-256
    params.npz      one array per parameter, named by its tree path ("blocks/attn/qkv/w")
    opt_state.npz   the optimiser state, named the same way ("1/0/mu/blocks/attn/qkv/w"
                    is Adam's first moment of that parameter; "1/0/count" its step count)

No pickle: JSON and numpy's npz, so numpy alone can read a run (the README shows
how). The batch key is not stored: it is `train.keys(seed).data`.

`data` says what the run trained on, so `--resume` trains on the same text:
    {"builtin": true}               the built-in corpus
    {"path": PATH, "sha256": HEX}   a text file (its absolute path and SHA-256)
    {"path": null, "sha256": HEX}   a text or ids given in memory (`corpus.Corpus.source`)
    null                            not recorded: resuming needs the data given again
Formats before 5 wrote null for the built-in corpus, and are read so.

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
import types
import typing
from typing import Any, NamedTuple

import jax
import numpy as np

from minitx_fn import defaults, lora, model, runs
from minitx_fn.config import INT32_MAX, ModelConfig, TrainConfig
from minitx_fn.errors import CheckpointError, Error
from minitx_fn import tokenizer as tokenizers
from minitx_fn.tokenizer import CharTokenizer, Tokenizer  # noqa: F401  (CharTokenizer: the doctests)
from minitx_fn.train import TrainState, init_state, lora_state

# Config fields a format version added, with the value every earlier run had.
ADDED_TRAIN_FIELDS = {5: {"grad_accum": 1}, 6: {"lora_rank": 0, "lora_alpha": None, "lora_targets": "attn"}}
ADDED_MODEL_FIELDS = {7: {"norm": "layernorm", "mlp": "gelu", "n_kv_heads": None, "rope_theta": defaults.ROPE_THETA,
                          "bias": True, "qkv_bias": None},
                      8: {"rope_scaling": None}}

# 3: the tokenizer's kind (char, byte, bpe) and TrainConfig.eval_tokens;
# 4: ModelConfig.positions and tie_embeddings, and "origin" (null, or where an imported model came from);
# 5: "data" is explicit: {"builtin": true} for the built-in corpus, null only when not recorded;
#    TrainConfig.grad_accum;
# 6: TrainConfig.lora_rank, lora_alpha and lora_targets: a LoRA run's params.npz holds its
#    adapters, and its origin {"init_from": ...} is the base they apply to.
# 7: ModelConfig.norm, mlp, n_kv_heads, rope_theta, bias and qkv_bias (Llama's choices;
#    positions may be "rotary"); origin {"hf": folder} for an imported Llama or Qwen2.
# 8: ModelConfig.rope_scaling (null, or the fields of config.RopeScaling); a bpe tokenizer may
#    carry "special", the bos, eos and pad ids of an imported model.
FORMAT_VERSION = 8
READABLE_VERSIONS = (2, 3, 4, 5, 6, 7, 8)  # 2 had only char vocabularies, saved as "vocab"
BUILTIN = {"builtin": True}       # `data` of a run on the built-in corpus
MAX_BASES = 16                    # LoRA runs on LoRA runs: how deep load_model follows their bases
IMPORTED = ("gpt2", "hf")         # origin {KEY: folder} of a model imported from Hugging Face
NAME = runs.CHECKPOINT
ARRAY_FILES = ("params.npz", "opt_state.npz")
META_KEYS = {"format_version", "step", "tokenizer", "model_config", "train_config", "data", "origin", "files"}


class Checkpoint(NamedTuple):
    state: TrainState
    model_config: ModelConfig
    train_config: TrainConfig
    tokenizer: Tokenizer
    data: dict | None          # what the run trained on (the module docstring), None if not recorded
    meta: dict                 # meta.json as saved (a run before format 4 has no "origin")

    @property
    def origin(self) -> dict | None:
        """{"gpt2": folder} ({"hf": folder} for a Llama or Qwen2) for a model `minitx
        import-hf` wrote; {"init_from": {"path", "sha256"}} for a run started from another
        run's parameters; None for a run trained here from scratch."""
        return self.meta.get("origin")


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


def save(run_dir: str, state: TrainState, *, model_config: ModelConfig, train_config: TrainConfig,
         tokenizer: Tokenizer, data, origin: dict | None = None) -> str:
    """Write RUN/checkpoint atomically; returns its path.

    `data` says what the run trained on (the module docstring): pass the training
    corpus's `source` (`corpus.Corpus.source`, or the Corpus itself), `BUILTIN`, or None
    when it is not known (a later resume then needs the data given again). `origin` is
    None for a run trained here, {"gpt2": path} (or {"hf": path}) for one imported from Hugging Face.
    What `load` would refuse is refused here, before anything is written: a state
    whose parameters or optimiser state are not those of `model_config` and
    `make_optimizer(train_config.optimizer)` (CheckpointError naming the arrays).
    OSError (a full or read-only disk) leaves the previous checkpoint as it was.

    Example:
        >>> cfg, tc, tok = ModelConfig(vocab_size=3, d_model=8, n_heads=2), TrainConfig(), CharTokenizer('abc')
        >>> run = tempfile.mkdtemp()
        >>> state = init_state(jax.random.key(0), cfg, tc.optimizer)
        >>> path = save(run, state, model_config=cfg, train_config=tc, tokenizer=tok, data=BUILTIN)
        >>> sorted(os.listdir(path))
        ['meta.json', 'opt_state.npz', 'params.npz']
        >>> ck = load(run)
        >>> int(ck.state.step), ck.tokenizer.chars, ck.model_config == cfg, ck.data
        (0, 'abc', True, {'builtin': True})
    """
    data = getattr(data, "source", data)                 # a Corpus stands for its source
    problem = _data_problem(data) or _origin_problem(origin) or _lora_problem(train_config, origin)
    if problem:
        raise CheckpointError(f"cannot save: {problem}")
    problem = vocabulary_problem(tokenizer, model_config)
    if problem:
        raise CheckpointError(f"cannot save: {problem}")
    if not isinstance(state, TrainState):
        raise CheckpointError(f"cannot save: the state must be a train.TrainState, not {type(state).__name__}")
    template = _template(model_config, train_config)
    host = jax.device_get(state)
    step = np.asarray(host.step)
    if not (step.shape == () and np.issubdtype(step.dtype, np.integer) and 0 <= int(step) <= INT32_MAX):
        raise CheckpointError(f"cannot save: the step must be a whole number in [0, {INT32_MAX}], not "
                              f"{step.tolist()!r} ({step.dtype})")
    arrays = {name: named_arrays(tree) for name, tree in zip(ARRAY_FILES, (host.params, host.opt_state))}
    for name, t in zip(ARRAY_FILES, (template.params, template.opt_state)):
        _check_arrays(t, arrays[name], f"cannot save: {name}")
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
        meta = {"format_version": FORMAT_VERSION, "step": int(host.step), "tokenizer": tokenizer.to_meta(),
                "model_config": model_config.to_dict(), "train_config": train_config.to_dict(),
                "data": data, "origin": origin, "files": files}
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
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"no run directory {run_dir!r}; give the directory of a training run")
    raise CheckpointError(f"{run_dir!r} holds no checkpoint (no {NAME}/meta.json); train first, "
                          f"or give the directory of a training run")


# ----------------------------------------------------------------------------- validation


def vocabulary_problem(tokenizer: Tokenizer, model_config: ModelConfig) -> str:
    """What keeps a tokenizer from serving a model, or "". Their sizes are equal, but
    for a bpe tokenizer, which may have fewer ids than the model has rows: a table
    padded past the tokenizer, as Qwen2's (import-hf); generation never draws those
    rows (`Sampler.id_limit`). Runs trained here always have them equal, so a char or
    byte tokenizer of another size is a swapped or edited one.

    Example:
        >>> vocabulary_problem(CharTokenizer("abc"), ModelConfig(vocab_size=5))
        'the char tokenizer has 3 ids but model_config says vocab_size=5'
    """
    n, v = tokenizer.vocab_size, model_config.vocab_size
    if n > v or (n < v and tokenizer.kind != "bpe"):
        return f"the {tokenizer.kind} tokenizer has {n} ids but model_config says vocab_size={v}"
    return ""


def _matches(value: Any, hint) -> bool:
    """Whether a JSON value has the type a dataclass field declares (bool is not an int)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _config(cls, value: Any, where: str):
    """A config dataclass from its saved dict: exactly its fields, each of its type and valid."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: {cls.__name__} is {type(value).__name__}, not an object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = sorted(set(value) - names), sorted(names - set(value))
    if unknown or missing:
        problems = [f"unknown fields {unknown}" if unknown else "", f"lacks {missing}" if missing else ""]
        raise CheckpointError(f"{where}: {cls.__name__} " + " and ".join(p for p in problems if p))
    for name in sorted(names):
        nested = [h for h in typing.get_args(hints[name]) if dataclasses.is_dataclass(h)]   # RopeScaling | None
        if nested and isinstance(value[name], dict):
            value = {**value, name: _config(nested[0], value[name], f"{where}: {cls.__name__}.{name}")}
        elif not _matches(value[name], hints[name]):
            raise CheckpointError(f"{where}: {cls.__name__}.{name} = {value[name]!r} is not of type {hints[name]}")
    try:
        return cls(**value)
    except Error as e:
        raise CheckpointError(f"{where}: {cls.__name__}: {e}") from None


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


def _template(model_config: ModelConfig, train_config: TrainConfig) -> TrainState:
    """The shapes and dtypes of a run's state (jax.ShapeDtypeStruct leaves, nothing computed):
    a LoRA run's parameters are its adapters."""
    key, oc = jax.random.key(0), train_config.optimizer
    if train_config.lora is None:
        return jax.eval_shape(lambda: init_state(key, model_config, oc))
    return jax.eval_shape(lambda: lora_state(key, model.init(key, model_config), oc, train_config.lora))


def validate_meta(meta: Any, where: str = "meta.json") -> tuple[ModelConfig, TrainConfig, Tokenizer]:
    """The configs and tokenizer of a checkpoint's meta.json, after checking every field:
    types, ranges and consistency. CheckpointError names the first problem.

    Example:
        >>> validate_meta({"format_version": 3})
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: meta.json lacks ['data', 'files', 'model_config', 'step', 'tokenizer', 'train_config']
    """
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} holds {type(meta).__name__}, not an object")
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:     # 4.0 and True are not versions
        raise CheckpointError(f"checkpoint format version {version!r} is not supported (this minitx_fn reads "
                              f"versions {READABLE_VERSIONS}); train a new run, or load it with the version that "
                              f"wrote it")
    if version == 2:
        meta = _from_version_2(meta)
    if version in (2, 3):
        # Runs before version 4 were trained here, with sinusoidal positions and an untied
        # head; those versions have none of the three fields, and may not claim them.
        newer = sorted({"origin"} & set(meta)) + sorted({"positions", "tie_embeddings"} & set(
            meta["model_config"] if isinstance(meta.get("model_config"), dict) else ()))
        if newer:
            raise CheckpointError(f"{where}: format version {version} has no {newer}; they came with version 4")
        meta = {**meta, "origin": None}
        if isinstance(meta.get("model_config"), dict):
            meta["model_config"] = {**meta["model_config"], "positions": "sinusoidal", "tie_embeddings": False}
    for added in range(version + 1, FORMAT_VERSION + 1):
        claimed = sorted(set(ADDED_MODEL_FIELDS.get(added, {})) & set(
            meta["model_config"] if isinstance(meta.get("model_config"), dict) else ()))
        if claimed:            # a run of that version cannot have them: an edited or mislabelled meta.json
            raise CheckpointError(f"{where}: format version {version} has no {claimed}; they came with version {added}")
    for added in range(version + 1, FORMAT_VERSION + 1):               # what earlier versions did not record
        for part, fields in (("train_config", ADDED_TRAIN_FIELDS), ("model_config", ADDED_MODEL_FIELDS)):
            if isinstance(meta.get(part), dict):
                meta = {**meta, part: {**fields.get(added, {}), **meta[part]}}
    if version < 5 and isinstance(meta.get("data"), dict) and not isinstance(meta["data"].get("path"), str):
        raise CheckpointError(f"{where}: format version {version} has only null or a file as data; the rest came "
                              f"with version 5")
    unknown, missing = sorted(set(meta) - META_KEYS), sorted(META_KEYS - set(meta))
    if unknown or missing:
        raise CheckpointError(f"{where} " + (f"has unknown keys {unknown}" if unknown else f"lacks {missing}"))
    step = meta["step"]
    if not (_matches(step, int) and 0 <= step <= INT32_MAX):
        raise CheckpointError(f"{where}: step {step!r} is not a whole number in [0, {INT32_MAX}]")
    model_config = _config(ModelConfig, meta["model_config"], where)
    train_config = _config(TrainConfig, meta["train_config"], where)
    try:
        tokenizer = tokenizers.from_meta(meta["tokenizer"])
    except ValueError as e:
        raise CheckpointError(f"{where}: tokenizer: {e}") from None
    problem = vocabulary_problem(tokenizer, model_config)
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    problem = (_data_problem(meta["data"]) or _origin_problem(meta["origin"])
               or _lora_problem(train_config, meta["origin"]))
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    files = meta["files"]
    if not (isinstance(files, dict) and set(files) == set(ARRAY_FILES) and all(
            isinstance(f, dict) and set(f) == {"bytes", "sha256"} and _matches(f["bytes"], int) and f["bytes"] >= 0
            and isinstance(f["sha256"], str) and _HEX64.fullmatch(f["sha256"]) for f in files.values())):
        raise CheckpointError(f"{where}: files must give bytes and sha256 of {list(ARRAY_FILES)}")
    return model_config, train_config, tokenizer


def _from_version_2(meta: dict) -> dict:
    """A version-2 meta.json as version 3: its "vocab" string is a char tokenizer, and its
    runs evaluated the whole validation split."""
    meta = dict(meta)
    if "vocab" in meta:
        if not isinstance(meta["vocab"], str):
            raise CheckpointError(f"meta.json: vocab is {type(meta['vocab']).__name__}, not a string")
        meta["tokenizer"] = {"kind": "char", "chars": meta.pop("vocab")}
    if isinstance(meta.get("train_config"), dict):
        meta["train_config"] = {"eval_tokens": None, **meta["train_config"]}
    return meta


def _read_arrays(path: str, expected: dict) -> dict[str, np.ndarray]:
    """An npz file's arrays, after checking its size and SHA-256 against meta.json."""
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


def _read_meta(run_dir: str) -> tuple[str, dict, ModelConfig, TrainConfig, Tokenizer]:
    """(checkpoint folder, meta.json, its configs and tokenizer), every field checked."""
    path = locate(run_dir)
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read())
    except OSError as e:
        raise CheckpointError(f"cannot read {meta_path!r}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:          # JSONDecodeError, bad UTF-8, absurd nesting
        raise CheckpointError(f"checkpoint metadata {meta_path!r} is corrupt ({type(e).__name__})") from None
    model_config, train_config, tokenizer = validate_meta(meta, meta_path)
    if meta["format_version"] < 5 and meta["data"] is None:
        meta = {**meta, "data": BUILTIN}       # before format 5 only the built-in corpus was null
    return path, meta, model_config, train_config, tokenizer


READ_TRIES = 5      # a checkpoint read while a live run replaces it is read again, up to this many times


def _consistently(run_dir: str, read):
    """read(path, meta, configs..., tokenizer) on one whole checkpoint: a save by a live
    run can replace the checkpoint while it is read (meta.json of one save, arrays of
    the next, or a folder renamed away mid-read); then it is read again, while what is
    on disk keeps changing, up to READ_TRIES times. A checkpoint that is damaged and
    stays so is reported as it is."""
    for attempt in range(READ_TRIES):
        seen = None
        try:
            path, meta, model_config, train_config, tokenizer = _read_meta(run_dir)
            seen = (path, meta)
            return read(path, meta, model_config, train_config, tokenizer)
        except CheckpointError:
            try:
                now = _read_meta(run_dir)[:2]
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


def load(run_dir: str) -> Checkpoint:
    """Read and validate a checkpoint; CheckpointError says exactly what is wrong.

    Example:
        >>> load('/no/such/run')
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: no run directory '/no/such/run'; give the directory of a training run
    """
    def read(path, meta, model_config, train_config, tokenizer):
        template = _template(model_config, train_config)
        params, opt_state = (
            _build(t, _read_arrays(os.path.join(path, name), meta["files"][name]), name)
            for t, name in zip((template.params, template.opt_state), ARRAY_FILES))
        state = TrainState(params, opt_state, jax.numpy.asarray(meta["step"], jax.numpy.int32))
        return Checkpoint(state, model_config, train_config, tokenizer, meta["data"], meta)
    return _consistently(run_dir, read)


class Model(NamedTuple):
    """A trained model, ready to use: what `load_model` reads (no optimiser state)."""

    params: dict               # the parameter tree, on the device
    config: ModelConfig
    tokenizer: Tokenizer
    meta: dict                 # the checkpoint's meta.json (its step, what it trained on, ...)


def load_model(run_dir: str, *, _seen: frozenset = frozenset()) -> Model:
    """The parameters, model config and tokenizer of a run: only params.npz is read and
    checked (its checksum, names, shapes, dtypes, finiteness), no optimiser state is
    built. `generate.complete(model, prompt)` continues a text with it. A LoRA run's
    adapters come merged into its base (`base_params`), so it is an ordinary model.

    Example:
        >>> cfg, tc = ModelConfig(vocab_size=3, d_model=8, n_heads=2), TrainConfig()
        >>> run = tempfile.mkdtemp()
        >>> _ = save(run, init_state(jax.random.key(0), cfg, tc.optimizer), model_config=cfg, train_config=tc,
        ...          tokenizer=CharTokenizer('abc'), data=BUILTIN)
        >>> m = load_model(run)
        >>> m.config == cfg, m.tokenizer.chars, m.params["embed"]["table"].shape
        (True, 'abc', (3, 8))
    """
    def read(path, meta, model_config, train_config, tokenizer):
        template = _template(model_config, train_config).params
        params = _build(template, _read_arrays(os.path.join(path, ARRAY_FILES[0]), meta["files"][ARRAY_FILES[0]]),
                        ARRAY_FILES[0])
        if train_config.lora is not None:
            base = base_params(meta, model_config, _seen | {os.path.realpath(path)})
            params = lora.merge(base, params, scale=train_config.lora.scale)
        return Model(params, model_config, tokenizer, meta)
    return _consistently(run_dir, read)


class _ChainTooDeep(CheckpointError):
    """Said once, from the deepest base, not wrapped again by each run above it."""


def base_params(meta: dict, model_config: ModelConfig, _seen: frozenset = frozenset()) -> dict:
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
                            f"runs); start a shorter one from a run of the chain without --lora-rank, which merges it")
    try:
        if os.path.realpath(locate(where)) in _seen:
            raise CheckpointError("through its own bases, it is the run itself")
        base = load_model(where, _seen=_seen)
    except _ChainTooDeep:
        raise
    except CheckpointError as e:
        raise CheckpointError(f"the base this run's adapters apply to, {where!r}, cannot be loaded: {e}") from None
    if base.meta["files"][ARRAY_FILES[0]]["sha256"] != source["sha256"]:
        raise CheckpointError(f"the base this run's adapters apply to, {where!r}, has changed since the run started "
                              f"(its parameters' SHA-256 differs from the one recorded); restore that run as it was")
    fitted = base.config.replace(max_len=model_config.max_len, dropout=model_config.dropout)
    if fitted != model_config:
        raise CheckpointError(f"the base {where!r} holds another model than this run's (its config differs beyond "
                              f"context and dropout)")
    return model.with_context(base.params, model_config.max_len)


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
