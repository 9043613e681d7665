"""The `minitx` command: flags -> the library's values -> one call -> print.

    minitx train                                  the built-in corpus, under a minute on 2 CPU cores
    minitx train --data input.txt --preset shakespeare-baby
    minitx train --resume runs/input-001 --steps 4000
    minitx generate --checkpoint runs/input-001 --prompt "ROMEO:" --temperature 0.8 --top-k 20
    minitx attention --checkpoint runs/input-001 --prompt "ROMEO:" --out attention.png
    minitx plot runs/input-001
    minitx data shakespeare                       download Tiny Shakespeare (checked by SHA-256)
    minitx prepare --data big.txt --tokenizer bpe   tokenize a large text once (train does it too)

Each command is one library call: `job.train`, `generate.complete`,
`model.attention_maps`, `plot.plot_losses`, `data.download`, `corpus.prepare`,
`hf.import_run`, `hf.export_run`. Every input is checked before any work starts.
Errors print one line `minitx: error: ...` and exit with status 2 (bad input: flags,
data files, prompts, checkpoints, run directories) or 1 (the run failed: a
non-finite loss, a full or read-only disk); nothing saved before is lost. SIGINT
(Ctrl-C), SIGTERM and SIGHUP during training save a checkpoint at the current step
and exit 128 + the signal's number (130, 143, 129). The library's messages name
config fields; this module names flags, through one table (`FLAGS`).

JAX is imported inside the commands, not at the top: `minitx --help` and
`minitx plot` start without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import sys

from minitx_fn import defaults
from minitx_fn.config import ModelConfig, OptimizerConfig, TrainConfig
from minitx_fn.defaults import INT32_MAX, MAX_NEW_TOKENS, PRESETS, QUANTIZE_KINDS
from minitx_fn.errors import Error, RunFailed, StorageError

# The flags of `minitx train` that set a ModelConfig field, and that field; every
# TrainConfig flag is its field's name, and so is every flag of its nested optimizer;
# the LoRA flags are lora_ and the field of its nested LoraConfig.
MODEL_FLAGS = {"width": "d_model", "layers": "n_layers", "heads": "n_heads", "context": "max_len",
               "dropout": "dropout", "positions": "positions", "tie_embeddings": "tie_embeddings", "norm": "norm",
               "mlp": "mlp", "kv_heads": "n_kv_heads", "rope_theta": "rope_theta", "bias": "bias",
               "qkv_bias": "qkv_bias"}
TRAIN_FLAGS = ("steps", "batch_size", "seed", "eval_every", "save_every", "log_every", "eval_tokens", "grad_accum")
OPTIMIZER_FLAGS = {"lr": "lr", "min_lr": "min_lr", "warmup": "warmup", "decay_steps": "decay_steps",
                   "weight_decay": "weight_decay", "optimizer": "method", "muon_lr": "muon_lr", "momentum": "momentum"}
LORA_FLAGS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_targets": "targets"}
# The one table from the names the library's messages use to the flags a user types.
FLAGS = {**{field: "--" + flag.replace("_", "-") for flag, field in MODEL_FLAGS.items()},
         **{name: "--" + name.replace("_", "-") for name in TRAIN_FLAGS},
         **{field: "--" + flag.replace("_", "-") for flag, field in OPTIMIZER_FLAGS.items()},
         **{"lora." + field: "--" + flag.replace("_", "-") for flag, field in LORA_FLAGS.items()},
         "sample_tokens": "--max-new-tokens",
         **{name: "--" + name.replace("_", "-") for name in ("devices", "max_new_tokens", "temperature", "top_k",
                                                              "top_p", "vocab_size", "tokenizer", "data", "resume",
                                                              "batches", "preset", "init_from", "arch",
                                                              "draft_tokens", "cache_dir", "trust_code", "coordinator",
                                                              "num_processes", "process_id", "heartbeat_timeout",
                                                              "start_timeout")},
         "run_dir": "--out", "out_dir": "--out", "data_path": "--data"}
EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


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


_positive = _int_in(1, INT32_MAX)


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _eval_tokens(text: str) -> int | str:
    """A positive whole number of tokens, or 'all'."""
    return "all" if text == "all" else _positive(text)


def _nonempty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("is empty; give a folder")
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _defaults(flag: str) -> str:
    """'default V' of a train flag: the presets' values where they set it, else the config's own default."""
    if flag in MODEL_FLAGS:
        field, config, settings_of = MODEL_FLAGS[flag], ModelConfig, lambda s: s["model"]
    elif flag in OPTIMIZER_FLAGS:
        field, config, settings_of = OPTIMIZER_FLAGS[flag], OptimizerConfig, lambda s: s["train"].get("optimizer", {})
    else:
        field, config, settings_of = flag, TrainConfig, lambda s: s["train"]
    own = next(f.default for f in dataclasses.fields(config) if f.name == field)
    values = {preset: settings_of(settings).get(field, own) for preset, settings in PRESETS.items()}
    if len(set(values.values())) == 1:
        return f"default {next(iter(values.values()))}"
    return "default " + ", ".join(f"{v} ({p})" for p, v in values.items())


EXAMPLES = {
    "train": """  minitx train                                            the built-in corpus (preset hello)
  minitx train --data input.txt                           any UTF-8 text (preset shakespeare-baby)
  minitx train --data input.txt --steps 5000 --out runs/mine
  minitx train --resume runs/mine --steps 8000            continue a run
  minitx train --init-from runs/gpt2 --data input.txt --lr 1e-4 --steps 500   fine-tune""",
    "generate": """  minitx generate --checkpoint runs/hello-001 --prompt hello
  minitx generate --checkpoint runs/input-001 --prompt "ROMEO:" --temperature 0.8 --top-k 20
  minitx generate --checkpoint runs/input-001 --prompt "ROMEO:" --top-p 0.9 --stop "\\n\\n\"""",
    "attention": """  minitx attention --checkpoint runs/hello-001 --prompt "hello jax" --out attention.png
  minitx attention --checkpoint runs/input-001 --prompt "ROMEO:" --out attention.pdf""",
    "prepare": """  minitx prepare --data big.txt                            char tokenizer, cached under ~/.cache/minitx
  minitx prepare --data big.txt --tokenizer bpe --vocab-size 8192
  minitx train --data big.txt --tokenizer bpe --vocab-size 8192   reuses that preparation""",
    "data": """  minitx data shakespeare                      writes data/tinyshakespeare.txt (1,115,394 characters)
  minitx train --data data/tinyshakespeare.txt --preset shakespeare-baby""",
    "gpt2": """  minitx import-hf gpt2 --out runs/gpt2                 a folder with config.json, model.safetensors, tokenizer.json
  minitx import-hf Qwen2.5-0.5B --out runs/qwen         a Llama or Qwen2 folder (sharded safetensors too)
  minitx generate --checkpoint runs/gpt2 --prompt "The meaning of life is" --max-new-tokens 40
  minitx train --data input.txt --tokenizer bpe --arch gpt2 --out runs/mine   (or --arch llama)
  minitx export-hf runs/mine --out mine-hf             loads with transformers.AutoModelForCausalLM.from_pretrained""",
    "eval": """  minitx eval --checkpoint runs/input-001 --data other.txt
  minitx eval --checkpoint runs/gpt2 --data big.txt --eval-tokens 1000000 --json eval.json""",
    "upgrade": """  minitx upgrade runs/old-run               rewrites its checkpoint as format 9, then it loads as any run""",
    "plot": """  minitx plot runs/hello-001                   writes runs/hello-001/loss.png
  minitx plot runs/input-001 --log --out curves.svg""",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand; errors raise UsageError instead of exiting."""
    parser = _Parser(prog="minitx", description="A mini GPT-style language model in plain JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, help, examples=None):
        return sub.add_parser(name, help=help, epilog="examples:\n" + EXAMPLES[examples or name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    t = command("train", "train a model (on the built-in corpus unless --data is given)")
    _add_corpus_flags(t)
    t.add_argument("--eval-tokens", type=_eval_tokens, metavar="N|all", help=f"validate on a fixed sample of about "
                   f"N tokens, the same every time (default: all when the validation split has at most "
                   f"{defaults.DEFAULT_EVAL_TOKENS:,}, else {defaults.DEFAULT_EVAL_TOKENS:,}); only with --data")
    t.add_argument("--batches", choices=defaults.BATCH_SOURCES, default="auto",
                   help="where batches come from: the text held on the device, or gathered on the host from the "
                        "memory-mapped token file and prefetched (default auto: the device up to "
                        f"{defaults.DEVICE_RESIDENT_TOKENS:,} training tokens)")
    t.add_argument("--preset", choices=sorted(PRESETS), help=f"a set of defaults (default: {defaults.PRESET_BUILTIN} "
                   f"without --data, {defaults.PRESET_TEXT} with it; shakespeare-char is nanoGPT's GPU recipe); any "
                   f"flag below overrides it")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    t.add_argument("--init-from", metavar="RUN", help="a new run from RUN's parameters and tokenizer (trained, "
                   "imported or fine-tuned): fine-tuning, with a fresh optimiser and schedule")
    t.add_argument("--lora-rank", type=_int_in(0, INT32_MAX), metavar="R", help="with --init-from: train rank-R "
                   "adapters W + (alpha / R) A B on the frozen weights instead of every parameter (default 0: all)")
    t.add_argument("--lora-alpha", type=_float, help="the adapters' update is scaled by alpha / R (default: R)")
    t.add_argument("--lora-targets", choices=sorted(defaults.LORA_TARGETS), help="which matrices of every block get "
                   "adapters: the attention projections (default attn), the MLP's, or all")
    t.add_argument("--out", metavar="DIR", type=_nonempty, help="new run directory (default: runs/<corpus>-NNN, a "
                   "new one)")
    t.add_argument("--steps", type=_positive, help=f"train until this many steps in total ({_defaults('steps')})")
    t.add_argument("--batch-size", type=_positive, help=f"sequences per step, B ({_defaults('batch_size')})")
    t.add_argument("--grad-accum", type=_positive, metavar="K", help="run each step's batch as K micro-batches of "
                   "B / K and average their gradients: the same update in less memory (default 1)")
    t.add_argument("--context", type=_positive, help=f"context window T, the model's max_len "
                   f"({_defaults('context')})")
    t.add_argument("--layers", type=_positive, help=f"residual blocks, L ({_defaults('layers')})")
    t.add_argument("--heads", type=_positive, help=f"attention heads, H ({_defaults('heads')})")
    t.add_argument("--width", type=_positive, help=f"model width D, a multiple of --heads ({_defaults('width')})")
    t.add_argument("--dropout", type=_float, help=f"dropout rate in training, in [0, 1) ({_defaults('dropout')})")
    t.add_argument("--arch", choices=sorted(defaults.ARCHS), help="a consistent group of the choices below: "
                   + "; ".join(f"{name}: " + " ".join(flag_name(f, v) for f, v in fields.items())
                               for name, fields in defaults.ARCHS.items())
                   + " (default gpt); a single flag overrides one of them")
    t.add_argument("--positions", choices=defaults.POSITIONS, help=f"fixed sinusoidal positions, a learned "
                   f"table as in GPT-2, or rotary (q and k turned by position, as in Llama) "
                   f"({_defaults('positions')})")
    t.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, help="the output head reuses the "
                   "token embedding, with no bias, as in GPT-2 (default: a head of its own)")
    t.add_argument("--norm", choices=defaults.NORMS, help=f"LayerNorm, or RMSNorm as in Llama ({_defaults('norm')})")
    t.add_argument("--mlp", choices=defaults.MLPS, help=f"the feed-forward: GELU, or gated SwiGLU as in Llama, "
                   f"with 8 D / 3 hidden units by default ({_defaults('mlp')})")
    t.add_argument("--kv-heads", type=_positive, metavar="G", help="key/value heads, dividing --heads: grouped-query "
                   "attention, 1 = multi-query (default: --heads, multi-head)")
    t.add_argument("--rope-theta", type=_float, help=f"the rotary base of --positions rotary "
                   f"({_defaults('rope_theta')})")
    t.add_argument("--bias", action=argparse.BooleanOptionalAction, help="biases in the linear layers (default: "
                   "yes; --arch llama: none)")
    t.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, help="biases of the q, k, v projections "
                   "alone, as in Qwen2 (default: as --bias)")
    t.add_argument("--lr", type=_float, help=f"peak learning rate ({_defaults('lr')})")
    t.add_argument("--min-lr", type=_float, help="final learning rate of the cosine decay (default: --lr / 10)")
    t.add_argument("--warmup", type=_int_in(0, INT32_MAX), help=f"linear warm-up steps ({_defaults('warmup')}; "
                   f"at most a tenth of a shorter run)")
    t.add_argument("--decay-steps", type=_positive, help="length of the cosine schedule (default: --steps of the "
                   "first run, kept on resume)")
    t.add_argument("--weight-decay", type=_float, help=f"decoupled weight decay: AdamW's on matrices and the "
                   f"embedding, or with --optimizer muon on the blocks' matrices alone ({_defaults('weight_decay')})")
    t.add_argument("--optimizer", choices=defaults.OPTIMIZERS, help=f"adamw; or muon: the blocks' weight matrices "
                   f"step along their orthogonalised momentum at --muon-lr, the rest by Adam at --lr "
                   f"({_defaults('optimizer')})")
    t.add_argument("--muon-lr", type=_float, help=f"with --optimizer muon: the matrices' peak learning rate "
                   f"({_defaults('muon_lr')})")
    t.add_argument("--momentum", type=_float, help=f"with --optimizer muon: its momentum ({_defaults('momentum')})")
    t.add_argument("--seed", type=_int_in(0, defaults.SEED_MAX), help=f"seeds initialisation and batches "
                   f"({_defaults('seed')})")
    t.add_argument("--eval-every", type=_positive, help=f"validation loss every N steps and at the end "
                   f"({_defaults('eval_every')}); only with --data")
    t.add_argument("--save-every", type=_positive, help=f"checkpoint every N steps and at the end "
                   f"({_defaults('save_every')})")
    t.add_argument("--log-every", type=_positive, help=f"print and record the loss every N steps "
                   f"({_defaults('log_every')})")
    t.add_argument("--prompt", help="seed of the sample printed at the end (default: 'hello' if the text has it, "
                   "else its first character)")
    t.add_argument("--max-new-tokens", type=_int_in(1, MAX_NEW_TOKENS), default=defaults.SAMPLE_TOKENS,
                   help="length of that sample in tokens (default %(default)s)")
    t.add_argument("--devices", type=_positive, help="data-parallel over the first N devices (default: all)")
    t.add_argument("--fsdp", action="store_true", help="split parameters and optimiser state over the devices")
    t.add_argument("--coordinator", metavar="HOST:PORT",
                   help="multi-process run: address of process 0 (or MINITX_COORDINATOR)")
    t.add_argument("--num-processes", type=_positive,
                   help="multi-process run: how many processes (or MINITX_NUM_PROCESSES)")
    t.add_argument("--process-id", type=_int_in(0, INT32_MAX),
                   help="multi-process run: this process's index, 0 .. N - 1 (or MINITX_PROCESS_ID)")
    t.add_argument("--heartbeat-timeout", type=_int_in(1, defaults.HEARTBEAT_TIMEOUT_MAX),
                   help="multi-process run: seconds after which the others stop when a process dies "
                        f"(or MINITX_HEARTBEAT_TIMEOUT, read only in multi-process runs; default "
                        f"{defaults.HEARTBEAT_TIMEOUT_S})")
    t.add_argument("--start-timeout", type=_int_in(1, defaults.HEARTBEAT_TIMEOUT_MAX),
                   help="multi-process run: seconds to wait for every process to join before giving up "
                        f"(or MINITX_START_TIMEOUT; default {defaults.START_TIMEOUT_S})")

    g = command("generate", "continue a prompt with a trained model")
    g.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory (or its checkpoint/)")
    g.add_argument("--prompt", required=True, help="the text to continue (a char model: every character must be "
                   "in its vocabulary; byte and bpe models take any text)")
    g.add_argument("--max-new-tokens", type=_int_in(1, MAX_NEW_TOKENS), default=defaults.SAMPLE_TOKENS,
                   help="tokens to generate (characters for a char model; default %(default)s)")
    g.add_argument("--temperature", type=_float, help="0 is greedy (default: 0, or 1 when --top-k or --top-p "
                   "is given)")
    g.add_argument("--top-k", type=_positive, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=_float, help="nucleus sampling: the smallest set reaching this mass, in (0, 1]")
    g.add_argument("--seed", type=_int_in(0, defaults.SEED_MAX), default=0, help="seeds sampling (default "
                   "%(default)s)")
    g.add_argument("--stop", help="stop after generating this string")
    g.add_argument("--draft", metavar="DIR", help="speculative decoding: a smaller run of the same tokenizer and "
                   "context proposes tokens, the model checks them in one pass (greedy: the same text, faster when "
                   "the draft agrees often)")
    g.add_argument("--draft-tokens", type=_positive, help=f"with --draft: tokens it proposes per round (default "
                   f"{defaults.DRAFT_TOKENS})")
    g.add_argument("--quantize", choices=QUANTIZE_KINDS, help="decode from the run's weights quantized as it "
                   "loads: int8 (a scale per output row) or bfloat16; fewer bytes a token, faster at batch 1")

    v = command("eval", "the loss, perplexity and bits per byte of a text under a trained model")
    v.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory (or its checkpoint/)")
    v.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file, all of it (prepared once into the "
                   "cache with the run's tokenizer; larger than memory is fine)")
    v.add_argument("--eval-tokens", type=_eval_tokens, metavar="N|all", default="all", help="a fixed sample of about "
                   "N tokens (whole windows of the model's context) instead of all of them (default all)")
    v.add_argument("--json", metavar="FILE", help="also write {loss, perplexity, bits_per_byte, tokens} here")
    v.add_argument("--cache-dir", metavar="DIR", type=_nonempty, help="where prepared data is kept (as for train)")
    v.add_argument("--quantize", choices=QUANTIZE_KINDS, help="evaluate the run's weights quantized (int8 or "
                   "bfloat16) and compare them with its float weights on the same windows: loss rise, KL per token, "
                   "top-1 and greedy agreement")

    a = command("attention", "draw the attention maps of every layer and head for a prompt")
    a.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory (or its checkpoint/)")
    a.add_argument("--prompt", required=True, help="text of at most the model's context in tokens (known "
                   "characters for a char model)")
    a.add_argument("--out", required=True, metavar="FILE", help="picture to write: .png, .pdf, .svg or .jpg")

    r = command("prepare", "tokenize a text file once, streamed, into the cache that train reads")
    _add_corpus_flags(r, required=True)

    d = command("data", "download a dataset (Tiny Shakespeare) and check its SHA-256")
    d.add_argument("name", choices=["shakespeare"], help="the dataset")
    d.add_argument("--out", metavar="FILE", default=os.path.join("data", "tinyshakespeare.txt"),
                   help="where to put it (default %(default)s)")
    d.add_argument("--url", help=argparse.SUPPRESS)          # another source of the same file (tests, mirrors)

    for name, what in (("import-hf", "a Hugging Face GPT-2, Llama or Qwen2 folder -> a run that generate uses"),
                       ("import-gpt2", "the same as import-hf (its first name)")):
        i = command(name, what, "gpt2")
        i.add_argument("hf_dir", metavar="HF_DIR", help="config.json, model.safetensors (or its shards and "
                       "model.safetensors.index.json), and tokenizer.json (GPT-2: or vocab.json + merges.txt)")
        i.add_argument("--out", required=True, metavar="RUN_DIR", type=_nonempty, help="new run directory to write")
    exports = []
    for name, what in (("export-hf", "a run of GPT-2's or Llama's shape -> a Hugging Face GPT-2, Llama or Qwen2 "
                                     "folder"), ("export-gpt2", "the same as export-hf (its first name)")):
        e = command(name, what, "gpt2")
        exports.append(e)
        e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its checkpoint/)")
        e.add_argument("--out", required=True, metavar="HF_DIR", type=_nonempty, help="new folder to write (or an "
                       "empty one)")

    u = command("upgrade", "rewrite a run saved in an older checkpoint format (2 to 8) as the current one")
    u.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its checkpoint/)")

    for loading in (t, g, v, a, *exports):
        loading.add_argument("--trust-code", action="store_true", help="load a run whose model is code of its own "
                            "(its meta.json names the module and class), importing that code: only for runs you trust")

    p = command("plot", "draw the loss curves of a run from its metrics.jsonl")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE", help="picture to write (default RUN_DIR/loss.png)")
    p.add_argument("--log", action="store_true", help="logarithmic loss axis")
    return parser


def _add_corpus_flags(parser, required: bool = False) -> None:
    parser.add_argument("--data", metavar="FILE", required=required,
                        help="UTF-8 text file; 90%% trains, the last 10%% validates"
                             + ("" if required else " (default: the built-in corpus)"))
    parser.add_argument("--tokenizer", choices=defaults.TOKENIZERS, help="char: each character is a token "
                        "(default); byte: UTF-8 bytes, 256 ids, any text; bpe: byte-level BPE learned from the "
                        "training split (needs the bpe extra)")
    parser.add_argument("--vocab-size", type=_int_in(defaults.MIN_BPE_VOCAB, defaults.MAX_BPE_VOCAB),
                        help=f"bpe only: ids in the vocabulary (default {defaults.DEFAULT_BPE_VOCAB})")
    parser.add_argument("--cache-dir", metavar="DIR", type=_nonempty, help="where prepared data is kept (default: "
                        f"${defaults.CACHE_ENV}, else $XDG_CACHE_HOME/minitx, else ~/.cache/minitx; not saved with a "
                        f"run: give it again with --resume)")


# ----------------------------------------------------------------------------- commands


def cmd_train(args, out=None) -> int:
    """`minitx train`: a new run, or --resume of a saved one (`job.train`); returns the exit status.
    The multi-process flags (or, once a coordinator is known, their environment variables
    MINITX_COORDINATOR, ...) join the processes first (`distributed.join`)."""
    import jax

    from minitx_fn import distributed, job, signals
    distributed.join(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout,
                     args.start_timeout, log=out)
    if jax.process_count() > 1 and signals.active():
        signals.active().forward_sigterm()                # SIGTERM is now JAX's preemption notice
    out = (out or sys.stdout) if jax.process_index() == 0 else open(os.devnull, "w")
    result = job.train(to_job(args), log=out)
    if result.stopped_by is not None:                    # every process of a run leaves with this status
        print(f"\nStopped by {signal.Signals(result.stopped_by).name} at step {int(result.state.step)}; checkpoint "
              f"saved. Continue with: minitx train --resume {result.run_dir}", file=out)
        return 128 + result.stopped_by
    if result.sample is not None:
        print("Generated text:", file=out)
        print(result.prompt + result.sample, file=out)
        print("\n" + next_steps(result.run_dir, result.prompt, result.picture, trust_code=args.trust_code,
                                maps=getattr(result.model, "has_attention_maps", False)), file=out)
    return 0


def to_job(args):
    """The `job.Job` the flags of `minitx train` describe (`job.make` checks them)."""
    from minitx_fn import job
    model = {**defaults.ARCHS.get(args.arch, {}),
             **{field: getattr(args, flag) for flag, field in MODEL_FLAGS.items() if getattr(args, flag) is not None}}
    training = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    optimizer = {field: getattr(args, flag) for flag, field in OPTIMIZER_FLAGS.items() if getattr(args, flag) is not None}
    lora = {field: getattr(args, flag) for flag, field in LORA_FLAGS.items() if getattr(args, flag) is not None}
    if lora.get("rank") == 0:                             # --lora-rank 0: every parameter trains
        del lora["rank"]
    training.update({"optimizer": optimizer} if optimizer else {}, **({"lora": lora} if lora else {}))
    made = job.make(args.data, model=model, training=training, preset=args.preset, tokenizer=args.tokenizer,
                    vocab_size=args.vocab_size, cache_dir=args.cache_dir, run_dir=args.out, resume=args.resume,
                    init_from=args.init_from, trust_code=args.trust_code, batches=args.batches, devices=args.devices,
                    fsdp=args.fsdp, prompt=args.prompt, sample_tokens=args.max_new_tokens)
    given = [flag for flag in ("muon_lr", "momentum") if getattr(args, flag) is not None]
    if given and made.training.optimizer.method != "muon":   # they would be recorded and do nothing
        raise UsageError(f"--{given[0].replace('_', '-')} is for --optimizer muon; this run's optimizer is "
                         f"{made.training.optimizer.method}")
    return made


def next_steps(run_dir: str, prompt: str, picture: str | None, *, trust_code: bool = False, maps: bool = True) -> str:
    """The commands that use a run just trained, to copy into a POSIX shell: every path
    and prompt shell-quoted; --trust-code where its model is code of its own; the
    attention picture only for a model that has the built-in attention maps.

    Example:
        >>> print(next_steps("runs/my run", "hi", None, trust_code=True, maps=False))
        Next:
          minitx generate --checkpoint 'runs/my run' --prompt hi --temperature 0.8 --trust-code
          pip install -e ".[plot]"    then: minitx plot 'runs/my run'
          minitx train --resume 'runs/my run' --steps N --trust-code    to train further
    """
    run, quoted, attention_png = (shlex.quote(a) for a in (run_dir, prompt, os.path.join(run_dir, "attention.png")))
    trust = " --trust-code" * trust_code
    lines = ["Next:", f"  minitx generate --checkpoint {run} --prompt {quoted} --temperature 0.8{trust}"]
    if maps:
        lines.append(f"  minitx attention --checkpoint {run} --prompt {quoted} --out {attention_png}{trust}")
    lines.append("  pip install -e \".[plot]\"    then: minitx plot " + run if picture is None else
                 f"  minitx plot {run} --log")
    lines.append(f"  minitx train --resume {run} --steps N{trust}    to train further")
    return "\n".join(lines)


def cmd_generate(args, out=None) -> int:
    """`minitx generate`: continue a prompt from a checkpoint (`generate.complete`)."""
    import jax

    from minitx_fn import checkpoint, generate, signals
    if args.draft_tokens is not None and args.draft is None:
        raise UsageError("--draft-tokens needs --draft RUN, the draft model that proposes them")
    loaded = checkpoint.load_model(args.checkpoint, trust_code=args.trust_code)
    if args.quantize is not None:
        from minitx_fn import quantize
        loaded = quantize.quantized(loaded, args.quantize)
    try:
        draft = None if args.draft is None else checkpoint.load_model(args.draft, trust_code=args.trust_code)
    except Error as e:
        raise type(e)(f"--draft: {message(e)}") from None
    stops = signals.active()
    with stops.exit_at_once() if stops else contextlib.nullcontext():   # reads only: a signal ends it at once
        text = generate.complete(loaded, args.prompt, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 key=jax.random.key(args.seed), stop=args.stop, draft=draft,
                                 draft_tokens=args.draft_tokens)
    print(args.prompt + text, file=out or sys.stdout)
    return 0


def cmd_eval(args, out=None) -> int:
    """`minitx eval`: a text's loss under a run (`job.evaluate`), printed and, with --json, written."""
    import json

    from minitx_fn import job, runs
    out = out or sys.stdout
    if args.json is not None:                             # before the work, not after it
        folder = os.path.dirname(os.path.abspath(args.json))
        if not args.json or os.path.isdir(args.json) or not os.path.isdir(folder):
            raise UsageError(f"--json {args.json!r}: give a file name in an existing folder")
        if not args.json.lower().endswith(".json"):       # never a text, an npz or a picture by mistake
            raise UsageError(f"--json {args.json!r}: give a file name ending in .json")
        if runs.managing_run(args.json) is not None:      # wherever it really goes: links followed
            raise UsageError(f"--json {args.json!r} {runs.held_by(runs.managing_run(args.json))}; write it elsewhere")
        if os.path.exists(args.json) and os.path.exists(args.data) and os.path.samefile(args.json, args.data):
            raise UsageError(f"--json {args.json!r} is the --data file; write it elsewhere")
    result = job.evaluate(args.checkpoint, args.data, eval_tokens=args.eval_tokens, cache_dir=args.cache_dir,
                          trust_code=args.trust_code, quantize=args.quantize, log=out)
    print(f"Loss {result.loss:.4f} nats per token, perplexity {result.perplexity:.3f}, "
          f"{result.bits_per_byte:.4f} bits per byte, over {result.tokens:,} tokens of {args.data}", file=out)
    if result.quantized is not None:
        q = result.quantized
        print(f"Quantized {q['to']}: weights {q['weight_bytes'] / 1e6:,.1f} MB (float {q['float_weight_bytes'] / 1e6:,.1f}"
              f" MB); loss {100 * q['loss_rise']:+.3f}% against the float weights' {q['float_loss']:.4f}, "
              f"KL {q['kl']:.2e} nats per token, top-1 agreement {100 * q['top1_agreement']:.2f}%, greedy "
              f"{q['greedy_equal']} of {q['greedy_tokens']} tokens equal ({q['greedy_equal_before_difference']} "
              f"before the first difference)", file=out)
    if args.json is not None:
        try:
            runs.write_whole(args.json, json.dumps(result._asdict(), indent=1) + "\n")
        except OSError as e:
            raise RunFailed(f"cannot write {args.json!r}: {e.strerror or e}") from None
    return 0


