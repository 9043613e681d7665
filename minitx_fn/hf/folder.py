"""A Hugging Face model folder in, a run out, and back: the files, for every family.

    read_config    config.json -> our ModelConfig, through its family's mapping (`families.py`)
    read_tensors   model.safetensors, or the shards its index lists (safetensors' NumPy backend: no torch)
    read_tokenizer tokenizer.json, or GPT-2's vocab.json and merges.txt (Hugging Face's `tokenizers`)
    import_dir     all three: (model, parameters, tokenizer with the special ids config.json names)
    import_run     a folder -> a new run at step 0 (`minitx import-hf`)
    export_files   a model -> the files of a folder, by its family's mapping
    write_dir      those files into a new folder, whole or not at all
    export_run     a run -> a new folder (`minitx export-hf`)

The optional extra `hf` installs safetensors and tokenizers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np

from minitx_fn import runs, signals
from minitx_fn.config import ModelConfig
from minitx_fn.errors import HFError
from minitx_fn.hf import families
from minitx_fn.hf.tensors import few
from minitx_fn.tokenizer import SPECIAL_TOKENS, BPETokenizer, Tokenizer

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TEMPORARY_KIND = "export"          # temporary folders: runs.owned_prefix("export"), .export-PID-*


def require_safetensors():
    """The `safetensors.numpy` module, or HFError saying how to install it.

    Example:
        >>> require_safetensors().__name__
        'safetensors.numpy'
    """
    try:
        import safetensors.numpy
    except ImportError:
        raise HFError("reading and writing Hugging Face weights needs the safetensors library: "
                        "pip install -e \".[hf]\"") from None
    return safetensors.numpy


def require_regular(path: str) -> None:
    """HFError unless path, if it exists, is a regular file (links followed): a FIFO
    would block the read forever, /dev/zero would never end it.

    Example:
        >>> require_regular("/dev/zero")
        Traceback (most recent call last):
        minitx_fn.errors.HFError: '/dev/zero' is not a regular file (a pipe, a device or a socket); ...
    """
    if runs.not_regular(path):
        raise HFError(f"{path!r} is not a regular file (a pipe, a device or a socket); a model folder holds files")


def read_json(path: str, what: str):
    """The JSON a file holds, or HFError naming the file (`what`: why it is needed, for a missing one).

    Example:
        >>> read_json("/nonexistent/config.json", "a Hugging Face model folder needs one")
        Traceback (most recent call last):
        minitx_fn.errors.HFError: '/nonexistent/config.json' is missing; a Hugging Face model folder needs one
    """
    require_regular(path)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise HFError(f"{path!r} is missing; {what}") from None
    except OSError as e:
        raise HFError(f"cannot read {path!r}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:
        raise HFError(f"{path!r} is not valid JSON ({type(e).__name__})") from None


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists."""
    st = require_safetensors()
    index_path = os.path.join(hf_dir, WEIGHTS_INDEX)
    if os.path.exists(os.path.join(hf_dir, WEIGHTS)):
        files = [WEIGHTS]
    elif os.path.exists(index_path):
        index = read_json(index_path, "")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise HFError(f"{index_path!r} has no weight_map of file names")
        files = sorted(set(weight_map.values()))
        outside = [name for name in files if os.path.basename(name) != name or name in ("", ".", "..")]
        if outside:                      # shards lie beside the index, as Hugging Face writes them
            raise HFError(f"{index_path!r} names shard files outside its folder: {few(outside)}")
    else:
        other = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
                 if os.path.exists(os.path.join(hf_dir, n))]
        hint = (f" (it has {', '.join(other)}: download the repository's model.safetensors, or convert with "
                f"transformers' save_pretrained)") if other else ""
        raise HFError(f"{hf_dir!r} has no {WEIGHTS}{hint}")
    tensors: dict[str, np.ndarray] = {}
    sharded = files != [WEIGHTS]
    for name in files:
        signals.check()                                  # a stop signal: between two files, nothing written
        path = os.path.join(hf_dir, name)
        if os.path.isdir(path):
            raise HFError(f"{path!r} is a directory, not a safetensors file; download the model's file again")
        require_regular(path)
        try:
            shard = st.load_file(path)
        except FileNotFoundError:
            raise HFError(f"{path!r} is missing") from None
        except OSError as e:
            raise HFError(f"cannot read {path!r}: {e.strerror or e}") from None
        except Exception as e:           # safetensors raises its own error for a damaged file
            raise HFError(f"{path!r} is not a safetensors file that can be read ({str(e)[:120]}); download it "
                            f"again") from None
        if sharded:                      # the index and the shards must tell the same story
            listed = {t for t, f in weight_map.items() if f == name}
            missing, unlisted = sorted(listed - set(shard)), sorted(set(shard) - listed)
            if missing or unlisted:
                raise HFError(f"{path!r} disagrees with {WEIGHTS_INDEX}: " + "; ".join(
                    ([f"it lacks {few(missing)}, which the index puts there"] if missing else [])
                    + ([f"it holds {few(unlisted)}, which the index puts elsewhere or nowhere"] if unlisted else []))
                    + "; download the model again")
        tensors.update(shard)
    # bfloat16 arrives as ml_dtypes' bfloat16, which NumPy does not count as floating point.
    bad = sorted(n for n, a in tensors.items()
                 if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"))
    if bad:
        raise HFError(f"tensors {few(bad)} are not floating point ({tensors[bad[0]].dtype}); a model's weights are")
    return tensors


def read_tokenizer(hf_dir: str) -> BPETokenizer:
    """tokenizer.json, or else vocab.json + merges.txt (GPT-2's byte-level BPE)."""
    path = os.path.join(hf_dir, "tokenizer.json")
    for name in (path, *(os.path.join(hf_dir, n) for n in ("vocab.json", "merges.txt"))):
        require_regular(name)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                return BPETokenizer.from_json(f.read())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise HFError(f"cannot use {path!r}: {e}") from None
    vocab, merges = (os.path.join(hf_dir, n) for n in ("vocab.json", "merges.txt"))
    if not (os.path.exists(vocab) and os.path.exists(merges)):
        raise HFError(f"{hf_dir!r} has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt")
    try:
        return BPETokenizer.from_vocab_and_merges(vocab, merges)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HFError(f"cannot use {vocab!r} and {merges!r}: {e}") from None


def read_config(hf_dir: str, *, param_dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of a Hugging Face directory's config.json (GPT-2, Llama or Qwen2)."""
    if not os.path.isdir(hf_dir):
        raise HFError(f"{hf_dir!r} is not a directory; give the folder that holds config.json and "
                        f"model.safetensors")
    hf = read_json(os.path.join(hf_dir, "config.json"), "a Hugging Face model folder needs one")
    if not isinstance(hf, dict):
        raise HFError("config.json must hold a JSON object")
    return families.mapping(hf.get("model_type")).config_from_hf(hf, param_dtype=param_dtype)


def import_dir(hf_dir: str, *, param_dtype: str = "float32") -> tuple[ModelConfig, dict, BPETokenizer]:
    """A Hugging Face GPT-2, Llama or Qwen2 directory -> (config, parameter tree of
    NumPy arrays, tokenizer with the special ids config.json names)."""
    config = read_config(hf_dir, param_dtype=param_dtype)
    hf = read_json(os.path.join(hf_dir, "config.json"), "a Hugging Face model folder needs one")
    tokenizer = read_tokenizer(hf_dir)
    try:                          # the ids config.json names bos, eos and pad, kept for export-hf
        tokenizer = tokenizer.with_special({name: hf.get(name) for name in SPECIAL_TOKENS})
    except ValueError as e:
        raise HFError(f"config.json: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:        # fewer is a padded table (Qwen2's): those rows go unused
        raise HFError(f"the tokenizer has {tokenizer.vocab_size:,} ids but config.json says vocab_size "
                        f"{config.vocab_size:,}: the model has no embedding for the ids past it")
    return config, families.mapping(families.family(config)).params_from_hf(read_tensors(hf_dir), config), tokenizer


def export_files(params: dict, config: ModelConfig, tokenizer: Tokenizer) -> dict[str, bytes]:
    """The files of a Hugging Face directory: config.json, model.safetensors and, for a
    tokenizer that has one (`Tokenizer.hf_json`), tokenizer.json; with the special ids
    of an imported tokenizer, config.json names them and generation_config.json holds
    them. The model is written as its family (`families.family`), whose mapping
    first checks it can be (`check_exportable`: HFError naming what keeps it)."""
    if type(config) is not ModelConfig:
        raise HFError(f"the model {getattr(config, 'code', type(config).__name__)!r} is code of its own, with no "
                        f"Hugging Face mapping; export-hf writes the built-in model's GPT-2, Llama and Qwen2 shapes")
    writer = families.mapping(families.family(config))
    writer.check_exportable(params, config)
    st = require_safetensors()
    special = getattr(tokenizer, "special", {})                  # an imported tokenizer's bos, eos and pad ids
    hf_config = {**writer.config_to_hf(config), **{name: special.get(name) for name in SPECIAL_TOKENS}}
    files = {"config.json": json.dumps(hf_config, indent=2).encode(),
             WEIGHTS: st.save(writer.params_to_hf(params, config), metadata={"format": "pt"})}
    if special:                # what transformers' generate reads them from (as save_pretrained writes it)
        files["generation_config.json"] = json.dumps(special, indent=2).encode()
    if tokenizer.hf_json() is not None:
        files["tokenizer.json"] = tokenizer.hf_json().encode()
    return files


def write_dir(out_dir: str, files: dict[str, bytes]) -> None:
    """Write files into a new folder out_dir: in a temporary sibling first
    (`.export-<pid>-*`), renamed into place, so a full disk or a signal never leaves
    half a directory; such a folder that a killed export left (its process gone) is
    removed. An existing empty folder is written in place (renaming a folder over it
    would swap the folder a shell stands in): each file under a temporary name, then
    renamed, config.json last, so a folder that has it is whole. HFError if out_dir
    exists and is not an empty folder, or lies in a run's checkpoint (`runs.managing_run`)."""
    out_dir = os.path.realpath(out_dir)         # a link to an empty folder: write where it points
    if runs.managing_run(out_dir) is not None:
        raise HFError("{out} " + runs.held_by(runs.managing_run(out_dir)) + "; write it elsewhere",
                      out=("out_dir", out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise HFError("{out} already exists and is not an empty folder; choose a new one", out=("out_dir", out_dir))
    in_place = os.path.isdir(out_dir)
    parent = out_dir if in_place else os.path.dirname(out_dir)
    ancestor = parent
    while not os.path.isdir(ancestor):
        if os.path.exists(ancestor):
            raise HFError(f"cannot create {out_dir!r}: {ancestor!r} is a file")
        ancestor = os.path.dirname(ancestor)
    made = runs.make_dirs(parent)
    runs.remove_abandoned(parent, TEMPORARY_KIND)      # folders of killed exports
    tmp = tempfile.mkdtemp(prefix=runs.owned_prefix(TEMPORARY_KIND), dir=parent)
    try:
        for name, blob in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, runs.dir_mode())          # mkdtemp makes it 0700
        signals.check()                         # a stop asked while writing: the temporary folder goes, nothing else
        if in_place:
            for name in sorted(files, key=lambda n: n == "config.json"):
                os.rename(os.path.join(tmp, name), os.path.join(out_dir, name))
            os.rmdir(tmp)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if in_place:
            for name in files:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(out_dir, name))
        runs.remove_made(made)
        raise


def import_run(hf_dir: str, run_dir: str, *, log=None) -> tuple[ModelConfig, int]:
    """A Hugging Face GPT-2, Llama or Qwen2 directory (`import_dir`) -> a new run at
    step 0 (`job.new_run`, its origin recorded), after a memory check made before any
    weight is read: `minitx import-hf`. Returns the model's config and parameter
    count; `checkpoint.load_model(run_dir)` then gives the model to generate from."""
    import jax

    from minitx_fn import job, memory, model
    runs.check_new_run_dir(run_dir, ignore_temporaries=True)      # before reading a byte of the weights
    # Before reading the weights: the tensors as read, our tree, Adam's two moments,
    # and the bytes of the files a save builds in memory, about 6 copies in all.
    memory.check(6 * 4 * memory.param_count(read_config(hf_dir)), "importing this model",
                 "import it on a machine with more memory")
    config, params, tokenizer = import_dir(hf_dir)
    params = jax.tree.map(jax.numpy.asarray, params)
    signals.check()
    key = "gpt2" if families.family(config) == "gpt2" else "hf"             # checkpoint.IMPORTED
    created = not os.path.exists(run_dir)
    job.new_run(run_dir, params, model=config, tokenizer=tokenizer, origin={key: os.path.abspath(hf_dir)},
                log=log)
    try:
        signals.check()                  # a stop asked while the run was written: take the run back out
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return config, model.count_params(params)


def export_run(run_dir: str, out_dir: str, *, trust_code: bool = False):
    """A run -> a new Hugging Face folder, a GPT-2, Llama or Qwen2 by the run's shape
    (`export_files`, `write_dir`): `minitx export-hf`. Returns the names of the files
    written and the run's `checkpoint.Model`. A run of a model of one's own
    (`trust_code` to load it) has no mapping: HFError."""
    import jax

    from minitx_fn import checkpoint
    from minitx_fn.errors import StorageError
    loaded = checkpoint.load_model(run_dir, trust_code=trust_code)
    files = export_files(jax.device_get(loaded.params), loaded.model, loaded.tokenizer)
    signals.check()
    try:
        write_dir(out_dir, files)
    except OSError as e:
        raise StorageError(out_dir, e) from None
    return sorted(files), loaded


__all__ = ["TEMPORARY_KIND", "WEIGHTS", "WEIGHTS_INDEX", "export_files", "export_run", "import_dir", "import_run",
           "read_config", "read_json", "read_tensors", "read_tokenizer", "require_regular", "require_safetensors",
           "write_dir"]
