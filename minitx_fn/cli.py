"""The `minitx` command: train a model, generate text, draw its attention and losses.

    minitx train                                  the built-in corpus, under a minute on 2 CPU cores
    minitx train --data input.txt --preset shakespeare-baby
    minitx train --resume runs/input-001 --steps 4000
    minitx generate --checkpoint runs/input-001 --prompt "ROMEO:" --temperature 0.8 --top-k 20
    minitx attention --checkpoint runs/input-001 --prompt "ROMEO:" --out attention.png
    minitx plot runs/input-001
    minitx data shakespeare                       download Tiny Shakespeare (checked by SHA-256)
    minitx prepare --data big.txt --tokenizer bpe   tokenize a large text once (train does it too)

Every input is checked before any work starts. Errors print one line
`minitx: error: ...` and exit with status 2 (bad input: flags, data files, prompts,
checkpoints, run directories) or 1 (the run failed: a non-finite loss, a full or
read-only disk); nothing saved before is lost. SIGINT (Ctrl-C), SIGTERM and SIGHUP
during training save a checkpoint at the current step and exit 128 + the signal's
number (130, 143, 129). The library's messages name config fields; this module
names flags, through one table (`FLAGS`).

JAX is imported inside the commands, not at the top: `minitx --help` and
`minitx plot` start without it.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
from typing import NamedTuple

import numpy as np

from minitx_fn.errors import Error, StorageError

# No preset sets min_lr: it is --lr / 10 (nanoGPT's 1e-4 at lr 1e-3), so a lower --lr
# brings the end of the cosine down with it.
PRESETS = {
    # The built-in corpus: a small, fast model that learns the three-phrase cycle.
    "hello": {"width": 64, "layers": 2, "heads": 4, "context": 32, "dropout": 0.0, "batch_size": 16, "steps": 500,
              "lr": 3e-3, "warmup": 50, "eval_every": 250, "save_every": 500, "log_every": 100},
    # nanoGPT's CPU recipe for Tiny Shakespeare (its README, "baby GPT").
    "shakespeare-baby": {"width": 128, "layers": 4, "heads": 4, "context": 64, "dropout": 0.0, "batch_size": 12,
                         "steps": 2000, "lr": 1e-3, "warmup": 100, "eval_every": 250,
                         "save_every": 500, "log_every": 100},
    # nanoGPT's GPU recipe (config/train_shakespeare_char.py): 10.7M parameters, hours on 2 CPU cores.
    "shakespeare-char": {"width": 384, "layers": 6, "heads": 6, "context": 256, "dropout": 0.2, "batch_size": 64,
                         "steps": 5000, "lr": 1e-3, "warmup": 100, "eval_every": 250,
                         "save_every": 1000, "log_every": 100},
}
# Flags that set a config field under another name; every other field's flag is its name.
FIELD_OF_FLAG = {"width": "d_model", "layers": "n_layers", "heads": "n_heads", "context": "max_len",
                 "dropout": "dropout", "positions": "positions", "tie_embeddings": "tie_embeddings"}
MODEL_SETTINGS = ("width", "layers", "heads", "context", "dropout", "positions", "tie_embeddings")
# Model settings no preset changes: ModelConfig's own defaults.
COMMON_SETTINGS = {"seed": 0, "positions": "sinusoidal", "tie_embeddings": False}
TRAIN_SETTINGS = ("steps", "batch_size", "lr", "min_lr", "warmup", "decay_steps", "seed", "weight_decay",
                  "eval_every", "save_every", "log_every")
# May differ from the saved run when resuming.
RESUMABLE = ("steps", "eval_every", "save_every", "log_every", "eval_tokens")
# The one table from the names the library's messages use to the flags a user types.
FLAGS = {**{field: "--" + flag.replace("_", "-") for flag, field in FIELD_OF_FLAG.items()},
         **{name: "--" + name.replace("_", "-") for name in TRAIN_SETTINGS},
         **{name: "--" + name.replace("_", "-") for name in ("devices", "max_new_tokens", "temperature", "top_k",
                                                              "top_p", "vocab_size", "eval_tokens")}}
EXIT_BAD_INPUT, EXIT_FAILED = 2, 1
PICTURE_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


class UsageError(Error):
    """Bad input from the user: exit status 2 with a one-line message."""


def flag_name(field: str, value) -> str:
    """How a message mentions a field: as the flag that sets it, where there is one.

    Example:
        >>> flag_name("d_model", 30), flag_name("remat", "bogus"), flag_name("tie_embeddings", False)
        ('--width 30', "remat='bogus'", '--no-tie-embeddings')
    """
    if field in FLAGS and isinstance(value, bool):      # a switch: --tie-embeddings or --no-tie-embeddings
        return FLAGS[field] if value else "--no-" + FLAGS[field][2:]
    if field in FLAGS:
        return f"{FLAGS[field]} {value}"
    return f"{field}={value!r}"


def message(error: BaseException) -> str:
    """One line for the user: flags where the library named fields."""
    return error.render(flag_name) if isinstance(error, Error) else str(error)


# ----------------------------------------------------------------------------- parsing


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} must lie in [{low}, {high:,}]")
        return value
    return parse


INT32_MAX = 2**31 - 1
MAX_NEW_TOKENS = 1_000_000      # hours of decoding on a CPU already; the (B, N) id buffer stays small
_positive = _int_in(1, INT32_MAX)


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _eval_tokens(text: str) -> int | str:
    """A positive whole number of tokens, or 'all'."""
    return "all" if text == "all" else _positive(text)


def _nonempty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("is empty; give a folder")
    return text


def _address(text: str) -> str:
    """HOST:PORT, the port in [1, 65535]."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT with a port in [1, 65535]")
    return text


# The multi-process flags and the environment variables that stand in for them (a
# scheduler sets these per process). Read by `minitx train` only when it starts, so a
# stray variable never changes or breaks another command.
MULTI_PROCESS_ENV = {"coordinator": ("MINITX_COORDINATOR", _address),
                     "num_processes": ("MINITX_NUM_PROCESSES", _positive),
                     "process_id": ("MINITX_PROCESS_ID", _int_in(0, INT32_MAX)),
                     "heartbeat_timeout": ("MINITX_HEARTBEAT_TIMEOUT", _int_in(1, 86400))}