def cmd_attention(args, out=None) -> int:
    """`minitx attention`: a picture of the attention maps (L rows, H columns) for a prompt."""
    from minitx_fn import checkpoint, plot
    plot.check_picture_path(args.out)
    plot.require_matplotlib()
    loaded = checkpoint.load_model(args.checkpoint, trust_code=args.trust_code)
    try:
        plot.plot_model_attention(loaded, args.prompt, args.out)
    except OSError as e:
        raise RunFailed(f"cannot write {args.out!r}: {e.strerror or e}") from None
    print(f"Attention maps ({loaded.model.n_layers} layers x {loaded.model.n_heads} heads): {args.out}",
          file=out or sys.stdout)
    return 0


def cmd_plot(args, out=None) -> int:
    """`minitx plot`: the loss curves of a run from its metrics.jsonl (`plot.plot_run`)."""
    from minitx_fn import plot
    out = out or sys.stdout
    try:
        drawn = plot.plot_run(args.run_dir, args.out, log=args.log, out=out)
    except OSError as e:
        raise RunFailed(f"cannot write the picture: {e.strerror or e}") from None
    print(f"Loss curves: {drawn}", file=out)
    return 0


def cmd_data(args, out=None) -> int:
    """`minitx data shakespeare`: download Tiny Shakespeare and check its SHA-256."""
    from minitx_fn import data
    try:
        fetched = data.download(args.url or data.SHAKESPEARE_URL, args.out, data.SHAKESPEARE_SHA256)
    except data.DownloadError as e:
        raise RunFailed(str(e)) from None
    print(f"{'Downloaded' if fetched else 'Already here:'} {args.out} (SHA-256 checked). Train on it with:\n"
          f"  minitx train --data {args.out} --preset shakespeare-baby", file=out or sys.stdout)
    return 0


