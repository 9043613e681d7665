"""The whole training job as one function of values: what `minitx train` runs.

    result = job.train("input.txt", model={"d_model": 128, "n_layers": 4}, training={"steps": 2000})
    result.run_dir, result.records, result.sample          # the run directory, its metrics, a sample
    generate.complete(result, "ROMEO:")                     # continue a text with the trained model

`train` = `run(plan(...))`. `plan` checks every input and prepares the data before
anything of a run is written: the tokenizer and token ids (a text file prepared once
into the cache, a text or ids in memory, or the built-in corpus), the model and
training configs (a preset's values, overridden by what is given), a new run
directory or the run to resume, the validation sample, where batches come from, and
memory. `run` trains as planned into the run directory that `minitx generate`,
`plot` and `--resume` read: it holds the run's lock, saves checkpoints, appends
metrics.jsonl, draws loss.png (with matplotlib), and stops cleanly on SIGINT,
SIGTERM or SIGHUP (a checkpoint at the current step; `Result.stopped_by`). It uses
every device JAX sees (data-parallel; `devices`, `fsdp`), and several processes once
`distributed.initialize` has joined them.

Errors: bad input is an `errors.Error` naming the setting (the CLI renders it as a
flag); a run that fails (a non-finite loss, a full disk) is `errors.RunFailed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn import checkpoint, corpus, data, defaults, distributed, generate, lora, loop, memory, model, runs
from minitx_fn import train as trainer          # the module; `train` below is the whole job
from minitx_fn.config import ModelConfig, TrainConfig
from minitx_fn.errors import ConfigError, DataError, Error, RunDirError, RunFailed, StorageError
from minitx_fn.model import with_context
from minitx_fn import signals
from minitx_fn.signals import StopSignals
from minitx_fn.tokenizer import Tokenizer, UnknownCharactersError

# What a resumed run may change; every other setting is the saved run's.
RESUMABLE = ("steps", "eval_every", "save_every", "log_every", "eval_tokens", "grad_accum")
RUNS_ROOT = "runs"                     # new runs go to RUNS_ROOT/<corpus name>-NNN unless run_dir says otherwise


class Plan(NamedTuple):
    """Everything a run will do, checked before anything of it is written."""

    run_dir: str
    resuming: bool
    model_config: ModelConfig
    train_config: TrainConfig
    corpus: corpus.Corpus           # the tokenizer, the ids, their source
    train_ids: np.ndarray           # (N,) token ids to sample batches from (maybe memory-mapped)
    val_windows: data.Windows | None  # (W, T + 1) validation windows, None without a held-out split
    batches: str                    # "device" (the ids held there) or "memmap" (gathered on the host)
    state: trainer.TrainState | None  # the saved state when resuming
    prompt: str | None              # the seed of the final sample, None for none
    sample_tokens: int
    devices: int | None             # data-parallel over the first N devices (None: all of them)
    fsdp: bool                      # parameters and optimiser state split over the devices
    origin: dict | None = None      # where a run started from another's parameters came from (checkpoint.save)
    base: dict | None = None        # a LoRA run's frozen parameters, which its adapters (state.params) apply to


class Result(NamedTuple):
    """What a run gives back. `params`, `config` and `tokenizer` make it a model that
    `generate.complete(result, prompt)` continues; `state` is the final TrainState
    (for a LoRA run its params are the adapters and `base` the frozen weights, and
    `params` merges them), `records` the metrics, `sample` the text generated at the end."""

    run_dir: str
    state: trainer.TrainState         # the final state (gathered to every process in a multi-process run)
    config: ModelConfig
    train_config: TrainConfig
    tokenizer: Tokenizer
    records: list[dict]             # metrics.jsonl as it stands (empty in processes other than 0)
    stopped_by: int | None          # the signal that stopped the run (after its checkpoint), or None
    elapsed: float                  # seconds of training
    prompt: str | None              # the seed of the final sample
    sample: str | None              # the text generated after the prompt at the end (process 0)
    picture: str | None             # loss.png, when matplotlib drew it
    base: dict | None = None        # a LoRA run's frozen parameters (state.params are its adapters)

    @property
    def params(self) -> dict:
        """The model's parameters: a LoRA run's adapters merged into its base."""
        if self.base is None:
            return self.state.params
        return lora.merge(self.base, self.state.params, scale=self.train_config.lora.scale)


def train(data_path: str | os.PathLike | corpus.Corpus | None = None, *, text: str | None = None,
          log=None, **settings) -> Result:
    """Plan and run a training job, with SIGINT, SIGTERM and SIGHUP as requests to save
    and stop from the first moment: `run(plan(...))`. The settings are `plan`'s: model,
    training, preset, tokenizer, vocab_size, cache_dir, run_dir, resume, init_from,
    batches, devices, fsdp, prompt, sample_tokens (`help(job.plan)` says what each does).

    Example:
        >>> import io, tempfile
        >>> r = train(model={"d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 8},
        ...           training={"steps": 20, "log_every": 10, "batch_size": 4}, run_dir=tempfile.mkdtemp() + "/r",
        ...           sample_tokens=5, log=io.StringIO())
        >>> int(r.state.step), [rec["step"] for rec in r.records], len(r.sample)
        (20, [10, 20], 5)
    """
    log = log or sys.stdout
    outer = signals.active()                     # the command line's, installed before JAX was imported
    with contextlib.nullcontext(outer) if outer else StopSignals(forward_to_sigterm=jax.process_count() > 1) as stops:
        return run(plan(data_path, text=text, log=log, **settings), log=log, stops=stops)


def plan(data_path: str | os.PathLike | corpus.Corpus | None = None, *, text: str | None = None,
         model: ModelConfig | dict | None = None, training: TrainConfig | dict | None = None,
         preset: str | None = None, tokenizer: str | None = None, vocab_size: int | None = None,
         cache_dir: str | None = None, run_dir: str | None = None, resume: str | None = None,
         batches: str = "auto", devices: int | None = None, fsdp: bool = False, prompt: str | None = None,
         sample_tokens: int = defaults.SAMPLE_TOKENS, init_from: str | None = None, log=None) -> Plan:
    """Check every setting and prepare the data; nothing of a run is written yet.

    Data (one of): `data_path`, a UTF-8 text file (prepared once into the cache,
    `corpus.prepare`; `tokenizer` "char", "byte" or "bpe", `vocab_size` for bpe,
    `cache_dir`), or a `corpus.Corpus` (`Corpus.from_ids` for ids of one's own); `text`,
    a string; neither: the built-in corpus. A text's first 90% trains, the rest
    validates (the built-in corpus has no held-out part).

    Settings: `model`, a dict of ModelConfig fields (vocab_size comes from the
    tokenizer) or a ModelConfig; `training`, a dict of TrainConfig fields or a
    TrainConfig (eval_tokens "all" or None: the whole validation split; unset: all of
    it up to defaults.DEFAULT_EVAL_TOKENS). A dict overrides the `preset`'s values
    (defaults.PRESETS; default "hello" on the built-in corpus, "shakespeare-baby" on a
    text), and an unset warm-up is at most a tenth of the run.

    Run: `run_dir` for a new run (default runs/<corpus>-NNN, never one that holds a
    run), or `resume` a saved run (the same data, wherever it lies now; `training` may
    change only RESUMABLE fields, `model` must agree; `steps` is the total to reach,
    and the learning-rate schedule, decay_steps included, stays the first run's). `batches` "auto", "device" or
    "memmap"; `devices`, `fsdp` (distributed.py). The final sample: `sample_tokens`
    tokens after `prompt` (default: "hello" if the text's start holds it, else its
    first character), checked before training; 0 for none. `log`: where progress
    lines go (default sys.stdout; io.StringIO() to keep them quiet).

    Fine-tuning: `init_from` a run (trained, imported or itself fine-tuned) starts a new
    run at step 0 from its parameters and with its tokenizer (the data is encoded with
    it): a fresh optimiser and schedule, this run's own seed, data and cadence. Its
    model is the source's; `model` may only lower max_len (learned positions keep their
    first rows) and set dropout. The source's path and the SHA-256 of its parameters are
    recorded (`origin`), and the new run resumes like any other. With `training`'s
    lora_rank > 0 it trains LoRA adapters on those parameters, frozen (`lora.py`): the
    checkpoint holds the adapters, the source is their base, and `Result.params` (like
    `checkpoint.load_model`) is the merged model.
    """
    log = log or sys.stdout
    if data_path is not None and text is not None:
        raise DataError("give the data as a path or a Corpus, or as text=, not both")
    if data_path is not None and not isinstance(data_path, corpus.Corpus):
        path = os.fspath(data_path) if isinstance(data_path, (str, os.PathLike)) else None
        if not isinstance(path, str):
            raise DataError(f"the data must be a path (a str) or a corpus.Corpus, not {type(data_path).__name__}")
        data_path = path
    if run_dir is not None:
        run_dir = os.fspath(run_dir) if isinstance(run_dir, (str, os.PathLike)) else None
        if not isinstance(run_dir, str) or not run_dir:
            raise RunDirError("{run_dir} is empty or not a path; give a folder", run_dir=("run_dir", "''"))
    if devices is not None and not (isinstance(devices, int) and not isinstance(devices, bool)):
        raise ConfigError("{devices} must be a whole number (how many devices)", devices=("devices", devices))
    if batches not in defaults.BATCH_SOURCES:
        raise ConfigError(f"{{batches}} is invalid: choose one of {list(defaults.BATCH_SOURCES)}",
                          batches=("batches", batches))
    if not (isinstance(sample_tokens, int) and not isinstance(sample_tokens, bool)
            and 0 <= sample_tokens <= defaults.MAX_NEW_TOKENS):
        raise ConfigError(f"{{n}} must be a whole number in [0, {defaults.MAX_NEW_TOKENS:,}]",
                          n=("max_new_tokens", sample_tokens))
    if resume is not None:
        if init_from is not None:
            raise ConfigError("{resume} continues a run and {init_from} starts a new one from another's parameters; "
                              "give one of them", resume=("resume", resume), init_from=("init_from", init_from))
        return _plan_resume(resume, data_path, text, model, training, preset, tokenizer, vocab_size, cache_dir,
                            run_dir, batches, devices, fsdp, prompt, sample_tokens, log)
    if run_dir is not None:
        runs.check_new_run_dir(run_dir)                               # before preparing a large text
    start = None
    if init_from is not None:
        start = checkpoint.load_model(init_from)
        if tokenizer is not None or vocab_size is not None:
            raise ConfigError("a run started from another keeps its tokenizer; drop {t}",
                              t=("tokenizer", tokenizer or "bpe"))
        model = _fine_tuned_model(start.config, model)
    # Every setting is checked before a large text is prepared. A new model's
    # vocab_size comes from the tokenizer made there: 1 stands in for it here.
    held_out = text is not None or getattr(data_path, "source", data_path) not in (None, corpus.BUILTIN_SOURCE)
    for name in ("eval_every", "eval_tokens"):           # the built-in cycle has no validation split
        if not held_out and isinstance(training, dict) and name in training:
            raise ConfigError("{setting} needs data with a held-out part; the built-in corpus has none: give {data}",
                              setting=(name, training[name]), data=("data_path", "FILE"))
    mc, tc = configs(None if isinstance(model, ModelConfig) else model, training, preset, vocab_size=1,
                     has_data=held_out)
    _check_settings(model if isinstance(model, ModelConfig) else mc, tc, devices, init_from)
    source = _corpus(data_path, text, tokenizer, vocab_size, cache_dir, log,
                     None if start is None else start.tokenizer)
    # The model's vocabulary: the tokenizer's, or the run it starts from (whose table may be padded past it).
    vocab_size = source.tokenizer.vocab_size if start is None else start.config.vocab_size
    mc, tc = configs(model, training, preset, vocab_size=vocab_size, has_data=held_out)
    run_dir = run_dir or runs.new_run_name(RUNS_ROOT, source.name)
    runs.check_new_run_dir(run_dir)
    default_eval = training is None or (isinstance(training, dict) and "eval_tokens" not in training)
    state, origin, base = None, None, None
    if start is not None:
        params = with_context(start.params, mc.max_len)
        if tc.lora is None:
            state = trainer.new_state(params, trainer.make_optimizer(tc.optimizer))
        else:
            state, base = trainer.lora_state(trainer.keys(tc.seed).init, params, tc.optimizer, tc.lora), params
        origin = {"init_from": {"path": os.path.abspath(init_from), "sha256": start.meta["files"]["params.npz"]["sha256"]}}
    return _checked(run_dir, False, mc, tc, source, state, batches, devices, fsdp, prompt, sample_tokens,
                    default_eval=default_eval)._replace(origin=origin, base=base)


def _check_settings(mc: ModelConfig, tc: TrainConfig, devices, init_from) -> None:
    """The checks of a new run that need no data (made before its text is prepared):
    adapters need a base run that no one is training, and a rank at most the width
    they adapt (a rank above it is no longer low); the batch must split over the devices."""
    if tc.lora is not None:
        if init_from is None:
            raise ConfigError("{rank} trains adapters on the frozen parameters of another run; give that run with "
                              "{init_from}", rank=("lora_rank", tc.lora_rank), init_from=("init_from", "RUN"))
        if tc.lora_rank > mc.d_model:
            raise ConfigError("{rank} exceeds the model's width {d}: a low-rank adapter's rank is at most the width",
                              rank=("lora_rank", tc.lora_rank), d=("d_model", mc.d_model))
        training = runs.Lock(init_from).live_holder()
        if training:            # its next save would change the base these adapters are trained on
            raise RunDirError(f"{os.fspath(init_from)!r} is being trained ({training}); a LoRA run needs its base "
                              f"to stay as it is: wait for that run to finish, or copy it and start from the copy")
    _check_devices(tc, devices)


def _check_devices(tc: TrainConfig, devices) -> None:
    """The batch is split over the devices: they must exist, and divide it."""
    if devices or jax.device_count() > 1:
        distributed.check_batch(tc.batch_size, distributed.make_mesh(devices))


def _fine_tuned_model(source: ModelConfig, model: ModelConfig | dict | None) -> ModelConfig:
    """The model of a run started from `source`: the source's, with at most a shorter
    context and another dropout rate; any other difference is one error naming them."""
    given = model.to_dict() if isinstance(model, ModelConfig) else dict(model or {})
    _known(given, ModelConfig, "the model")
    allowed = {"dropout"} | ({"max_len"} if given.get("max_len", source.max_len) <= source.max_len else set())
    conflicts = [(f, v, getattr(source, f)) for f, v in given.items()
                 if f not in allowed and f != "vocab_size" and v != getattr(source, f)]
    if conflicts:
        parts, mentions = _differences(conflicts, "its own")
        raise ConfigError(f"a run started from another has that run's model, but these differ: {', '.join(parts)}; "
                          f"drop them (only a shorter context and dropout may change)", **mentions)
    return source.replace(**{f: v for f, v in given.items() if f in allowed})


def _differences(conflicts: list[tuple[str, Any, Any]], kept: str) -> tuple[list[str], dict]:
    """(field, given, kept value) triples -> message parts "{gI} (KEPT: {sI})" and their
    mentions, so the CLI renders each as its flag."""
    mentions = {}
    for i, (field, value, had) in enumerate(conflicts):
        mentions[f"g{i}"], mentions[f"s{i}"] = (field, value), (field, had)
    return [f"{{g{i}}} ({kept}: {{s{i}}})" for i in range(len(conflicts))], mentions


def configs(model: ModelConfig | dict | None, training: TrainConfig | dict | None, preset: str | None, *,
            vocab_size: int, has_data: bool) -> tuple[ModelConfig, TrainConfig]:
    """The configs of a new run: a preset's values overridden by the dicts given (or the
    configs given, as they are). An unset warm-up is at most a tenth of the schedule.

    Example:
        >>> mc, tc = configs({"d_model": 32}, {"steps": 100}, None, vocab_size=13, has_data=False)
        >>> mc.d_model, mc.n_layers, tc.steps, tc.warmup, tc.lr      # the rest from the preset "hello"
        (32, 2, 100, 10, 0.003)
    """
    values = defaults.preset(preset, has_data=has_data)
    for name, value, cls in (("model", model, ModelConfig), ("training", training, TrainConfig)):
        if value is not None and not isinstance(value, (dict, cls)):
            raise ConfigError(f"{{{name}}} must be a dict of {cls.__name__} fields or a {cls.__name__}, not "
                              f"{type(value).__name__}", **{name: (name, value)})
    if isinstance(model, ModelConfig):
        if model.vocab_size != vocab_size:
            raise ConfigError("{v} differs from the tokenizer's {t} ids; give the model as a dict of fields, and "
                              "vocab_size comes from the tokenizer", v=("vocab_size", model.vocab_size),
                              t=("vocab_size", vocab_size))
        mc = model
    else:
        given = dict(model or {})
        if "vocab_size" in given:
            raise ConfigError("{v} comes from the tokenizer; leave it out of the model's fields",
                              v=("vocab_size", given["vocab_size"]))
        _known(given, ModelConfig, "the model")
        mc = ModelConfig(vocab_size=vocab_size, **{**values["model"], **given})
    if isinstance(training, TrainConfig):
        return mc, training
    given = dict(training or {})
    _known(given, TrainConfig, "the training")
    settings = {**values["train"], **given}
    if settings.get("eval_tokens") == "all":
        settings["eval_tokens"] = None
    length = settings.get("decay_steps") or settings["steps"]
    if "warmup" not in given and isinstance(length, int):   # a short run keeps the preset's warm-up within it
        settings["warmup"] = min(settings["warmup"], length // 10)
    return mc, TrainConfig(**settings)


def _known(given: dict, cls, what: str) -> None:
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{what} has no settings {unknown}; {cls.__name__}'s fields are "
                          f"{[f.name for f in dataclasses.fields(cls)]}")


def _corpus(data_path, text, kind, vocab_size, cache_dir, log, tokenizer: Tokenizer | None = None,
            expected_sha256: str | None = None) -> corpus.Corpus:
    """The corpus of data_path (prepared, or read from the cache), text, or the built-in one."""
    if isinstance(data_path, corpus.Corpus):
        if tokenizer is not None and tokenizer != data_path.tokenizer:
            raise DataError("this Corpus was made with another tokenizer than the run's own; build it with "
                            "the run's tokenizer (checkpoint.load(run).tokenizer)")
        return data_path
    if data_path is None and text is None:
        corpus.check_choice(kind or "char", vocab_size)
        try:
            return corpus.builtin(kind or "char", vocab_size, tokenizer)
        except UnknownCharactersError as e:           # a run's own char tokenizer, and no data given
            raise DataError(f"the built-in corpus holds characters the run's char tokenizer lacks ({e}); give "
                            f"{{data}}", data=("data_path", "FILE")) from None
    if text is not None:
        corpus.check_choice(kind or "char", vocab_size)
        return corpus.Corpus.from_text(text, kind or "char", vocab_size, tokenizer)
    try:
        return corpus.prepare(os.fspath(data_path), kind or "char", vocab_size, cache_dir=cache_dir,
                              tokenizer=tokenizer, expected_sha256=expected_sha256, out=log)
    except UnknownCharactersError as e:               # a run's own char tokenizer and a text it cannot encode
        raise DataError(f"data file {os.fspath(data_path)!r} holds characters the run's char tokenizer lacks: "
                        f"{e}") from None


def _plan_resume(run_dir, data_path, text, model, training, preset, kind, vocab_size, cache_dir, out_dir, batches,
                 devices, fsdp, prompt, sample_tokens, log) -> Plan:
    if out_dir is not None:
        raise RunDirError("{resume} continues a run in its own directory; drop {out} (to branch a run, copy its "
                          "directory first)", resume=("resume", run_dir), out=("run_dir", out_dir))
    run_dir = os.path.normpath(run_dir)
    if os.path.basename(run_dir) == runs.CHECKPOINT:
        run_dir = os.path.dirname(run_dir) or "."
    if not os.path.isdir(run_dir):
        raise RunDirError(f"no run directory {run_dir!r}; give the directory of a training run")
    ckpt = checkpoint.load(run_dir)
    imported = next((ckpt.origin[key] for key in checkpoint.IMPORTED if key in (ckpt.origin or {})), None)
    if imported is not None:
        raise RunDirError(f"{run_dir!r} holds a model imported from {imported!r}, with no training "
                          f"text or schedule of its own, so there is nothing to resume; start a new run from it "
                          f"with {{init_from}}", init_from=("init_from", run_dir))
    if kind is not None or vocab_size is not None:
        raise ConfigError("resuming keeps the run's tokenizer; drop {t}", t=("tokenizer", kind or "bpe"))
    given_model = model.to_dict() if isinstance(model, ModelConfig) else dict(model or {})
    given_training = training.to_dict() if isinstance(training, TrainConfig) else dict(training or {})
    _known(given_model, ModelConfig, "the model")
    _known(given_training, TrainConfig, "the training")
    mc, saved_tc = ckpt.model_config, ckpt.train_config
    conflicts = [(field, value, getattr(mc, field)) for field, value in given_model.items()
                 if field != "vocab_size" and value != getattr(mc, field)]
    conflicts += [(field, value, getattr(saved_tc, field)) for field, value in given_training.items()
                  if field not in RESUMABLE and value != getattr(saved_tc, field)]
    parts, mentions = _differences(conflicts, "saved")
    if preset is not None:
        parts.append("{preset}")
        mentions["preset"] = ("preset", preset)
    if parts:
        raise ConfigError(f"resuming keeps the run's settings, but these differ: {', '.join(parts)}; drop them, or "
                          f"start a new run with {{out}}", out=("run_dir", "DIR"), **mentions)
    changes = {k: given_training[k] for k in RESUMABLE if k in given_training}
    if changes.get("eval_tokens") == "all":
        changes["eval_tokens"] = None
    tc = saved_tc.replace(**changes)
    if int(ckpt.state.step) >= tc.steps:
        raise ConfigError(f"the run is already at step {int(ckpt.state.step)}; steps is the total to reach: pass "
                          f"{{steps}} or more to train further", steps=("steps", int(ckpt.state.step) + 1))
    _check_devices(tc, devices)
    source = _resume_corpus(ckpt, data_path, text, cache_dir, log)      # after every setting is known to be good
    base = None if tc.lora is None else checkpoint.base_params(ckpt.meta, mc)
    return _checked(run_dir, True, mc, tc, source, ckpt.state, batches, devices, fsdp, prompt, sample_tokens,
                    default_eval=False)._replace(origin=ckpt.origin, base=base)


def _resume_corpus(ckpt: checkpoint.Checkpoint, data_path, text, cache_dir, log) -> corpus.Corpus:
    """The corpus a resumed run trains on: the same data as before, wherever it lies now,
    with the run's own tokenizer."""
    saved, tokenizer = ckpt.data, ckpt.tokenizer
    given = data_path if data_path is not None else text
    if saved == corpus.BUILTIN_SOURCE:
        if given is not None:
            raise DataError("this run trained on the built-in corpus; drop {data} to resume it",
                            data=("data_path", data_path if text is None else "TEXT"))
        return corpus.builtin(tokenizer=tokenizer)
    if saved is None:                        # not recorded: whatever is given, encoded with the run's tokenizer
        if given is None:
            raise DataError("this run does not record what it trained on (it was saved with data=None); pass "
                            "{data} to resume it", data=("data_path", "FILE"))
        return _corpus(data_path, text, None, None, cache_dir, log, tokenizer)
    if saved["path"] is None:                # a text or ids given in memory: the same again, or a file holding it
        if given is None:
            raise DataError("this run trained on a text or ids given in memory; to resume it, give the same again "
                            "(text= or a Corpus), or {data} holding that text", data=("data_path", "FILE"))
        try:
            source = _corpus(data_path, text, None, None, cache_dir, log, tokenizer,
                             saved["sha256"] if isinstance(data_path, (str, os.PathLike)) else None)
        except corpus.SourceChangedError:
            source = None
        if source is None or source.source["sha256"] != saved["sha256"]:
            raise DataError("the data given is not what this run trained on (its SHA-256 differs); give the same "
                            "text or ids, or start a new run")
        return source                        # a file holding the text: recorded as that file from now on
    if isinstance(data_path, corpus.Corpus) or text is not None:
        raise DataError("this run trained on the text file {data}; pass its path", data=("data_path", saved["path"]))
    if data_path is None and not os.path.exists(saved["path"]):
        raise DataError(f"the run's data file {saved['path']!r} is gone; if it moved, pass {{data}} (the text must "
                        f"be the same)", data=("data_path", "NEW_PATH"))
    try:
        return _corpus(data_path or saved["path"], None, None, None, cache_dir, log, tokenizer, saved["sha256"])
    except corpus.SourceChangedError as e:
        if data_path is not None:
            raise DataError(f"{{data}} is not the text this run trained on (its SHA-256 differs from that of "
                            f"{saved['path']!r}); give the run's own text, or start a new run",
                            data=("data_path", os.fspath(data_path))) from None
        raise DataError(f"the run's data file {e.path!r} changed since the run trained on it (its SHA-256 differs); "
                        f"restore it, or pass {{data}} with the original text", data=("data_path", "FILE")) from None


def _sample_prompt(prompt: str | None, tokenizer: Tokenizer, ids: np.ndarray) -> str:
    """prompt, else 'hello' if the text's first 64 tokens hold it, else its first character."""
    if prompt is not None:
        return prompt
    start = tokenizer.decode(ids[:64])
    return "hello" if "hello" in start else start[0]


def _checked(run_dir, resuming, mc, tc, source: corpus.Corpus, state, batches, devices, fsdp, prompt,
             sample_tokens, *, default_eval: bool) -> Plan:
    """The checks every run shares: the final sample's prompt, the data's length, the
    validation sample, where batches come from, memory."""
    tokenizer = source.tokenizer
    if sample_tokens:
        prompt = _sample_prompt(prompt, tokenizer, source.ids)
        generate.encode_prompt(tokenizer, prompt)                    # before training, not after
    if source.source != corpus.BUILTIN_SOURCE:
        train_ids, val_ids = source.train, source.validation
        data.check_length(val_ids, mc.max_len, "validation (last 10% of the)")
        if default_eval:                                             # a resumed run keeps its own
            tc = tc.replace(eval_tokens=None if len(val_ids) <= defaults.DEFAULT_EVAL_TOKENS
                            else defaults.DEFAULT_EVAL_TOKENS)
        val_windows = data.eval_windows(val_ids, mc.max_len, tc.eval_tokens)
    else:
        train_ids, val_windows = source.ids, None                    # the built-in cycle: no held-out split
    data.check_length(train_ids, mc.max_len, "training")
    if len(train_ids) > defaults.INT32_MAX:
        raise DataError(f"the training split has {len(train_ids):,} tokens; batches index it with 32-bit offsets, "
                        f"so use a text of at most {defaults.INT32_MAX:,} tokens")
    if batches == "auto":
        batches = "device" if len(train_ids) <= defaults.DEVICE_RESIDENT_TOKENS else "memmap"
    step_bytes = memory.training_bytes(mc, tc.batch_size, tc.lora, tc.grad_accum)
    memory.check(step_bytes, "training this model",
                 "try a smaller {b}, {w}, {c} or {l}, or more {k}", b=("batch_size", tc.batch_size),
                 w=("d_model", mc.d_model), c=("max_len", mc.max_len), l=("n_layers", mc.n_layers),
                 k=("grad_accum", tc.grad_accum))
    if batches == "device":
        memory.check(step_bytes + 4 * len(train_ids),
                     "training this model with its text held on the device", "try {batches}",
                     batches=("batches", "memmap"))
    if sample_tokens:
        memory.check(memory.generation_bytes(mc, 1, sample_tokens), "the final sample", "try a smaller {n}",
                     n=("max_new_tokens", sample_tokens))
    return Plan(run_dir, resuming, mc, tc, source, train_ids, val_windows, batches, state,
                prompt if sample_tokens else None, sample_tokens, devices, fsdp)


# ----------------------------------------------------------------------------- run


def run(plan: Plan, *, log=None, stops: StopSignals | None = None) -> Result:
    """Train as planned, into plan.run_dir: its lock held (a killed save's leftovers
    removed first), metrics appended, checkpoints saved, loss.png drawn, the final
    sample generated. A stop signal (inside `stops`, which `train` installs) saves
    a checkpoint at the current step and returns with `stopped_by` set."""
    log = log or sys.stdout
    is_main = jax.process_index() == 0
    if not is_main:
        log = open(os.devnull, "w")
    stops = stops or signals.active() or StopSignals(forward_to_sigterm=jax.process_count() > 1)
    signals.check()                                       # a signal while planning: nothing written yet
    distributed.agree(_settings_to_agree_on(plan))        # several processes: the same run in each, before any step
    with contextlib.ExitStack() as stack:
        if is_main:
            try:
                os.makedirs(plan.run_dir, mode=runs.dir_mode(), exist_ok=True)
            except OSError as e:
                if e.errno in runs.STORAGE_ERRNOS:
                    raise StorageError(plan.run_dir, e) from None
                raise RunDirError(f"cannot create {plan.run_dir!r}: {e.strerror or e}; choose another run "
                                  f"directory") from None
            lock = stack.enter_context(runs.Lock(plan.run_dir))
            if lock.took_over is not None:
                print(f"Took over the lock of process {lock.took_over}, which is no longer running", file=log)
            if plan.resuming:
                removed = runs.remove_temporaries(plan.run_dir)
                if removed:
                    print(f"Removed {len(removed)} unfinished checkpoint(s) a killed save left: "
                          f"{', '.join(removed)}", file=log)
                if checkpoint.saved_step(plan.run_dir) != int(plan.state.step):
                    raise RunDirError(f"{plan.run_dir!r} changed while this run was planned; plan it again")
            else:
                runs.check_new_run_dir(plan.run_dir)                   # nobody slipped in before the lock
        return _train(plan, is_main, log, stops, stack)


def _settings_to_agree_on(plan: Plan) -> dict:
    """What every process of a multi-process run must plan alike (`distributed.agree`):
    not paths, which may differ from host to host, but what they hold."""
    source = plan.corpus.source
    return {**plan.model_config.to_dict(), **plan.train_config.to_dict(),
            "data": source.get("sha256", source), "tokenizer": corpus.tokenizer_sha256(plan.corpus.tokenizer),
            "resumed from step": int(plan.state.step) if plan.resuming else None,
            "started from": (plan.origin or {}).get("init_from", {}).get("sha256"),
            "batches": plan.batches,
            "devices": plan.devices, "fsdp": plan.fsdp}


def _train(plan: Plan, is_main: bool, log, stops: StopSignals, stack: contextlib.ExitStack) -> Result:
    run_dir, mc, tc = plan.run_dir, plan.model_config, plan.train_config
    metrics_path = os.path.join(run_dir, runs.METRICS) if is_main else None
    if plan.resuming and is_main and os.path.exists(metrics_path):
        if runs.read_records(metrics_path).torn:
            print(f"{metrics_path} ended in a half-written line (a process killed mid-write); it is dropped", file=log)
        runs.truncate_records(metrics_path, int(plan.state.step))
    keys = trainer.keys(tc.seed)
    state = plan.state if plan.state is not None else trainer.init_state(keys.init, mc, tc.optimizer)

    mesh = None
    if plan.devices or jax.device_count() > 1:
        mesh = distributed.make_mesh(plan.devices)                 # the batch splits over it: checked by plan
        shardings = distributed.state_shardings(state, mesh, plan.fsdp)
        state = distributed.put_global(jax.device_get(state), shardings)
        if plan.batches == "device":
            train_data = distributed.put_global(np.asarray(plan.train_ids, np.int32), distributed.replicated(mesh))
        parallel = trainer.step_fn(mc, tc.optimizer, tc.seed, tc.grad_accum, tc.lora)
        if plan.base is None:
            step = distributed.data_parallel(parallel, mesh, shardings)
        else:
            base_shardings = distributed.state_shardings(plan.base, mesh, plan.fsdp)
            base = distributed.put_global(jax.device_get(plan.base), base_shardings)
            adapted = distributed.data_parallel(parallel, mesh, shardings, base_shardings)

            def step(s, batch):
                return adapted(s, batch, base)
        sample = distributed.sharded_batch_at(mesh)
        # XLA:CPU runs each device's part of a step on a shared thread pool; with
        # dozens of multi-device steps queued, the parts of different steps can hold
        # every thread while waiting at an all-reduce, and deadlock. At most two
        # steps in flight still overlap dispatch with compute.
        max_in_flight = 2
    else:
        if plan.batches == "device":
            train_data = jnp.asarray(np.asarray(plan.train_ids, np.int32))

        def step(s, batch):
            return trainer.train_step(s, batch, plan.base, model_config=mc, optimizer_config=tc.optimizer,
                                      seed=tc.seed, accumulate=tc.grad_accum, lora=tc.lora)
        sample, max_in_flight = trainer.batch_at, None

    if plan.batches == "device":
        def next_batch(step_number):
            return sample(train_data, keys.data, step_number, batch_size=tc.batch_size, context=mc.max_len)
        where = f"sampled on the device from the {len(plan.train_ids):,} training tokens held there"
    else:
        def host_batch(step_number):
            return data.host_batch_at(plan.train_ids, keys.data, step_number, batch_size=tc.batch_size,
                                      context=mc.max_len, sharding=None if mesh is None else
                                      distributed.batch_sharding(mesh))
        next_batch = stack.enter_context(data.Prefetcher(host_batch, start=int(distributed.scalar(state.step))))
        where = (f"gathered on the host from the memory-mapped {len(plan.train_ids):,} training tokens, "
                 f"prefetched {data.Prefetcher.DEPTH} steps ahead")

    def evaluate(params):
        if mesh is not None:
            params = jax.device_put(distributed.to_host(params), jax.local_devices()[0])
        if plan.base is not None:                                   # adapters: the model is base + A B
            params = lora.merge(plan.base, params, scale=tc.lora.scale)
        return trainer.evaluate(params, plan.val_windows, config=mc)

    def save(s):
        host_state = distributed.to_host(s)                         # every process takes part in the gather
        if is_main:
            try:
                checkpoint.save(run_dir, host_state, model_config=mc, train_config=tc,
                                tokenizer=plan.corpus.tokenizer, data=plan.corpus.source, origin=plan.origin)
            except OSError as e:
                raise StorageError(os.path.join(run_dir, runs.CHECKPOINT), e) from None

    if plan.resuming:
        print(f"Resuming {run_dir} from step {int(state.step)}", file=log)
    print(f"Run directory: {run_dir}", file=log)
    if mesh is not None:
        print(f"Data-parallel over {mesh.devices.size} devices in {jax.process_count()} process(es)"
              + (", parameters split (FSDP)" if plan.fsdp else ""), file=log)
    layers = f"{mc.n_layers} layer" + "s" * (mc.n_layers != 1)
    print(f"Model: {model.count_params(plan.base or state.params):,} parameters, {layers}, width "
          f"{mc.d_model}, {mc.n_heads} heads, context {mc.max_len}, vocabulary {mc.vocab_size} "
          f"({plan.corpus.tokenizer.kind})", file=log)
    if plan.base is not None:
        print(f"LoRA: rank {tc.lora.rank}, alpha {tc.lora.alpha:g} on {', '.join(lora.targets(plan.base, tc.lora))}: "
              f"{model.count_params(state.params):,} trained parameters; the model's own are frozen", file=log)
    print(f"Batches: {where}" + ("" if plan.val_windows is None else
          f"; validation: {len(plan.val_windows):,} windows of {mc.max_len} tokens"
          + ("" if len(plan.val_windows) == data.windows_in(len(plan.corpus.validation), mc.max_len)
             else " (a fixed sample)")), file=log)
    print("Starting training...", file=log, flush=True)
    first_step = int(distributed.scalar(state.step))          # read now: the step donates the state
    started = time.perf_counter()
    try:
        result = loop.fit(state, step=step, next_batch=next_batch, steps=tc.steps, log_every=tc.log_every,
                          eval_every=tc.eval_every, save_every=tc.save_every,
                          tokens_per_step=tc.batch_size * mc.max_len,
                          evaluate=evaluate if plan.val_windows is not None else None, metrics_path=metrics_path,
                          save=save, out=log, signals=stops, max_in_flight=max_in_flight)
    except loop.NonFiniteError as e:
        lower = {"lr": ("lr", tc.lr)} if tc.lora is None else {"lr": ("lr", tc.lr), "alpha": ("lora_alpha", tc.lora.alpha)}
        raise RunFailed(f"{e}; training stopped and {kept(run_dir)}; try a lower "
                        + " or ".join("{%s}" % name for name in lower) + " or more {warmup}",
                        **lower, warmup=("warmup", tc.warmup)) from None
    except StorageError as e:
        raise RunFailed(f"{e.strerror}; training stopped and {kept(run_dir)}; free some space or fix the "
                        f"permissions, then continue with {{resume}}", resume=("resume", run_dir)) from None
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        first = str(e).strip().splitlines()[0][:200]
        raise RunFailed(f"the multi-process run broke off, most likely because another process died ({first}); "
                        f"{kept(run_dir) if is_main else 'process 0 keeps the last checkpoint'}; continue with "
                        f"{{resume}}, in any number of processes", resume=("resume", run_dir)) from None
    elapsed = time.perf_counter() - started
    final_step = int(distributed.scalar(result.state.step))
    # Gathering is a collective: every process takes part before the others leave.
    state = result.state if mesh is None else jax.device_put(distributed.to_host(result.state),
                                                             jax.local_devices()[0])
    records = runs.read_records(metrics_path).records if is_main and os.path.exists(metrics_path) else []
    result_args = dict(run_dir=run_dir, state=state, config=mc, train_config=tc, tokenizer=plan.corpus.tokenizer,
                       records=records, stopped_by=result.stopped_by, elapsed=elapsed, prompt=plan.prompt, sample=None,
                       picture=None, base=plan.base)
    if result.stopped_by is not None or not is_main:
        return Result(**result_args)
    ran = final_step - first_step
    print(f"Finished at step {final_step} ({ran} steps) in {elapsed:.1f} s"
          + (f"; validation loss {result.last_record['val_loss']:.4f}"
             if result.last_record and "val_loss" in result.last_record else ""), file=log)
    picture = draw_losses(run_dir, log)
    done = Result(**{**result_args, "picture": picture})
    if plan.sample_tokens:
        # The run is saved: the sample writes nothing, so under the command line's handlers a
        # signal ends it at once (one compiled loop has no safe point); a library caller's
        # own process is never ended, and the signal is acted on after it.
        with stops.exit_at_once():
            done = done._replace(sample=generate.complete(done, plan.prompt, max_new_tokens=plan.sample_tokens))
        signals.check()
    return done


class Evaluation(NamedTuple):
    """A model's loss on a text (`evaluate`)."""

    loss: float             # mean next-token cross-entropy, nats per token
    perplexity: float       # exp(loss)
    bits_per_byte: float    # the same loss per byte of the text: comparable across tokenizers
    tokens: int             # tokens predicted


def evaluate(run, data_path: str, *, eval_tokens: int | str | None = "all", cache_dir: str | None = None,
             log=None) -> Evaluation:
    """The loss of a model (a run directory, or anything with .params, .config and
    .tokenizer) on a whole text file under the model's own tokenizer: the file is
    prepared once into the cache (`corpus.prepare`, streamed) and read back as a memory
    map in windows of the model's context stepping by it, so every token after the
    first is predicted once (`data.eval_windows`; eval_tokens N: a fixed sample of
    about N tokens, "all" or None: every window). The windows are evaluated by
    `train.evaluate`, the function that validates during training, a batch at a time
    (memory stays bounded), with a progress line on a terminal.

    Example:
        >>> import io, tempfile, os
        >>> from minitx_fn.tokenizer import CharTokenizer
        >>> cfg = ModelConfig(vocab_size=3, d_model=8, n_heads=2, max_len=4)
        >>> m = checkpoint.Model(model.init(jax.random.key(0), cfg), cfg, CharTokenizer("abc"), {})
        >>> path = os.path.join(tempfile.mkdtemp(), "t.txt"); _ = open(path, "w").write("abcab" * 5)
        >>> e = evaluate(m, path, cache_dir=tempfile.mkdtemp(), log=io.StringIO())
        >>> e.tokens, round(e.perplexity / float(np.exp(e.loss)), 6)
        (24, 1.0)
    """
    log = log or sys.stdout
    loaded = run if hasattr(run, "params") else checkpoint.load_model(run)
    mc, tokenizer = loaded.config, loaded.tokenizer
    if eval_tokens not in (None, "all") and not (isinstance(eval_tokens, int) and not isinstance(eval_tokens, bool)
                                                 and eval_tokens >= 1):
        raise ConfigError("{n} must be a whole number >= 1, or 'all'", n=("eval_tokens", eval_tokens))
    if not isinstance(data_path, (str, os.PathLike)):
        raise DataError(f"the data must be a path (a str), not {type(data_path).__name__}")
    source = _corpus(os.fspath(data_path), None, None, None, cache_dir, log, tokenizer)
    if len(source.ids) < mc.max_len + 1:
        raise DataError(f"the text has {len(source.ids)} tokens; this model reads windows of {mc.max_len} tokens and "
                        f"their next one, so give it at least {mc.max_len + 1}")
    windows = data.eval_windows(source.ids, mc.max_len, None if eval_tokens in (None, "all") else eval_tokens)
    sizes, nbytes = tokenizer.token_bytes(), 0
    for start in range(0, len(windows), 4096):                  # the bytes the predicted tokens stand for
        nbytes += int(sizes[windows[start:start + 4096][:, 1:]].sum())
    tty = hasattr(log, "isatty") and log.isatty()

    def progress(done: int, total: int) -> None:
        signals.check()                                   # between two batches: a stop signal ends it here
        if tty:
            log.write(f"\r\033[Kevaluating: {done:,} / {total:,} windows of {mc.max_len} tokens")
            log.flush()

    loss = trainer.evaluate(loaded.params, windows, config=mc, progress=progress)
    if tty:
        log.write("\r\033[K")
    tokens = len(windows) * mc.max_len
    return Evaluation(loss, math.exp(min(loss, 700.0)), loss * tokens / (max(nbytes, 1) * math.log(2)), tokens)


def kept(run_dir: str) -> str:
    """Which checkpoint survives a failure, in words.

    Example:
        >>> import tempfile
        >>> kept(tempfile.mkdtemp())
        'no checkpoint had been saved yet'
    """
    try:
        step = int(checkpoint.load(run_dir).meta["step"])
    except (Error, OSError):
        return "no checkpoint had been saved yet"
    return f"the last good checkpoint (step {step}) is kept in {run_dir}"


def draw_losses(run_dir: str, log=None) -> str | None:
    """RUN/loss.png from RUN/metrics.jsonl: its path, or None without matplotlib or
    records (said on log). RunFailed if the picture cannot be written.

    Example:
        >>> import io, tempfile
        >>> draw_losses(tempfile.mkdtemp(), io.StringIO()) is None       # no records yet
        True
    """
    from minitx_fn import plot
    log = log or sys.stdout
    metrics_path, png = os.path.join(run_dir, runs.METRICS), os.path.join(run_dir, runs.LOSS_PNG)
    if not os.path.exists(metrics_path):
        return None
    try:
        drawn = plot.plot_losses(metrics_path, png)
    except plot.MissingMatplotlibError:
        print("(No loss.png: matplotlib is not installed; pip install -e \".[plot]\" adds the pictures.)", file=log)
        return None
    except OSError as e:
        raise RunFailed(f"cannot write {png!r}: {e.strerror or e}; the checkpoint is saved") from None
    if drawn:
        print(f"Loss curves: {drawn}", file=log)
    return drawn


def new_run(run_dir: str, params: dict, *, model_config: ModelConfig, tokenizer: Tokenizer,
            train_config: TrainConfig | None = None, data: Any = None, origin: dict | None = None,
            log=None) -> str:
    """Write a run at step 0 from parameters made elsewhere (an imported model): a new
    run directory (refused if it holds a run), its lock held, the optimiser's state
    fresh (`trainer.new_state`), one checkpoint. A run that fails leaves no empty folder.
    Returns the checkpoint's path.

    Example:
        >>> import io, tempfile
        >>> from minitx_fn.tokenizer import CharTokenizer
        >>> cfg = ModelConfig(vocab_size=3, d_model=8, n_heads=2)
        >>> run = tempfile.mkdtemp() + "/imported"
        >>> path = new_run(run, model.init(jax.random.key(0), cfg), model_config=cfg, tokenizer=CharTokenizer("abc"))
        >>> checkpoint.load_model(run).config == cfg
        True
    """
    log = log or sys.stdout
    tc = train_config or TrainConfig()
    # A run that was killed mid-save leaves a temporary folder: removed below, under the lock.
    runs.check_new_run_dir(run_dir, ignore_temporaries=True)
    state = trainer.new_state(params, trainer.make_optimizer(tc.optimizer))
    created = not os.path.exists(run_dir)
    try:
        with contextlib.ExitStack() as stack:
            os.makedirs(run_dir, mode=runs.dir_mode(), exist_ok=True)
            lock = stack.enter_context(runs.Lock(run_dir))
            if lock.took_over is not None:
                print(f"Took over the lock of process {lock.took_over}, which is no longer running", file=log)
            runs.remove_temporaries(run_dir)
            runs.check_new_run_dir(run_dir)                        # another process may have written it meanwhile
            return checkpoint.save(run_dir, state, model_config=model_config, train_config=tc, tokenizer=tokenizer,
                                   data=data, origin=origin)
    except BaseException as e:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)                                  # only if nothing is in it
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            raise StorageError(run_dir, e) from None
        raise


__all__ = ["Evaluation", "Plan", "RESUMABLE", "Result", "configs", "draw_losses", "evaluate", "kept", "new_run", "plan",
           "run", "train"]