def _with_environment(args) -> dict:
    """Each multi-process setting from its flag, else from its environment variable;
    the variables only once a coordinator is known (a run without one is one process)."""
    settings = {}
    for name, (variable, parse) in MULTI_PROCESS_ENV.items():
        value, text = getattr(args, name), os.environ.get(variable)
        if value is None and text is not None and (name == "coordinator" or settings["coordinator"] is not None):
            try:
                value = parse(text)
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"environment variable {variable}: {e}") from None
        settings[name] = value
    return settings


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _defaults(name: str) -> str:
    values = {preset: settings.get(name) for preset, settings in PRESETS.items()}
    if len(set(values.values())) == 1:
        return f"default {next(iter(values.values()))}"
    return "default " + ", ".join(f"{v} ({p})" for p, v in values.items() if v is not None)


TRAIN_EXAMPLES = """examples:
  minitx train                                            the built-in corpus (preset hello)
  minitx train --data input.txt                           any UTF-8 text (preset shakespeare-baby)
  minitx train --data input.txt --steps 5000 --out runs/mine
  minitx train --resume runs/mine --steps 8000            continue a run
"""
GENERATE_EXAMPLES = """examples:
  minitx generate --checkpoint runs/hello-001 --prompt hello
  minitx generate --checkpoint runs/input-001 --prompt "ROMEO:" --temperature 0.8 --top-k 20
  minitx generate --checkpoint runs/input-001 --prompt "ROMEO:" --top-p 0.9 --stop "\\n\\n"
"""
ATTENTION_EXAMPLES = """examples:
  minitx attention --checkpoint runs/hello-001 --prompt "hello jax" --out attention.png
  minitx attention --checkpoint runs/input-001 --prompt "ROMEO:" --out attention.pdf
"""
PREPARE_EXAMPLES = """examples:
  minitx prepare --data big.txt                            char tokenizer, cached under ~/.cache/minitx
  minitx prepare --data big.txt --tokenizer bpe --vocab-size 8192
  minitx train --data big.txt --tokenizer bpe --vocab-size 8192   reuses that preparation
"""
DATA_EXAMPLES = """examples:
  minitx data shakespeare                      writes data/tinyshakespeare.txt (1,115,394 characters)
  minitx train --data data/tinyshakespeare.txt --preset shakespeare-baby
"""
GPT2_EXAMPLES = """examples:
  minitx import-gpt2 gpt2 --out runs/gpt2              a folder with config.json, model.safetensors, tokenizer.json
  minitx generate --checkpoint runs/gpt2 --prompt "The meaning of life is" --max-new-tokens 40
  minitx train --data input.txt --tokenizer bpe --positions learned --tie-embeddings --out runs/mine
  minitx export-gpt2 runs/mine --out mine-hf           loads with transformers.GPT2LMHeadModel.from_pretrained
"""
PLOT_EXAMPLES = """examples:
  minitx plot runs/hello-001                   writes runs/hello-001/loss.png
  minitx plot runs/input-001 --log --out curves.svg
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand; errors raise UsageError instead of exiting."""
    parser = _Parser(prog="minitx", description="A mini GPT-style character model in plain JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    kw = {"formatter_class": argparse.RawDescriptionHelpFormatter}

    t = sub.add_parser("train", help="train a model (on the built-in corpus unless --data is given)",
                       epilog=TRAIN_EXAMPLES, **kw)
    _add_corpus_flags(t)
    t.add_argument("--eval-tokens", type=_eval_tokens, metavar="N|all", help=f"validate on a fixed sample of about "
                   f"N tokens, the same every time (default: all when the validation split has at most "
                   f"{DEFAULT_EVAL_TOKENS:,}, else {DEFAULT_EVAL_TOKENS:,}); only with --data")
    t.add_argument("--batches", choices=("auto", "device", "memmap"), default="auto",
                   help="where batches come from: the text held on the device, or gathered on the host from the "
                        "memory-mapped token file and prefetched (default auto: the device up to "
                        f"{DEVICE_RESIDENT_TOKENS:,} training tokens)")
    t.add_argument("--preset", choices=sorted(PRESETS), help="a set of defaults (default: hello without --data, "
                   "shakespeare-baby with it; shakespeare-char is nanoGPT's GPU recipe); any flag below overrides it")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    t.add_argument("--out", metavar="DIR", help="new run directory (default: runs/<corpus>-NNN, a new one)")
    t.add_argument("--steps", type=_positive, help=f"train until this many steps in total ({_defaults('steps')})")
    t.add_argument("--batch-size", type=_positive, help=f"sequences per step, B ({_defaults('batch_size')})")
    t.add_argument("--context", type=_positive, help=f"context window T, the model's max_len "
                   f"({_defaults('context')})")
    t.add_argument("--layers", type=_positive, help=f"residual blocks, L ({_defaults('layers')})")
    t.add_argument("--heads", type=_positive, help=f"attention heads, H ({_defaults('heads')})")
    t.add_argument("--width", type=_positive, help=f"model width D, a multiple of --heads ({_defaults('width')})")
    t.add_argument("--dropout", type=_float, help=f"dropout rate in training, in [0, 1) ({_defaults('dropout')})")
    t.add_argument("--positions", choices=("sinusoidal", "learned"), help="fixed sinusoidal positions, or a "
                   "learned table as in GPT-2 (default sinusoidal)")
    t.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, help="the output head reuses the "
                   "token embedding, with no bias, as in GPT-2 (default: a head of its own)")
    t.add_argument("--lr", type=_float, help=f"peak learning rate ({_defaults('lr')})")
    t.add_argument("--min-lr", type=_float, help="final learning rate of the cosine decay (default: --lr / 10)")
    t.add_argument("--warmup", type=_int_in(0, INT32_MAX), help=f"linear warm-up steps ({_defaults('warmup')}; "
                   f"at most a tenth of a shorter run)")
    t.add_argument("--decay-steps", type=_positive, help="length of the cosine schedule (default: --steps of the "
                   "first run, kept on resume)")
    t.add_argument("--weight-decay", type=_float, help="AdamW's decoupled weight decay on matrices and the "
                       "embedding (default 0.1)")
    t.add_argument("--seed", type=_int_in(0, 2**32 - 1), help="seeds initialisation and batches (default 0)")
    t.add_argument("--eval-every", type=_positive, help=f"validation loss every N steps and at the end "
                   f"({_defaults('eval_every')}); only with --data")
    t.add_argument("--save-every", type=_positive, help=f"checkpoint every N steps and at the end "
                   f"({_defaults('save_every')})")
    t.add_argument("--log-every", type=_positive, help=f"print and record the loss every N steps "
                   f"({_defaults('log_every')})")
    t.add_argument("--prompt", help="seed of the sample printed at the end (default: 'hello' if the text has it, "
                   "else its first character)")
    t.add_argument("--max-new-tokens", type=_int_in(1, MAX_NEW_TOKENS), default=100,
                   help="length of that sample (default %(default)s)")
    t.add_argument("--devices", type=_positive, help="data-parallel over the first N devices (default: all)")
    t.add_argument("--fsdp", action="store_true", help="split parameters and optimiser state over the devices")
    t.add_argument("--coordinator", metavar="HOST:PORT", type=_address,
                   help="multi-process run: address of process 0 (or MINITX_COORDINATOR)")
    t.add_argument("--num-processes", type=_positive,
                   help="multi-process run: how many processes (or MINITX_NUM_PROCESSES)")
    t.add_argument("--process-id", type=_int_in(0, INT32_MAX),
                   help="multi-process run: this process's index, 0 .. N - 1 (or MINITX_PROCESS_ID)")
    t.add_argument("--heartbeat-timeout", type=_int_in(1, 86400),
                   help="multi-process run: seconds after which the others stop when a process dies "
                        "(or MINITX_HEARTBEAT_TIMEOUT, read only in multi-process runs; default 60)")

    g = sub.add_parser("generate", help="continue a prompt with a trained model", epilog=GENERATE_EXAMPLES, **kw)
    g.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory (or its checkpoint/)")
    g.add_argument("--prompt", required=True, help="the text to continue (a char model: every character must be "
                   "in its vocabulary; byte and bpe models take any text)")
    g.add_argument("--max-new-tokens", type=_int_in(1, MAX_NEW_TOKENS), default=100, help="tokens to generate "
                   "(characters for a char model; default %(default)s)")
    g.add_argument("--temperature", type=_float, help="0 is greedy (default: 0, or 1 when --top-k or --top-p "
                   "is given)")
    g.add_argument("--top-k", type=_positive, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=_float, help="nucleus sampling: the smallest set reaching this mass, in (0, 1]")
    g.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0, help="seeds sampling (default %(default)s)")
    g.add_argument("--stop", help="stop after generating this string")

    a = sub.add_parser("attention", help="draw the attention maps of every layer and head for a prompt",
                       epilog=ATTENTION_EXAMPLES, **kw)
    a.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory (or its checkpoint/)")
    a.add_argument("--prompt", required=True, help="text of at most the model's context in tokens (known "
                   "characters for a char model)")
    a.add_argument("--out", required=True, metavar="FILE", help="picture to write: .png, .pdf, .svg or .jpg")

    r = sub.add_parser("prepare", help="tokenize a text file once, streamed, into the cache that train reads",
                       epilog=PREPARE_EXAMPLES, **kw)
    _add_corpus_flags(r, required=True)

    d = sub.add_parser("data", help="download a dataset (Tiny Shakespeare) and check its SHA-256",
                       epilog=DATA_EXAMPLES, **kw)
    d.add_argument("name", choices=["shakespeare"], help="the dataset")
    d.add_argument("--out", metavar="FILE", default=os.path.join("data", "tinyshakespeare.txt"),
                   help="where to put it (default %(default)s)")
    d.add_argument("--url", help=argparse.SUPPRESS)          # another source of the same file (tests, mirrors)

    i = sub.add_parser("import-gpt2", help="a Hugging Face GPT-2 folder -> a run that generate uses",
                       epilog=GPT2_EXAMPLES, **kw)
    i.add_argument("hf_dir", metavar="HF_DIR", help="config.json, model.safetensors, and tokenizer.json or "
                   "vocab.json + merges.txt")
    i.add_argument("--out", required=True, metavar="RUN_DIR", type=_nonempty, help="new run directory to write")
    e = sub.add_parser("export-gpt2", help="a run with learned positions and tied embeddings -> a Hugging Face "
                       "GPT-2 folder", epilog=GPT2_EXAMPLES, **kw)
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its checkpoint/)")
    e.add_argument("--out", required=True, metavar="HF_DIR", type=_nonempty, help="new folder to write (or an empty "
                   "one)")

    p = sub.add_parser("plot", help="draw the loss curves of a run from its metrics.jsonl", epilog=PLOT_EXAMPLES,
                       **kw)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE", help="picture to write (default RUN_DIR/loss.png)")
    p.add_argument("--log", action="store_true", help="logarithmic loss axis")
    return parser