def cmd_prepare(args, out=None) -> int:
    """`minitx prepare`: tokenize a text file into the cache `minitx train --data` reads (`corpus.prepare`)."""
    from minitx_fn import corpus
    out = out or sys.stdout
    corpus.prepare(args.data, args.tokenizer or "char", args.vocab_size, cache_dir=args.cache_dir, out=out)
    print(f"Train on it with:\n  minitx train --data {shlex.quote(args.data)}"
          + (f" --tokenizer {args.tokenizer}" if args.tokenizer else "")
          + (f" --vocab-size {args.vocab_size}" if args.vocab_size else "")
          + (f" --cache-dir {shlex.quote(args.cache_dir)}" if args.cache_dir else ""), file=out)
    return 0


def cmd_import_hf(args, out=None) -> int:
    """`minitx import-hf` (or import-gpt2): a Hugging Face directory -> a run (`hf.import_run`)."""
    from minitx_fn import hf
    out = out or sys.stdout
    mc, n_params = hf.import_run(args.hf_dir, args.out, log=out)
    kind = hf.families.NAMES[hf.family(mc)]
    print(f"Imported {kind} ({mc.n_layers} layers, {mc.n_heads} heads, width {mc.d_model}, context {mc.max_len}, "
          f"{mc.vocab_size:,} ids; {n_params:,} parameters) into {args.out}. Generate with:\n"
          f"  minitx generate --checkpoint {shlex.quote(args.out)} --prompt \"Hello, I'm a language model,\"", file=out)
    return 0


