"""Save and load a run: config, vocabulary, parameters, optimiser state, step, PRNG state.

A checkpoint is a directory `RUN/checkpoint/`:

    meta.json       format version, step, model and train configs, vocabulary, data path
    params.npz      one array per parameter, named by its path ("blocks/attn/qkv/w")
    opt_state.npz   the optimiser state's leaves in tree order ("leaf_0000", ...)
    rng.npz         the raw data key (the per-step keys are fold_in(data_key, step))

No pickle: numpy's npz with allow_pickle=False and JSON. It is written to a
temporary directory that is then renamed into place, so a crash never leaves a
half-written checkpoint where a good one stood. Loading checks every array's
shape and dtype against what the saved config implies.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from typing import Any, NamedTuple

import jax
import numpy as np

from minitx_fn.config import ModelConfig, TrainConfig
from minitx_fn.tokenizer import Tokenizer
from minitx_fn.train import TrainState, init_state

FORMAT_VERSION = 1
NAME = "checkpoint"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated or does not match its config."""


class Checkpoint(NamedTuple):
    state: TrainState
    data_key: jax.Array
    model_config: ModelConfig
    train_config: TrainConfig
    tokenizer: Tokenizer
    meta: dict


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


def save(run_dir: str, state: TrainState, *, data_key: jax.Array, model_config: ModelConfig,
         train_config: TrainConfig, tokenizer: Tokenizer, extra: dict[str, Any] | None = None) -> str:
    """Write RUN/checkpoint atomically; returns its path.

    Example:
        >>> import tempfile
        >>> from minitx_fn.train import keys
        >>> cfg, tc, tok = ModelConfig(vocab_size=3, d_model=8, n_heads=2), TrainConfig(), Tokenizer('abc')
        >>> init_key, data_key = keys(0)
        >>> run = tempfile.mkdtemp()
        >>> path = save(run, init_state(init_key, cfg, tc), data_key=data_key, model_config=cfg, train_config=tc,
        ...             tokenizer=tok)
        >>> sorted(os.listdir(path))
        ['meta.json', 'opt_state.npz', 'params.npz', 'rng.npz']
        >>> ck = load(run)
        >>> int(ck.state.step), ck.tokenizer.chars, ck.model_config == cfg
        (0, 'abc', True)
    """
    os.makedirs(run_dir, exist_ok=True)
    final = os.path.join(run_dir, NAME)
    tmp = tempfile.mkdtemp(prefix=f".{NAME}.tmp-", dir=run_dir)
    try:
        host = jax.device_get(state)
        meta = {"format_version": FORMAT_VERSION, "step": int(host.step), "vocab": tokenizer.chars,
                "model_config": model_config.to_dict(), "train_config": train_config.to_dict(), **(extra or {})}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _write_npz(os.path.join(tmp, "params.npz"),
                   {_path_name(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(host.params)})
        _write_npz(os.path.join(tmp, "opt_state.npz"),
                   {f"leaf_{i:04d}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(host.opt_state))})
        _write_npz(os.path.join(tmp, "rng.npz"), {"data_key": np.asarray(jax.random.key_data(data_key))})
        old = final + ".old"
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def locate(run_dir: str) -> str:
    """The checkpoint directory of a run (or a checkpoint directory given directly).

    If a crash fell between the two renames of `save`, only `checkpoint.old` exists:
    it is the last complete checkpoint, so use it.

    Example:
        >>> import tempfile
        >>> locate(tempfile.mkdtemp())
        Traceback (most recent call last):
        minitx_fn.checkpoint.CheckpointError: ... holds no checkpoint (no checkpoint/meta.json); train first, or point at the directory given to --out
    """
    for candidate in (run_dir, os.path.join(run_dir, NAME), os.path.join(run_dir, NAME + ".old")):
        if os.path.isfile(os.path.join(candidate, "meta.json")):
            return candidate
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"no run directory {run_dir!r}; pass the --out directory of a training run")
    raise CheckpointError(f"{run_dir!r} holds no checkpoint (no {NAME}/meta.json); train first, "
                          f"or point at the directory given to --out")


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path!r} is missing; the checkpoint is incomplete") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"checkpoint file {path!r} is corrupt or truncated ({e})") from None


def _check_and_build(template, arrays: list[np.ndarray], names: list[str], what: str):
    leaves, treedef = jax.tree.flatten(template)
    if len(arrays) != len(leaves):
        raise CheckpointError(f"{what}: expected {len(leaves)} arrays for this config, found {len(arrays)}")
    for name, got, want in zip(names, arrays, leaves):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{what}: array {name!r} has shape {got.shape} and dtype {got.dtype}, "
                                  f"but the saved config needs shape {want.shape} and dtype {want.dtype}")
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(a) for a in arrays])


def load(run_dir: str) -> Checkpoint:
    """Read and validate a checkpoint; CheckpointError says exactly what is wrong.

    Example:
        >>> load('/no/such/run')
        Traceback (most recent call last):
        minitx_fn.checkpoint.CheckpointError: no run directory '/no/such/run'; pass the --out directory of a training run
    """
    path = locate(run_dir)
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format version {meta.get('format_version')!r} is not supported "
                                  f"(this minitx_fn reads version {FORMAT_VERSION})")
        model_config = ModelConfig(**meta["model_config"])
        train_config = TrainConfig(**meta["train_config"])
        tokenizer = Tokenizer(meta["vocab"])
        step = int(meta["step"])
    except CheckpointError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata {os.path.join(path, 'meta.json')!r} is corrupt "
                              f"({type(e).__name__}: {e})") from None
    if tokenizer.vocab_size != model_config.vocab_size:
        raise CheckpointError(f"checkpoint vocabulary has {tokenizer.vocab_size} characters but the model "
                              f"config says vocab_size={model_config.vocab_size}")

    template = jax.eval_shape(lambda: init_state(jax.random.key(0), model_config, train_config))
    params_npz = _read_npz(os.path.join(path, "params.npz"))
    want_names = [_path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(template.params)]
    missing = sorted(set(want_names) - params_npz.keys())
    if missing:
        raise CheckpointError(f"params.npz lacks {missing[:5]} (found {sorted(params_npz)[:5]}...)")
    params = _check_and_build(template.params, [params_npz[n] for n in want_names], want_names, "params.npz")
    opt_npz = _read_npz(os.path.join(path, "opt_state.npz"))
    names = sorted(opt_npz)
    opt_state = _check_and_build(template.opt_state, [opt_npz[n] for n in names], names, "opt_state.npz")
    rng = _read_npz(os.path.join(path, "rng.npz"))
    if "data_key" not in rng:
        raise CheckpointError("rng.npz lacks 'data_key'")
    data_key = jax.random.wrap_key_data(rng["data_key"])
    state = TrainState(params, opt_state, jax.numpy.asarray(step, jax.numpy.int32))
    return Checkpoint(state, data_key, model_config, train_config, tokenizer, meta)