DEFAULT_EVAL_TOKENS = 1 << 17         # about Tiny Shakespeare's validation split (111,540 characters)
DEVICE_RESIDENT_TOKENS = 1 << 26      # 256 MB of int32 ids on the device; more are memory-mapped


def _add_corpus_flags(parser, required: bool = False) -> None:
    parser.add_argument("--data", metavar="FILE", required=required,
                        help="UTF-8 text file; 90%% trains, the last 10%% validates"
                             + ("" if required else " (default: the built-in corpus)"))
    parser.add_argument("--tokenizer", choices=("char", "byte", "bpe"), help="char: each character is a token "
                        "(default); byte: UTF-8 bytes, 256 ids, any text; bpe: byte-level BPE learned from the "
                        "training split (needs the bpe extra)")
    parser.add_argument("--vocab-size", type=_int_in(256, 1 << 20), help="bpe only: ids in the vocabulary "
                        "(default 4096)")
    parser.add_argument("--cache-dir", metavar="DIR", type=_nonempty, help="where prepared data is kept (default: "
                        "$MINITX_CACHE_DIR, else $XDG_CACHE_HOME/minitx, else ~/.cache/minitx)")


def check_picture_path(path: str) -> None:
    """UsageError unless a picture can be written at path: a known extension, an existing
    writable folder, not a directory."""
    if not path.lower().endswith(PICTURE_EXTENSIONS):
        raise UsageError(f"cannot write picture {path!r}: give a file name ending in "
                         f"{', '.join(PICTURE_EXTENSIONS)}")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"cannot write picture {path!r}: it is a directory")
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write picture {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write picture {path!r}: folder {folder!r} is not writable")


# ----------------------------------------------------------------------------- train


def _settings(args) -> dict:
    """Preset defaults overridden by the flags given."""
    preset = args.preset or ("shakespeare-baby" if args.data else "hello")
    settings = {**PRESETS[preset], **COMMON_SETTINGS}
    given = _given(args)
    settings.update(given)
    if "warmup" not in given:       # a short run keeps the preset's warm-up from exceeding it
        settings["warmup"] = min(settings["warmup"], settings.get("decay_steps", settings["steps"]) // 10)
    return settings


def _given(args) -> dict:
    return {k: getattr(args, k) for k in MODEL_SETTINGS + TRAIN_SETTINGS if getattr(args, k, None) is not None}


def _configs(settings: dict, vocab_size: int):
    from minitx_fn.config import ModelConfig, TrainConfig
    mc = ModelConfig(vocab_size=vocab_size, **{FIELD_OF_FLAG[k]: settings[k] for k in MODEL_SETTINGS})
    tc = TrainConfig(**{k: settings[k] for k in TRAIN_SETTINGS if k in settings})
    return mc, tc


def _start_processes(args) -> bool:
    """Join a multi-process run when asked; True in the process that writes (process 0).
    Fills args' multi-process settings from the environment where no flag gave them."""
    settings = _with_environment(args)
    if args.heartbeat_timeout is not None and settings["coordinator"] is None:
        raise UsageError("--heartbeat-timeout is for multi-process runs; give --coordinator, --num-processes and "
                         "--process-id too")
    vars(args).update(settings)
    given = [args.coordinator, args.num_processes, args.process_id]
    if all(v is None for v in given):
        return True
    if any(v is None for v in given):
        raise UsageError("a multi-process run needs all of --coordinator, --num-processes and --process-id")
    if not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process-id {args.process_id} must lie in [0, {args.num_processes})")
    from minitx_fn import distributed
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           heartbeat_timeout=args.heartbeat_timeout or distributed.HEARTBEAT_TIMEOUT_S)
    return args.process_id == 0


def _corpus(args, out, tokenizer=None, expected_sha256: str | None = None, path: str | None = None):
    """(corpus, name) of --data (prepared, or read from the cache), or of the built-in corpus."""
    from minitx_fn import corpus
    path = path or args.data
    if path is None:
        from minitx_fn import data
        return corpus.Corpus.from_text(data.builtin_text(), args.tokenizer or "char", args.vocab_size,
                                       tokenizer), "hello"
    prepared = corpus.prepare(path, args.tokenizer or "char", args.vocab_size, cache_dir=args.cache_dir,
                              tokenizer=tokenizer, expected_sha256=expected_sha256, out=out)
    return prepared, os.path.splitext(os.path.basename(path))[0] or "data"


def _resume_corpus(args, saved: dict | None, tokenizer, out):
    """The corpus a resumed run trains on: the same text as before, wherever it lies now,
    with the run's own tokenizer."""
    from minitx_fn import corpus
    if args.tokenizer is not None or args.vocab_size is not None:
        raise UsageError("resuming keeps the run's tokenizer; drop --tokenizer and --vocab-size")
    if saved is None:
        if args.data:
            raise UsageError("this run trained on the built-in corpus; drop --data to resume it")
        return _corpus(args, out, tokenizer)[0]
    if not args.data and not os.path.exists(saved["path"]):
        raise UsageError(f"the run's data file {saved['path']!r} is gone; if it moved, pass --data with its new "
                         f"path (the text must be the same)")
    try:
        return _corpus(args, out, tokenizer, saved["sha256"], args.data or saved["path"])[0]
    except corpus.SourceChangedError as e:
        if args.data:
            raise UsageError(f"--data {args.data!r} is not the text this run trained on (its SHA-256 differs from "
                             f"that of {saved['path']!r}); give the run's own text, or start a new run") from None
        raise UsageError(f"the run's data file {e.path!r} changed since the run trained on it (its SHA-256 "
                         f"differs); restore it, or pass --data with the original text") from None


def _check_resume_flags(args, saved) -> None:
    """Flags given with --resume must agree with the saved run, except RESUMABLE ones."""
    mc, tc = saved.model_config, saved.train_config
    current = {**{flag: getattr(mc, FIELD_OF_FLAG[flag]) for flag in MODEL_SETTINGS},
               **{name: getattr(tc, name) for name in TRAIN_SETTINGS}}
    field = {**FIELD_OF_FLAG, **{name: name for name in TRAIN_SETTINGS}}
    conflicts = [f"{flag_name(field[k], v)} (saved: {flag_name(field[k], current[k])})" for k, v in _given(args).items()
                 if k not in RESUMABLE and v != current[k]]
    if args.preset:
        conflicts.append(f"--preset {args.preset}")
    if conflicts:
        raise UsageError(f"resuming keeps the run's settings, but these differ: {', '.join(conflicts)}; "
                         f"drop them, or start a new run with --out")


def _prompt_ids(tokenizer, prompt: str, what: str = "the prompt"):
    if not prompt:
        raise UsageError(f"{what} is empty; give at least one character")
    # A byte that is not UTF-8 reaches Python as a lone surrogate: no tokenizer may take it
    # (byte would echo it back, BPE cannot encode it at all).
    bad = sorted({c for c in prompt if "\ud800" <= c <= "\udfff"})
    if bad and tokenizer.kind != "char":
        raise UsageError(f"{what} holds bytes that are not UTF-8 text ({', '.join(repr(c) for c in bad)}); give "
                         f"UTF-8 text")
    return tokenizer.encode(prompt)


def _sample_prompt(args, tokenizer, ids: np.ndarray) -> str:
    """--prompt, else 'hello' if the text's first 64 tokens hold it, else its first character."""
    if args.prompt is not None:
        return args.prompt
    start = tokenizer.decode(ids[:64])
    return "hello" if "hello" in start else start[0]


class TrainPlan(NamedTuple):
    """Everything `minitx train` will do, checked before anything is written."""

    run_dir: str
    resuming: bool
    model_config: object
    train_config: object
    corpus: object                  # corpus.Corpus: the tokenizer, the ids, their source
    train_ids: np.ndarray           # (N,) token ids to sample batches from (maybe memory-mapped)
    val_windows: object | None      # data.Windows: (W, T + 1) validation windows, None without a held-out split
    batches: str                    # "device" (the ids held there) or "memmap" (gathered on the host)
    state: object | None            # the saved TrainState when resuming
    prompt: str                     # the seed of the final sample


def cmd_train(args, out=None) -> int:
    """`minitx train`: a new run, or --resume of a saved one; returns the exit status."""
    import contextlib

    from minitx_fn import runs
    from minitx_fn.signals import StopSignals

    is_main = _start_processes(args)
    out = (out or sys.stdout) if is_main else open(os.devnull, "w")
    multi_process = args.coordinator is not None
    with StopSignals(forward_to_sigterm=multi_process) as signals, contextlib.ExitStack() as stack:
        if args.resume:
            run_dir = _resume_dir(args)
            if is_main:                 # hold the lock before reading what another process might be writing
                _take_lock(stack, run_dir, out)
                removed = runs.remove_temporaries(run_dir)
                if removed:
                    print(f"Removed {len(removed)} unfinished checkpoint(s) a killed save left: "
                          f"{', '.join(removed)}", file=out)
            plan = _plan_resume(args, run_dir, out)
        else:
            plan = _plan_new_run(args, out)
            if is_main:
                os.makedirs(plan.run_dir, mode=runs.dir_mode(), exist_ok=True)
                _take_lock(stack, plan.run_dir, out)
                runs.check_new_run_dir(plan.run_dir)                 # nobody slipped in before the lock
        return _run(args, plan, is_main, out, signals, stack)


def _resume_dir(args) -> str:
    from minitx_fn import runs
    if args.out:
        raise UsageError("--resume continues a run in its own directory; drop --out (to branch a run, copy its "
                         "directory first)")
    run_dir = os.path.normpath(args.resume)
    if os.path.basename(run_dir) == runs.CHECKPOINT:
        run_dir = os.path.dirname(run_dir) or "."
    if not os.path.isdir(run_dir):
        raise UsageError(f"no run directory {run_dir!r}; give the --out directory of a training run")
    return run_dir


def _take_lock(stack, run_dir: str, out) -> None:
    from minitx_fn import runs
    lock = stack.enter_context(runs.Lock(run_dir))
    if lock.took_over is not None:
        print(f"Took over the lock of process {lock.took_over}, which is no longer running", file=out)


def _plan_new_run(args, out) -> TrainPlan:
    from minitx_fn import runs

    run_dir = args.out or None
    if run_dir is not None:
        runs.check_new_run_dir(run_dir)                               # before preparing a large text
    corpus, name = _corpus(args, out)
    mc, tc = _configs(_settings(args), corpus.tokenizer.vocab_size)
    run_dir = run_dir or runs.new_run_name("runs", name)
    runs.check_new_run_dir(run_dir)
    return _plan(args, run_dir, False, mc, tc, corpus, None)


def _plan_resume(args, run_dir: str, out) -> TrainPlan:
    from minitx_fn import checkpoint

    ckpt = checkpoint.load(run_dir)
    if ckpt.origin is not None:
        raise UsageError(f"{run_dir!r} holds a model imported from {ckpt.origin['gpt2']!r}, with no training "
                         f"text or schedule of its own, so there is nothing to resume; generate with it or export "
                         f"it (fine-tuning an imported model is not supported yet)")
    _check_resume_flags(args, ckpt)
    corpus = _resume_corpus(args, ckpt.data, ckpt.tokenizer, out)
    changes = {k: getattr(args, k) for k in RESUMABLE if getattr(args, k) is not None}
    if changes.get("eval_tokens") == "all":
        changes["eval_tokens"] = None
    tc = ckpt.train_config.replace(**changes)
    if int(ckpt.state.step) >= tc.steps:
        raise UsageError(f"the run is already at step {int(ckpt.state.step)}; pass --steps N with N larger "
                         f"to train further")
    return _plan(args, run_dir, True, ckpt.model_config, tc, corpus, ckpt.state)


def _plan(args, run_dir, resuming, mc, tc, corpus, state) -> TrainPlan:
    """The checks both kinds of run share: the final sample's prompt, the data's length,
    the validation sample, where batches come from, memory."""
    from minitx_fn import data, memory

    tokenizer = corpus.tokenizer
    prompt = _sample_prompt(args, tokenizer, corpus.ids)
    _prompt_ids(tokenizer, prompt)                                   # before training, not after
    if corpus.source is not None:
        train_ids, val_ids = corpus.train, corpus.validation
        data.check_length(val_ids, mc.max_len, "validation (last 10% of the)")
        if not resuming:                                             # a resumed run keeps its own
            wanted = args.eval_tokens or ("all" if len(val_ids) <= DEFAULT_EVAL_TOKENS else DEFAULT_EVAL_TOKENS)
            tc = tc.replace(eval_tokens=None if wanted == "all" else wanted)
        val_windows = data.eval_windows(val_ids, mc.max_len, tc.eval_tokens)
    else:
        train_ids, val_windows = corpus.ids, None                   # the built-in cycle: no held-out split
    data.check_length(train_ids, mc.max_len, "training")
    if len(train_ids) > INT32_MAX:
        raise UsageError(f"the training split has {len(train_ids):,} tokens; batches index it with 32-bit "
                         f"offsets, so use a text of at most {INT32_MAX:,} tokens")
    batches = args.batches
    if batches == "auto":
        batches = "device" if len(train_ids) <= DEVICE_RESIDENT_TOKENS else "memmap"
    memory.check(memory.training_bytes(mc, tc.batch_size), "training this model",
                 "try a smaller {b}, {w}, {c} or {l}", b=("batch_size", tc.batch_size), w=("d_model", mc.d_model),
                 c=("max_len", mc.max_len), l=("n_layers", mc.n_layers))
    if batches == "device":
        memory.check(memory.training_bytes(mc, tc.batch_size) + 4 * len(train_ids),
                     "training this model with its text held on the device", "try --batches memmap")
    memory.check(memory.generation_bytes(mc, 1, args.max_new_tokens), "the final sample",
                 "try a smaller {n}", n=("max_new_tokens", args.max_new_tokens))
    return TrainPlan(run_dir, resuming, mc, tc, corpus, train_ids, val_windows, batches, state, prompt)


def _run(args, plan: TrainPlan, is_main: bool, out, signals, stack) -> int:
    """Train as planned: the lock is held, every input was checked. stack (an ExitStack)
    closes the batch prefetcher however the run ends."""
    import jax
    import jax.numpy as jnp

    from minitx_fn import checkpoint, data, distributed, loop, model, runs, train

    run_dir, mc, tc = plan.run_dir, plan.model_config, plan.train_config
    metrics_path = os.path.join(run_dir, runs.METRICS) if is_main else None
    if plan.resuming and is_main and os.path.exists(metrics_path):
        if runs.read_records(metrics_path).torn:
            print(f"{metrics_path} ended in a half-written line (a process killed mid-write); it is dropped",
                  file=out)
        runs.truncate_records(metrics_path, int(plan.state.step))
    state = plan.state if plan.resuming else train.init_state(train.keys(tc.seed).init, mc, tc.step_config)
    data_key = train.keys(tc.seed).data

    mesh = None
    if args.devices or jax.device_count() > 1:
        mesh = distributed.make_mesh(args.devices)
        distributed.check_batch(tc.batch_size, mesh)
        shardings = distributed.state_shardings(state, mesh, args.fsdp)
        state = distributed.put_global(jax.device_get(state), shardings)
        if plan.batches == "device":
            train_data = distributed.put_global(np.asarray(plan.train_ids, np.int32), distributed.replicated(mesh))
        step = distributed.data_parallel(train.step_fn(mc, tc.step_config), mesh, shardings)
        sample = distributed.sharded_batch_at(mesh)
        # XLA:CPU runs each device's part of a step on a shared thread pool; with
        # dozens of multi-device steps queued, the parts of different steps can hold
        # every thread while waiting at an all-reduce, and deadlock. At most two
        # steps in flight still overlap dispatch with compute.
        max_in_flight = 2
    else:
        if plan.batches == "device":
            train_data = jnp.asarray(np.asarray(plan.train_ids, np.int32))
        step = functools.partial(train.train_step, model_config=mc, train_config=tc.step_config)
        sample, max_in_flight = train.batch_at, None

    if plan.batches == "device":
        def next_batch(step_number):
            return sample(train_data, data_key, step_number, batch_size=tc.batch_size, context=mc.max_len)
        where = f"sampled on the device from the {len(plan.train_ids):,} training tokens held there"
    else:
        def host_batch(step_number):
            return data.host_batch_at(plan.train_ids, data_key, step_number, batch_size=tc.batch_size,
                                      context=mc.max_len, sharding=None if mesh is None else
                                      distributed.batch_sharding(mesh))
        next_batch = stack.enter_context(data.Prefetcher(host_batch, start=int(distributed.scalar(state.step))))
        where = (f"gathered on the host from the memory-mapped {len(plan.train_ids):,} training tokens, "
                 f"prefetched {data.Prefetcher.DEPTH} steps ahead")

    def evaluate(params):
        if mesh is not None:
            params = jax.device_put(distributed.to_host(params), jax.local_devices()[0])
        return train.evaluate(params, plan.val_windows, config=mc)

    def save(s):
        host_state = distributed.to_host(s)                         # every process takes part in the gather
        if is_main:
            try:
                checkpoint.save(run_dir, host_state, model_config=mc, train_config=tc,
                                tokenizer=plan.corpus.tokenizer, data=plan.corpus.source)
            except OSError as e:
                raise StorageError(os.path.join(run_dir, runs.CHECKPOINT), e) from None

    if plan.resuming:
        print(f"Resuming {run_dir} from step {int(state.step)}", file=out)
    print(f"Run directory: {run_dir}", file=out)
    if mesh is not None:
        print(f"Data-parallel over {mesh.devices.size} devices in {jax.process_count()} process(es)"
              + (", parameters split (FSDP)" if args.fsdp else ""), file=out)
    print(f"Model: {model.count_params(state.params):,} parameters, {mc.n_layers} layers, width {mc.d_model}, "
          f"{mc.n_heads} heads, context {mc.max_len}, vocabulary {mc.vocab_size} ({plan.corpus.tokenizer.kind})",
          file=out)
    print(f"Batches: {where}" + ("" if plan.val_windows is None else
          f"; validation: {len(plan.val_windows):,} windows of {mc.max_len} tokens"
          + ("" if len(plan.val_windows) == data.windows_in(len(plan.corpus.validation), mc.max_len)
             else " (a fixed sample)")), file=out)
    print("Starting training...", file=out, flush=True)
    started = time.perf_counter()
    try:
        result = loop.fit(state, step=step, next_batch=next_batch, model_config=mc, train_config=tc,
                          evaluate=evaluate if plan.val_windows is not None else None, metrics_path=metrics_path,
                          save=save, out=out, signals=signals, max_in_flight=max_in_flight)
    except loop.NonFiniteError as e:
        raise RunFailed(f"{e}; training stopped and {_kept(run_dir)}; try a lower --lr or more --warmup") from None
    except StorageError as e:
        raise RunFailed(f"{e.strerror}; training stopped and {_kept(run_dir)}; free some space or fix the "
                        f"permissions, then continue with: minitx train --resume {run_dir}") from None
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        first = str(e).strip().splitlines()[0][:200]
        raise RunFailed(f"the multi-process run broke off, most likely because another process died ({first}); "
                        f"{_kept(run_dir) if is_main else 'process 0 keeps the last checkpoint'}; continue with "
                        f"--resume, in any number of processes") from None
    elapsed = time.perf_counter() - started
    final_step = int(distributed.scalar(result.state.step))
    # Gathering is a collective: every process takes part before the others leave.
    params = result.state.params if mesh is None else jax.device_put(
        distributed.to_host(result.state.params), jax.local_devices()[0])
    if result.stopped_by is not None:                    # every process of a run leaves with this status
        name = signal.Signals(result.stopped_by).name
        print(f"\nStopped by {name} at step {final_step}; checkpoint saved. "
              f"Continue with: minitx train --resume {run_dir}", file=out)
        return 128 + result.stopped_by
    if not is_main:
        return 0
    print(f"Finished {final_step} steps in {elapsed:.1f} s"
          + (f"; validation loss {result.last_record['val_loss']:.4f}"
             if result.last_record and "val_loss" in result.last_record else ""), file=out)
    picture = _draw_losses(metrics_path, os.path.join(run_dir, runs.LOSS_PNG), out)
    print("Generated text:", file=out)
    print(plan.prompt + _generate_text(params, mc, plan.corpus.tokenizer, plan.prompt, args.max_new_tokens,
                                       jax.random.key(0)), file=out)
    _next_steps(run_dir, plan.prompt, picture, out)
    return 0


class RunFailed(Exception):
    """The run itself failed (a non-finite loss, a full disk): exit status 1."""


def _kept(run_dir: str) -> str:
    """Which checkpoint survives a failure, in words."""
    from minitx_fn import checkpoint
    try:
        step = int(checkpoint.load(run_dir).meta["step"])
    except (Error, OSError):
        return "no checkpoint had been saved yet"
    return f"the last good checkpoint (step {step}) is kept in {run_dir}"


def _draw_losses(metrics_path: str, png: str, out) -> str | None:
    from minitx_fn import plot
    try:
        drawn = plot.plot_losses(metrics_path, png)
    except plot.MissingMatplotlibError:
        print("(No loss.png: matplotlib is not installed; pip install -e \".[plot]\" adds the pictures.)", file=out)
        return None
    except OSError as e:
        raise RunFailed(f"cannot write {png!r}: {e.strerror or e}; the checkpoint is saved") from None
    if drawn:
        print(f"Loss curves: {drawn}", file=out)
    return drawn


def _quote(text: str) -> str:
    import shlex
    return shlex.quote(text)


def _next_steps(run_dir: str, prompt: str, picture: str | None, out) -> None:
    """Commands to copy into a POSIX shell: every path and prompt shell-quoted."""
    run, quoted, attention_png = (_quote(a) for a in (run_dir, prompt, os.path.join(run_dir, "attention.png")))
    print("\nNext:", file=out)
    print(f"  minitx generate --checkpoint {run} --prompt {quoted} --temperature 0.8", file=out)
    print(f"  minitx attention --checkpoint {run} --prompt {quoted} --out {attention_png}", file=out)
    if picture is None:
        print("  pip install -e \".[plot]\"    then: minitx plot " + run, file=out)
    else:
        print(f"  minitx plot {run} --log", file=out)
    print(f"  minitx train --resume {run} --steps N    to train further", file=out)


def _generate_text(params, mc, tokenizer, prompt: str, max_new_tokens: int, key, sampler=None,
                   stop: str | None = None) -> str:
    from minitx_fn.generate import generate
    from minitx_fn.sampling import GREEDY
    ids = _prompt_ids(tokenizer, prompt)
    stop_ids = _prompt_ids(tokenizer, stop, "the stop string") if stop is not None else ()
    new = generate(params, [ids], config=mc, key=key, max_new_tokens=max_new_tokens, sampler=sampler or GREEDY,
                   stop=stop_ids)[0]
    return tokenizer.decode(new)


# ----------------------------------------------------------------------------- generate, attention, plot


def cmd_generate(args, out=None) -> int:
    """`minitx generate`: continue a prompt from a checkpoint (greedy unless a sampling flag is given)."""
    out = out or sys.stdout
    import jax

    from minitx_fn import checkpoint, memory
    from minitx_fn.sampling import Sampler

    temperature = args.temperature
    if temperature is None:
        temperature = 1.0 if (args.top_k or args.top_p is not None) else 0.0
    sampler = Sampler(temperature=temperature, top_k=args.top_k, top_p=args.top_p)
    ckpt = checkpoint.load(args.checkpoint)
    _prompt_ids(ckpt.tokenizer, args.prompt)
    if args.stop is not None:
        _prompt_ids(ckpt.tokenizer, args.stop, "the stop string")
    memory.check(memory.generation_bytes(ckpt.model_config, 1, args.max_new_tokens), "this generation",
                 "try a smaller {n}", n=("max_new_tokens", args.max_new_tokens))
    text = _generate_text(ckpt.state.params, ckpt.model_config, ckpt.tokenizer, args.prompt, args.max_new_tokens,
                          jax.random.key(args.seed), sampler, args.stop)
    print(args.prompt + text, file=out)
    return 0


def cmd_attention(args, out=None) -> int:
    """`minitx attention`: a picture of the attention maps (L rows, H columns) for a prompt."""
    import jax.numpy as jnp

    from minitx_fn import checkpoint, model, plot

    check_picture_path(args.out)
    plot.require_matplotlib()
    ckpt = checkpoint.load(args.checkpoint)
    mc = ckpt.model_config
    ids = _prompt_ids(ckpt.tokenizer, args.prompt)
    if len(ids) > mc.max_len:
        raise UsageError(f"the prompt has {len(ids)} tokens; the model's context is {mc.max_len}")
    maps = np.asarray(model.attention_maps(ckpt.state.params, jnp.asarray(ids)[None, :], config=mc))[:, 0]
    try:
        plot.plot_attention(maps, [ckpt.tokenizer.decode([i]) for i in ids], args.out)
    except OSError as e:
        raise RunFailed(f"cannot write {args.out!r}: {e.strerror or e}") from None
    print(f"Attention maps ({mc.n_layers} layers x {mc.n_heads} heads): {args.out}", file=out or sys.stdout)
    return 0


def cmd_plot(args, out=None) -> int:
    """`minitx plot`: the loss curves of a run from its metrics.jsonl."""
    from minitx_fn import plot, runs

    out = out or sys.stdout
    png = args.out or os.path.join(args.run_dir, runs.LOSS_PNG)
    check_picture_path(png)
    metrics = os.path.join(args.run_dir, runs.METRICS)
    if not os.path.isfile(metrics):
        raise UsageError(f"{metrics!r} does not exist; give the directory of a training run")
    plot.require_matplotlib()
    records = runs.read_records(metrics)
    if records.torn:
        print(f"{metrics} ends in a half-written line (a process killed mid-write); it is left out", file=out)
    try:
        drawn = plot.plot_losses(metrics, png, log=args.log)
    except OSError as e:
        raise RunFailed(f"cannot write {png!r}: {e.strerror or e}") from None
    if drawn is None:
        raise UsageError(f"{metrics!r} has no records yet; train for at least --log-every steps")
    print(f"Loss curves: {drawn}", file=out)
    return 0


def cmd_data(args, out=None) -> int:
    """`minitx data shakespeare`: download Tiny Shakespeare and check its SHA-256."""
    from minitx_fn import data
    out = out or sys.stdout
    try:
        fetched = data.download(args.url or data.SHAKESPEARE_URL, args.out, data.SHAKESPEARE_SHA256)
    except data.DownloadError as e:
        raise RunFailed(str(e)) from None
    print(f"{'Downloaded' if fetched else 'Already here:'} {args.out} (SHA-256 checked). Train on it with:\n"
          f"  minitx train --data {args.out} --preset shakespeare-baby", file=out)
    return 0


def cmd_prepare(args, out=None) -> int:
    """`minitx prepare`: tokenize a text file into the cache `minitx train --data` reads."""
    from minitx_fn.signals import StopSignals
    out = out or sys.stdout
    with StopSignals():               # SIGTERM and SIGHUP end it like Ctrl-C: its temporary folder removed
        _corpus(args, out)
    print(f"Train on it with:\n  minitx train --data {_quote(args.data)}"
          + (f" --tokenizer {args.tokenizer}" if args.tokenizer else "")
          + (f" --vocab-size {args.vocab_size}" if args.vocab_size else "")
          + (f" --cache-dir {_quote(args.cache_dir)}" if args.cache_dir else ""), file=out)
    return 0


def cmd_import_gpt2(args, out=None) -> int:
    """`minitx import-gpt2`: a Hugging Face GPT-2 directory -> a run directory (step 0, Adam's state at zero)."""
    from minitx_fn.signals import StopSignals
    with StopSignals():               # SIGTERM and SIGHUP end it like Ctrl-C: one line, no half-written run
        return _import_gpt2(args, out or sys.stdout)


def _import_gpt2(args, out) -> int:
    import contextlib

    import jax

    from minitx_fn import checkpoint, gpt2, memory, model, runs
    from minitx_fn.config import TrainConfig
    from minitx_fn.train import TrainState, make_optimizer
    # An import that was killed mid-save leaves a temporary folder: removed below, under the lock.
    runs.check_new_run_dir(args.out, ignore_temporaries=True)
    # Before reading the weights: the tensors as read, our tree, Adam's two moments,
    # and the bytes of the files a save builds in memory, about 6 copies in all.
    memory.check(6 * 4 * memory.param_count(gpt2.read_config(args.hf_dir)), "importing this model",
                 "import it on a machine with more memory")
    mc, params, tokenizer = gpt2.import_dir(args.hf_dir)
    params = jax.tree.map(jax.numpy.asarray, params)
    tc = TrainConfig()
    state = TrainState(params, make_optimizer(tc).init(params), jax.numpy.zeros((), jax.numpy.int32))
    created = not os.path.exists(args.out)
    try:
        with contextlib.ExitStack() as stack:
            os.makedirs(args.out, mode=runs.dir_mode(), exist_ok=True)
            _take_lock(stack, args.out, out)
            runs.remove_temporaries(args.out)
            runs.check_new_run_dir(args.out)                        # another process may have written it meanwhile
            checkpoint.save(args.out, state, model_config=mc, train_config=tc, tokenizer=tokenizer,
                            origin={"gpt2": os.path.abspath(args.hf_dir)})
    except BaseException as e:
        _remove_if_empty(args.out, created)
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            raise StorageError(args.out, e) from None
        raise
    print(f"Imported GPT-2 ({mc.n_layers} layers, {mc.n_heads} heads, width {mc.d_model}, context {mc.max_len}, "
          f"{mc.vocab_size:,} ids; {model.count_params(params):,} parameters) into {args.out}. Generate with:\n"
          f"  minitx generate --checkpoint {_quote(args.out)} --prompt \"Hello, I'm a language model,\"", file=out)
    return 0


def _remove_if_empty(path: str, created: bool) -> None:
    """Remove a folder this command created, if nothing is in it (a failed first write)."""
    if created:
        try:
            os.rmdir(path)
        except OSError:
            pass


def cmd_export_gpt2(args, out=None) -> int:
    """`minitx export-gpt2`: a run -> a Hugging Face GPT-2 directory."""
    import jax

    from minitx_fn import checkpoint, gpt2
    from minitx_fn.signals import StopSignals
    out = out or sys.stdout
    with StopSignals():               # SIGTERM and SIGHUP end it like Ctrl-C: one line, no half-written folder
        ckpt = checkpoint.load(args.run_dir)
        files = gpt2.export_files(jax.device_get(ckpt.state.params), ckpt.model_config, ckpt.tokenizer)
        try:
            gpt2.write_dir(args.out, files)
        except OSError as e:
            raise StorageError(args.out, e) from None
    print(f"Wrote {', '.join(sorted(files))} to {args.out} (step {int(ckpt.state.step)}). Load it with:\n"
          f"  transformers.GPT2LMHeadModel.from_pretrained({args.out!r})", file=out)
    if "tokenizer.json" not in files:
        print(f"The {ckpt.tokenizer.kind} tokenizer has no Hugging Face form, so no tokenizer.json: feed the model "
              f"ids from minitx_fn.checkpoint.load({args.run_dir!r}).tokenizer", file=out)
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "attention": cmd_attention, "plot": cmd_plot,
            "data": cmd_data, "prepare": cmd_prepare, "import-gpt2": cmd_import_gpt2,
            "export-gpt2": cmd_export_gpt2}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `minitx`: bad input prints one line and returns 2, a failed run 1,
    a signal 128 + its number; never a traceback."""
    from minitx_fn.signals import Interrupted

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except Error as e:
        print(f"minitx: error: {message(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as e:
        print(f"minitx: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except StorageError as e:                 # before training started: nothing was written
        print(f"minitx: error: {e.strerror}; nothing was changed", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted as e:
        print(f"minitx: {e}; nothing saved was lost", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("minitx: interrupted; nothing saved was lost", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:                # the reader of our output went away (`| head`): leave quietly
        sys.stdout = open(os.devnull, "w")
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