def cmd_export_hf(args, out=None) -> int:
    """`minitx export-hf` (or export-gpt2): a run -> a Hugging Face directory (`hf.export_run`)."""
    from minitx_fn import hf
    out = out or sys.stdout
    written, loaded = hf.export_run(args.run_dir, args.out, trust_code=args.trust_code)
    print(f"Wrote {', '.join(written)} to {args.out} (step {loaded.meta['step']}). Load it with:\n"
          f"  transformers.AutoModelForCausalLM.from_pretrained({args.out!r})", file=out)
    if "tokenizer.json" not in written:
        print(f"The {loaded.tokenizer.kind} tokenizer has no Hugging Face form, so no tokenizer.json: feed the model "
              f"ids from minitx_fn.checkpoint.load_model({args.run_dir!r}).tokenizer", file=out)
    return 0


def cmd_upgrade(args, out=None) -> int:
    """`minitx upgrade`: rewrite a run of an older checkpoint format as the current one (`checkpoint.upgrade`)."""
    from minitx_fn import checkpoint
    version, path = checkpoint.upgrade(args.run_dir)
    print(f"Upgraded {path} from format {version} to format {checkpoint.FORMAT_VERSION}", file=out or sys.stdout)
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "attention": cmd_attention, "plot": cmd_plot,
            "data": cmd_data, "prepare": cmd_prepare, "import-hf": cmd_import_hf,
            "import-gpt2": cmd_import_hf, "export-hf": cmd_export_hf, "export-gpt2": cmd_export_hf,
            "upgrade": cmd_upgrade}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `minitx`: bad input prints one line and returns 2, a failed run 1,
    a signal 128 + its number; never a traceback. SIGINT, SIGTERM and SIGHUP are
    recorded from the first moment (before JAX is imported) and acted on at safe points."""
    from minitx_fn import signals

    try:
        return _main(argv, signals)
    finally:
        if argv is None:
            # The status is decided. Python's finalization puts the default action back on
            # the handlers it installed, so a stop signal in the process's last moments would
            # end a finished command with no word (killed, exit -N): from here on they are
            # ignored, and the status stands.
            for signum in signals.STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)


def _main(argv: list[str] | None, signals) -> int:
    try:
        # Called as the program (argv None): the handlers stay until the process ends, so a
        # signal while the interpreter shuts down cannot change a finished command's status.
        with signals.StopSignals(restore=argv is not None):
            args = build_parser().parse_args(argv)
            if getattr(args, "trust_code", False) and not {"", os.getcwd()} & set(sys.path):
                sys.path.insert(0, os.getcwd())     # as `python -m` does: a run's own module beside it imports
            signals.check()
            return COMMANDS[args.command](args)
    except RunFailed as e:
        print(f"minitx: error: {message(e)}", file=sys.stderr)
        return EXIT_FAILED
    except Error as e:
        print(f"minitx: error: {message(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StorageError as e:                 # before training started: nothing was written
        print(f"minitx: error: {e.strerror}; nothing was changed", file=sys.stderr)
        return EXIT_FAILED
    except signals.Interrupted as e:
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
