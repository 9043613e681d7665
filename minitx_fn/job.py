"""The whole training job: what `minitx train` runs.

    result = job.train("input.txt", model={"d_model": 128, "n_layers": 4}, training={"steps": 2000})
    result.run_dir, result.records, result.sample          # the run directory, its metrics, a sample
    generate.complete(result, "ROMEO:")                     # continue a text with the trained model

A job is one frozen value, `config.Job` (re-exported here): its `Data`, its model (a
model value: `ModelConfig`, or one of one's own), its `TrainConfig` (optimizer and
LoRA nested), where it `Start`s (new, resume, fine-tune from a run), the `Devices` it
runs on and the final `Sample`, each part checking itself. Three functions:

    make(settings) -> Job      the keyword settings the command line and `train` take: a
                               preset's values overridden by those given; a resume reads
                               the saved job and replaces only what a resume may change
    plan(job) -> Plan          what needs the data: the tokenizer and ids, the model's
                               vocabulary, the state it starts from, the validation
                               sample, memory; nothing of a run is written
    run(plan) -> Result        trains into the run directory that `minitx generate`, `plot`
                               and `--resume` read: its lock held, checkpoints saved (the
                               job as a dict among them), metrics.jsonl appended, loss.png
                               drawn; SIGINT, SIGTERM or SIGHUP save and stop (`stopped_by`)

`train` = `run(plan(make(...)))`. A run uses every device JAX sees (data-parallel;
`Devices`), and several processes once `distributed.initialize` has joined them.
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

from minitx_fn import (checkpoint, corpus, data, defaults, distributed, generate, lora, loop, memory, provenance, runs,
                       signals)
from minitx_fn import quantize as quantization  # the module; `quantize=` below is a keyword
from minitx_fn import train as trainer          # the module; `train` below is the whole job
from minitx_fn.config import (Data, Devices, Job, LanguageModel, LoraConfig, ModelConfig, Sample, Start,  # noqa: F401
                              TrainConfig, job_dict)      # (the job's values, re-exported: job.Job, job.Data, ...)
from minitx_fn.errors import CheckpointError, ConfigError, DataError, Error, RunDirError, RunFailed, StorageError
from minitx_fn.signals import StopSignals
from minitx_fn.tokenizer import Tokenizer, UnknownCharactersError

# What a resumed run may change; every other setting is the saved run's.
RESUMABLE = ("steps", "eval_every", "save_every", "log_every", "eval_tokens", "grad_accum")
RUNS_ROOT = "runs"                     # new runs go to RUNS_ROOT/<corpus name>-NNN unless run_dir says otherwise


# ----------------------------------------------------------------------------- make: settings -> a Job


def make(data_path: str | os.PathLike | corpus.Corpus | None = None, *, text: str | None = None,
         model: LanguageModel | dict | None = None, training: TrainConfig | dict | None = None,
         preset: str | None = None, tokenizer: str | None = None, vocab_size: int | None = None,
         cache_dir: str | None = None, batches: str = "auto", run_dir: str | None = None,
         resume: str | None = None, init_from: str | None = None, trust_code: bool = False,
         devices: int | None = None, fsdp: bool = False, prompt: str | None = None,
         sample_tokens: int = defaults.SAMPLE_TOKENS) -> Job:
    """The job these settings describe, every one checked; nothing is read but the
    meta.json of a run it resumes or starts from. The data's settings are `Data`'s
    (data_path: a text file or a `corpus.Corpus`), the start's `Start`'s, the devices'
    `Devices`' (devices: count) and the sample's `Sample`'s (sample_tokens: tokens).

    A new run's model is a dict of ModelConfig fields over the preset's (vocab_size
    comes from the tokenizer) or a model value; its training a dict of TrainConfig fields
    over the preset's (the optimizer's and LoRA's nested as dicts) or a TrainConfig. The
    preset (defaults.PRESETS) is "hello" on the built-in corpus and "shakespeare-baby"
    on a text; a short run keeps its warm-up within a tenth of the run. A run started
    `init_from` another has that run's model (`model` may only lower max_len and set
    dropout) and tokenizer. A `resume` is the saved job: `training` may change only
    RESUMABLE fields (steps is the total to reach; the schedule stays the first run's),
    and every other setting given must agree with the saved one.

    Example:
        >>> j = make(model={"d_model": 32}, training={"steps": 100, "optimizer": {"lr": 1e-2}})
        >>> j.model.d_model, j.model.n_layers, j.model.vocab_size, j.training.optimizer.warmup   # the rest: preset hello
        (32, 2, None, 10)
    """
    source = Data(path=data_path, text=text, tokenizer=tokenizer, vocab_size=vocab_size, cache_dir=cache_dir,
                  batches=batches)
    start = Start(run_dir=run_dir, resume=resume, init_from=init_from, trust_code=trust_code)
    if start.init_from is not None:               # a run or its checkpoint folder: the run, once, for all that follows
        start = dataclasses.replace(start, init_from=checkpoint.run_of(start.init_from))
    parts = dict(data=source, start=start, devices=Devices(count=devices, fsdp=fsdp),
                 sample=Sample(prompt=prompt, tokens=sample_tokens))
    given_model, given_training = _fields(model, LanguageModel, "model"), _fields(training, TrainConfig, "training")
    if start.resume is not None:
        return _resumed(start, model, given_model, given_training, preset, parts)
    for name in ("eval_every", "eval_tokens"):           # the built-in cycle has no validation split
        if not source.held_out and name in given_training:
            raise ConfigError("{setting} needs data with a held-out part; the built-in corpus has none: give {data}",
                              setting=(name, given_training[name]), data=("data_path", "FILE"))
    values = defaults.preset(preset, has_data=source.held_out)
    if start.init_from is not None:
        if tokenizer is not None or vocab_size is not None:
            raise ConfigError("a run started from another keeps its tokenizer; drop {t}", t=("tokenizer",
                                                                                              tokenizer or "bpe"))
        source_model = checkpoint.read_job(start.init_from, trust_code=trust_code).model
        if given_model.get("vocab_size") not in (None, source_model.vocab_size):
            raise ConfigError("{v} is not the vocabulary of the run it starts from ({n} ids, its tokenizer's); leave "
                              "it out", v=("vocab_size", given_model["vocab_size"]), n=("vocab_size",
                                                                                      source_model.vocab_size))
        model = _fine_tuned(source_model, model, given_model)
    elif not isinstance(model, LanguageModel):
        if "vocab_size" in given_model:
            raise ConfigError("{v} comes from the tokenizer; leave it out of the model's fields",
                              v=("vocab_size", given_model["vocab_size"]))
        model = ModelConfig(**{**values["model"], **_known(given_model, ModelConfig, "the model")})
    job = Job(model=model, training=training if isinstance(training, TrainConfig) else
              _over_preset(given_training, values["train"]), **parts)
    if start.run_dir is not None:
        runs.check_new_run_dir(start.run_dir)                      # before preparing a large text
    provenance.check_importable(job.model)                         # a run of it could be loaded again
    if job.training.lora is not None and start.init_from is not None:
        _base_at_rest(start.init_from)
        depth = checkpoint.lora_depth(start.init_from, trust_code=trust_code) + 1
        if depth >= checkpoint.MAX_BASES:
            raise ConfigError(f"{start.init_from!r} ends a chain of {depth - 1} LoRA runs; LoRA on it would make "
                              f"a chain of {depth}, and at most {checkpoint.MAX_BASES - 1} load: fine-tune it in full "
                              f"(without {{lora}}), which merges the chain", lora=("lora.rank", "R"))
    return _on_devices(job)


def _divisors(n: int) -> list[int]:
    """The divisors of n, ascending (what grad_accum may be for a batch of n)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _base_at_rest(base: str) -> None:
    """RunDirError if the run a LoRA run's adapters apply to is being trained: its next
    save would change the base under the adapters (the run could not be used after it)."""
    try:
        holder = runs.Lock(checkpoint.run_of(base)).live_holder()
    except CheckpointError:
        return                                    # a base that is gone: loading it says so, naming it
    if holder:
        raise RunDirError(f"{base!r} is being trained ({holder}); a LoRA run needs its base to stay as it is: wait "
                          f"for that run to finish, or copy it and start from the copy")


def _over_preset(given: dict, preset: dict) -> TrainConfig:
    """A new run's TrainConfig: the preset's fields with those given over them (the
    optimizer's merged field by field; the preset's warm-up at most a tenth of the run)."""
    optimizer = given.get("optimizer") or {}
    if isinstance(optimizer, dict):
        optimizer = {**preset.get("optimizer", {}), **optimizer}
        length = optimizer.get("decay_steps") or given.get("steps", preset.get("steps"))
        if "warmup" not in (given.get("optimizer") or {}) and "warmup" in optimizer and isinstance(length, int):
            optimizer["warmup"] = min(optimizer["warmup"], length // 10)
    return TrainConfig(**{**preset, **_known(given, TrainConfig, "the training"), "optimizer": optimizer})


def _fields(value, cls, name: str) -> dict:
    """A value (a model, a config) or a dict of its fields, as a dict of fields."""
    if value is not None and not isinstance(value, (dict, cls)):
        raise ConfigError(f"{{{name}}} must be a dict of fields or a {cls.__name__}, not {type(value).__name__}",
                          **{name: (name, value)})
    return value.to_dict() if isinstance(value, cls) else dict(value or {})


def _known(given: dict, cls, what: str) -> dict:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(f"{what} has no settings {unknown}; {cls.__name__}'s fields are {names}")
    return given


def _differ(given: dict, kept: dict, skip=(), names: dict | None = None) -> list[tuple[str, Any, Any]]:
    """(name, given, kept) for every field of `given` that differs from `kept`, nested
    dicts field by field (the optimizer's, LoRA's), each named as messages name it."""
    out = []
    for field, value in given.items():
        if field in skip:
            continue
        if isinstance(value, dict) and isinstance(kept.get(field), dict):
            out += _differ(value, kept[field], names=LoraConfig.MESSAGE_NAMES if field == "lora" else None)
        elif value != kept.get(field):
            out.append(((names or {}).get(field, field), value, kept.get(field)))
    return out


def _refuse(conflicts: list[tuple[str, Any, Any]], kept: str, message: str, also: dict | None = None,
            **mentions) -> None:
    """One ConfigError listing, in `message`'s {parts}, every (field, given, kept value)
    and the settings in `also` that may not be given, each rendered as its flag."""
    parts = [f"{{g{i}}} ({kept}: {{s{i}}})" for i in range(len(conflicts))] + ["{%s}" % name for name in also or {}]
    if parts:
        for i, (field, value, had) in enumerate(conflicts):
            mentions[f"g{i}"], mentions[f"s{i}"] = (field, value), (field, had)
        raise ConfigError(message.replace("{parts}", ", ".join(parts)), **mentions, **(also or {}))


def _fine_tuned(source: LanguageModel, model, given: dict) -> LanguageModel:
    """The model of a run started from `source`: the source's, with at most a shorter
    context and another dropout rate; any other difference is one error naming them."""
    kept = source.to_dict()
    free = {"dropout", "vocab_size"} & set(kept) | ({"max_len"} if given.get("max_len", source.max_len) <=
                                                   source.max_len else set())
    _known(given, type(source), "the model")
    conflicts = [("model", model.code, source.code)] if isinstance(model, LanguageModel) and \
        type(model) is not type(source) else _differ(given, kept, free)
    _refuse(conflicts, "its own", "a run started from another has that run's model, but these differ: {parts}; drop "
                                  "them (only a shorter context and dropout may change)")
    return source.replace(**{f: given[f] for f in free - {"vocab_size"} & set(given)})


def _resumed(start: Start, given_model, model: dict, training: dict, preset, parts: dict) -> Job:
    """A resume: the saved job, with what a resume may change (RESUMABLE) and nothing else."""
    if parts["data"].tokenizer is not None or parts["data"].vocab_size is not None:
        raise ConfigError("resuming keeps the run's tokenizer; drop {t}", t=("tokenizer", parts["data"].tokenizer
                                                                             or "bpe"))
    saved = checkpoint.read_job(start.resume, trust_code=start.trust_code)
    imported = next((saved.origin[key] for key in checkpoint.IMPORTED if key in (saved.origin or {})), None)
    if imported is not None:
        raise RunDirError(f"{start.resume!r} holds a model imported from {imported!r}, with no training text or "
                          f"schedule of its own, so there is nothing to resume; start a new run from it with "
                          f"{{init_from}}", init_from=("init_from", start.resume))
    if saved.train_config.lora is not None and (saved.origin or {}).get("init_from"):
        _base_at_rest(saved.origin["init_from"]["path"])
    skip = ("vocab_size",) if model.get("vocab_size") is None else ()       # a model value awaiting its tokenizer
    conflicts = [("model", given_model.code, saved.model.code)] if isinstance(given_model, LanguageModel) and \
        type(given_model) is not type(saved.model) else _differ(_known(model, type(saved.model), "the model"),
                                                                 saved.model.to_dict(), skip)
    conflicts += _differ({k: v for k, v in _known(training, TrainConfig, "the training").items()
                          if not (k == "optimizer" and v is None)}, saved.train_config.to_dict(), RESUMABLE)
    _refuse(conflicts, "saved", "resuming keeps the run's settings, but these differ: {parts}; drop them, or start a "
                                "new run with {out}", None if preset is None else {"preset": ("preset", preset)},
            out=("run_dir", "DIR"))
    tc = saved.train_config.replace(**{k: training[k] for k in RESUMABLE if k in training})
    if saved.step >= tc.steps:
        raise ConfigError(f"the run is already at step {saved.step}; steps is the total to reach: pass {{steps}} or "
                          f"more to train further", steps=("steps", saved.step + 1))
    return _on_devices(Job(model=saved.model, training=tc, **parts))


def _on_devices(job: Job) -> Job:
    """The job, once its batch is known to split over its devices (`distributed.check_batch`)."""
    if job.devices.count or jax.device_count() > 1:
        distributed.check_batch(job.training.batch_size, distributed.make_mesh(job.devices.count))
    return job


# ----------------------------------------------------------------------------- plan: the job -> what it will do


class Plan(NamedTuple):
    """Everything a run will do, checked before anything of it is written."""

    job: Job                        # as made, its model's vocab_size filled in
    run_dir: str
    resuming: bool
    corpus: corpus.Corpus           # the tokenizer, the ids, their source
    train_ids: np.ndarray           # (N,) token ids to sample batches from (maybe memory-mapped)
    val_windows: data.Windows | None  # (W, T + 1) validation windows, None without a held-out split
    batches: str                    # "device" (the ids held there) or "memmap" (gathered on the host)
    state: trainer.TrainState | None  # the state it starts from (None: fresh)
    prompt: str | None              # the seed of the final sample, None for none
    origin: dict | None = None      # where a run started from another's parameters came from (checkpoint.save)
    base: dict | None = None        # a LoRA run's frozen parameters, which its adapters (state.params) apply to

    @property
    def model(self) -> LanguageModel:
        return self.job.model

    @property
    def train_config(self) -> TrainConfig:
        return self.job.training


def plan(job: Job, *, log=None) -> Plan:
    """What `job` will do, prepared: the data (a text file prepared once into the cache,
    with the tokenizer of the run it starts from or resumes, or one learned from it),
    the model's vocabulary from the tokenizer, the state it starts from (a saved run's,
    another run's parameters, or none for a fresh one), the validation windows, where
    batches come from, the final sample's prompt, memory. Nothing of a run is written.
    `log`: where progress lines go (default sys.stdout; io.StringIO() to keep them quiet).
    """
    log = log or sys.stdout
    if not isinstance(job, Job):
        raise ConfigError(f"plan takes a job.Job (job.make builds one from settings), not {type(job).__name__}")
    start, tc = job.start, job.training
    state = origin = base = None
    if start.resume is not None:
        ckpt = checkpoint.load(start.resume, trust_code=start.trust_code)
        source = _resume_corpus(ckpt, job.data, log)
        run_dir, state, origin, base = _run_of(start.resume), ckpt.state, ckpt.origin, ckpt.base
        model = ckpt.model
    else:
        started = None if start.init_from is None else checkpoint.load_model(start.init_from,
                                                                            trust_code=start.trust_code)
        source = _corpus(job.data, log, None if started is None else started.tokenizer)
        # The model's vocabulary: the tokenizer's, or the run it starts from (whose table may be padded past it).
        vocab = source.tokenizer.vocab_size if started is None else started.model.vocab_size
        model = job.model if job.model.vocab_size is not None else job.model.replace(vocab_size=vocab)
        if model.vocab_size != vocab:
            raise ConfigError("{v} differs from the tokenizer's {t} ids; leave vocab_size None, and the tokenizer "
                              "gives it", v=("vocab_size", model.vocab_size), t=("vocab_size", vocab))
        provenance.check_contract(model)                        # a model of one's own: its shapes, before training
        if model.code.startswith("__main__:"):
            print(f"Note: the model {model.code} is defined in the script that runs; resuming or loading this run "
                  f"needs the same class defined there (in a module of its own, it loads anywhere)", file=log)
        run_dir = start.run_dir or runs.new_run_name(RUNS_ROOT, source.name)
        runs.check_new_run_dir(run_dir)
        if started is not None:
            params = model.with_context(started.params, model.max_len)
            if tc.lora is None:
                state = trainer.new_state(params, trainer.make_optimizer(tc.optimizer))
            else:
                state = trainer.lora_state(trainer.keys(tc.seed).init, model, params, tc.optimizer, tc.lora)
                base = params
            origin = {"init_from": {"path": os.path.abspath(start.init_from),
                                    "sha256": started.meta["files"]["params.npz"]["sha256"]}}
    if source.source != corpus.BUILTIN_SOURCE:
        train_ids, val_ids = source.train, source.validation
        data.check_length(val_ids, model.max_len, "validation (last 10% of the)")
        val_windows = data.eval_windows(val_ids, model.max_len, tc.eval_tokens)
    else:
        train_ids, val_windows = source.ids, None                    # the built-in cycle: no held-out split
    return _checked(job.replace(model=model), run_dir, start.resume is not None, source, train_ids, val_windows,
                    state, origin, base)


def _run_of(path: str) -> str:
    """The run directory of a path that names it or its checkpoint folder."""
    path = os.path.normpath(path)
    return (os.path.dirname(path) or ".") if os.path.basename(path) == runs.CHECKPOINT else path


def _corpus(source: Data, log, tokenizer: Tokenizer | None = None, expected_sha256: str | None = None
            ) -> corpus.Corpus:
    """The corpus of the data (prepared, or read from the cache), with `tokenizer` (a
    run's own) or one of the data's kind."""
    kind = source.tokenizer or "char"
    if source.corpus is not None:
        if tokenizer is not None and tokenizer != source.corpus.tokenizer:
            raise DataError("this Corpus was made with another tokenizer than the run's own; build it with "
                            "the run's tokenizer (checkpoint.load(run).tokenizer)")
        return source.corpus
    if source.text is not None:
        try:
            return corpus.Corpus.from_text(source.text, kind, source.vocab_size, tokenizer)
        except UnknownCharactersError as e:           # a run's own char tokenizer and a text it cannot encode
            raise DataError(f"the text given ({{text}}) holds characters the run's char tokenizer lacks: {e}",
                            text=("text", source.text[:40] + ("..." if len(source.text) > 40 else ""))) from None
    if source.path is None:
        try:
            return corpus.builtin(kind, source.vocab_size, tokenizer)
        except UnknownCharactersError as e:           # a run's own char tokenizer, and no data given
            raise DataError(f"the built-in corpus holds characters the run's char tokenizer lacks ({e}); give "
                            f"{{data}}", data=("data_path", "FILE")) from None
    try:
        return corpus.prepare(source.path, kind, source.vocab_size, cache_dir=source.cache_dir, tokenizer=tokenizer,
                              expected_sha256=expected_sha256, out=log)
    except UnknownCharactersError as e:               # a run's own char tokenizer and a text it cannot encode
        raise DataError(f"data file {source.path!r} holds characters the run's char tokenizer lacks: "
                        f"{e}") from None


def _resume_corpus(ckpt: checkpoint.Checkpoint, source: Data, log) -> corpus.Corpus:
    """The corpus a resumed run trains on: the text it recorded (its SHA-256 checked),
    wherever it lies now, with the run's own tokenizer."""
    saved, tokenizer = ckpt.data, ckpt.tokenizer
    given = source.path or source.text or source.corpus
    if saved == corpus.BUILTIN_SOURCE and given is not None:
        raise DataError("this run trained on the built-in corpus; drop {data} to resume it",
                        data=("data_path", source.path or "TEXT"))
    if saved is None or saved == corpus.BUILTIN_SOURCE:  # or not recorded: whatever is given, with the run's tokenizer
        if saved is None and given is None:
            raise DataError("this run does not record what it trained on (it was saved with data=None); pass "
                            "{data} to resume it", data=("data_path", "FILE"))
        return _corpus(source, log, tokenizer)
    if saved["path"] is None and given is None:     # a text or ids given in memory: the same again, or a file of it
        raise DataError("this run trained on a text or ids given in memory; to resume it, give the same again "
                        "(text= or a Corpus), or {data} holding that text", data=("data_path", "FILE"))
    if saved["path"] is not None and source.path is None:
        if given is not None:
            raise DataError("this run trained on the text file {data}; pass its path", data=("data_path",
                                                                                             saved["path"]))
        if not os.path.exists(saved["path"]):
            raise DataError(f"the run's data file {saved['path']!r} is gone; if it moved, pass {{data}} (the text "
                            f"must be the same)", data=("data_path", "NEW_PATH"))
        source = dataclasses.replace(source, path=saved["path"])
    try:
        found = _corpus(source, log, tokenizer, saved["sha256"] if source.path is not None else None)
    except corpus.SourceChangedError as e:
        if source.path == saved["path"]:
            raise DataError(f"the run's data file {e.path!r} changed since the run trained on it (its SHA-256 "
                            f"differs); restore it, or pass {{data}} with the original text",
                            data=("data_path", "FILE")) from None
        found = None
    if found is None or found.source["sha256"] != saved["sha256"]:
        if saved["path"] is None:
            raise DataError("the data given is not what this run trained on (its SHA-256 differs); give the same "
                            "text or ids, or start a new run")
        raise DataError(f"{{data}} is not the text this run trained on (its SHA-256 differs from that of "
                        f"{saved['path']!r}); give the run's own text, or start a new run",
                        data=("data_path", source.path))
    return found                             # a file holding an in-memory text: recorded as that file from now on


def _sample_prompt(prompt: str | None, tokenizer: Tokenizer, ids: np.ndarray) -> str:
    """prompt, else 'hello' if the text's first 64 tokens hold it, else its first character."""
    if prompt is not None:
        return prompt
    start = tokenizer.decode(ids[:64])
    return "hello" if "hello" in start else start[0]


def _checked(job: Job, run_dir: str, resuming: bool, source: corpus.Corpus, train_ids, val_windows, state, origin,
             base) -> Plan:
    """The checks every run shares: the final sample's prompt, the data's length, where
    batches come from, memory."""
    model, tc, tokens = job.model, job.training, job.sample.tokens
    prompt = None
    if tokens:
        prompt = _sample_prompt(job.sample.prompt, source.tokenizer, source.ids)
        generate.encode_prompt(source.tokenizer, prompt)             # before training, not after
    data.check_length(train_ids, model.max_len, "training")
    if len(train_ids) > defaults.INT32_MAX:
        raise DataError(f"the training split has {len(train_ids):,} tokens; batches index it with 32-bit offsets, "
                        f"so use a text of at most {defaults.INT32_MAX:,} tokens")
    batches = job.data.batches
    if batches == "auto":
        batches = "device" if len(train_ids) <= defaults.DEVICE_RESIDENT_TOKENS else "memmap"
    step_bytes = memory.training_bytes(model, tc.batch_size, tc.lora, tc.grad_accum)
    available = memory.available_bytes()
    fits = None if available is None or step_bytes <= available else next(
        (k for k in _divisors(tc.batch_size) if k > tc.grad_accum
         and memory.training_bytes(model, tc.batch_size, tc.lora, k) <= available), None)
    memory.check(step_bytes, "training this model", "try a smaller {b}, {w}, {c} or {l}"
                 + ("" if fits is None else f", or {{k}} (micro-batches of {tc.batch_size // fits})"),
                 b=("batch_size", tc.batch_size), w=("d_model", getattr(model, "d_model", "D")),
                 c=("max_len", model.max_len), l=("n_layers", getattr(model, "n_layers", "L")), k=("grad_accum", fits))
    if batches == "device":
        memory.check(step_bytes + 4 * len(train_ids),
                     "training this model with its text held on the device", "try {batches}",
                     batches=("batches", "memmap"))
    if tokens:
        memory.check(memory.generation_bytes(model, 1, tokens), "the final sample", "try a smaller {n}",
                     n=("sample_tokens", tokens))
    return Plan(job, run_dir, resuming, source, train_ids, val_windows, batches, state, prompt, origin, base)


# ----------------------------------------------------------------------------- run: the plan -> a trained run


def run(plan: Plan, *, log=None, stops: StopSignals | None = None) -> Result:
    """Train as planned, into plan.run_dir: its lock held (a killed save's leftovers
    removed first), metrics appended, checkpoints saved, loss.png drawn, the final
    sample generated. A stop signal (inside `stops`, which `train` installs) saves
    a checkpoint at the current step and returns with `stopped_by` set."""
    if not isinstance(plan, Plan):
        raise ConfigError(f"run takes a job.Plan (job.plan(job) makes one), not {type(plan).__name__}")
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
    the job as meta.json stores it, and not paths, which may differ from host to host,
    but what they hold."""
    job = plan.job
    saved = job_dict(job.model, job.training, plan.corpus.source)
    return {"model.code": saved["model"]["code"], **{f"model.{k}": v for k, v in saved["model"]["config"].items()},
            **{f"training.{k}": v for k, v in saved["training"].items()}, "data": saved["data"],
            "tokenizer": corpus.tokenizer_sha256(plan.corpus.tokenizer),
            "resumed from step": int(plan.state.step) if plan.resuming else None,
            "started from": (plan.origin or {}).get("init_from", {}).get("sha256"),
            "batches": plan.batches, "devices": dataclasses.asdict(job.devices)}


def _train(plan: Plan, is_main: bool, log, stops: StopSignals, stack: contextlib.ExitStack) -> Result:
    run_dir, model, tc = plan.run_dir, plan.model, plan.train_config
    metrics_path = os.path.join(run_dir, runs.METRICS) if is_main else None
    if plan.resuming and is_main and os.path.exists(metrics_path):
        if runs.read_records(metrics_path).torn:
            print(f"{metrics_path} ended in a half-written line (a process killed mid-write); it is dropped", file=log)
        runs.truncate_records(metrics_path, int(plan.state.step))
    keys = trainer.keys(tc.seed)
    state = plan.state if plan.state is not None else trainer.init_state(keys.init, model, tc.optimizer)
    devices = plan.job.devices

    mesh = None
    if devices.count or jax.device_count() > 1:
        mesh = distributed.make_mesh(devices.count)                # the batch splits over it: checked by make
        shardings = distributed.state_shardings(state, mesh, devices.fsdp)
        state = distributed.put_global(jax.device_get(state), shardings)
        if plan.batches == "device":
            train_data = distributed.put_global(np.asarray(plan.train_ids, np.int32), distributed.replicated(mesh))
        parallel = trainer.step_fn(model, tc.optimizer, tc.seed, tc.grad_accum, tc.lora)
        if plan.base is None:
            step = distributed.data_parallel(parallel, mesh, shardings)
        else:
            base_shardings = distributed.state_shardings(plan.base, mesh, devices.fsdp)
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
            return trainer.train_step(s, batch, plan.base, model=model, optimizer_config=tc.optimizer,
                                      seed=tc.seed, accumulate=tc.grad_accum, lora=tc.lora)
        sample, max_in_flight = trainer.batch_at, None

    if plan.batches == "device":
        def next_batch(step_number):
            return sample(train_data, keys.data, step_number, batch_size=tc.batch_size, context=model.max_len)
        where = f"sampled on the device from the {len(plan.train_ids):,} training tokens held there"
    else:
        def host_batch(step_number):
            return data.host_batch_at(plan.train_ids, keys.data, step_number, batch_size=tc.batch_size,
                                      context=model.max_len, sharding=None if mesh is None else
                                      distributed.batch_sharding(mesh))
        next_batch = stack.enter_context(data.Prefetcher(host_batch, start=int(distributed.scalar(state.step))))
        where = (f"gathered on the host from the memory-mapped {len(plan.train_ids):,} training tokens, "
                 f"prefetched {data.Prefetcher.DEPTH} steps ahead")
    # One evaluation batch for the whole run, sized from memory now: a size that followed
    # the memory free at each evaluation would compile the loss again whenever it moved.
    eval_batch = None if plan.val_windows is None else memory.evaluation_batch(model, plan.val_windows.shape[1] - 1)

    def evaluate(params):
        if mesh is not None:
            params = jax.device_put(distributed.to_host(params), jax.local_devices()[0])
        if plan.base is not None:                                   # adapters: the model is base + A B
            params = lora.merge(plan.base, params, scale=tc.lora.scale)
        return trainer.evaluate(params, plan.val_windows, model=model, batch_size=eval_batch)

    def save(s):
        host_state = distributed.to_host(s)                         # every process takes part in the gather
        if is_main:
            try:
                checkpoint.save(run_dir, host_state, model=model, train_config=tc, tokenizer=plan.corpus.tokenizer,
                                data=plan.corpus.source, origin=plan.origin, base=plan.base)
            except OSError as e:
                raise StorageError(os.path.join(run_dir, runs.CHECKPOINT), e) from None

    if plan.resuming:
        print(f"Resuming {run_dir} from step {int(state.step)}", file=log)
    print(f"Run directory: {run_dir}", file=log)
    if mesh is not None:
        print(f"Data-parallel over {mesh.devices.size} devices in {jax.process_count()} process(es)"
              + (", parameters split (FSDP)" if devices.fsdp else ""), file=log)
    print(f"Model: {describe(model, plan.base or state.params)}, vocabulary {model.vocab_size} "
          f"({plan.corpus.tokenizer.kind})", file=log)
    if plan.base is not None:
        targets = ", ".join(p.removeprefix("blocks/") for p in lora.targets(model, plan.base, tc.lora))
        print(f"LoRA: rank {tc.lora.rank}, alpha {tc.lora.alpha:g} on {targets}: {_count(state.params):,} trained "
              f"parameters; the model's own are frozen", file=log)
    print(f"Batches: {where}" + ("" if plan.val_windows is None else
          f"; validation: {len(plan.val_windows):,} windows of {model.max_len} tokens"
          + ("" if len(plan.val_windows) == data.windows_in(len(plan.corpus.validation), model.max_len)
             else " (a fixed sample)")), file=log)
    print("Starting training...", file=log, flush=True)
    first_step = int(distributed.scalar(state.step))          # read now: the step donates the state
    started = time.perf_counter()
    try:
        result = loop.fit(state, step=step, next_batch=next_batch, steps=tc.steps, log_every=tc.log_every,
                          eval_every=tc.eval_every, save_every=tc.save_every,
                          tokens_per_step=tc.batch_size * model.max_len,
                          evaluate=evaluate if plan.val_windows is not None else None, metrics_path=metrics_path,
                          save=save, out=log, signals=stops, max_in_flight=max_in_flight)
    except loop.NonFiniteError as e:
        lower = {"lr": ("lr", tc.optimizer.lr)}
        if tc.optimizer.method == "muon":                   # the matrices' own rate
            lower["muon_lr"] = ("muon_lr", tc.optimizer.muon_lr)
        if tc.lora is not None:
            lower["alpha"] = ("lora.alpha", tc.lora.alpha)
        raise RunFailed(f"{e}; training stopped and {kept(run_dir)}; try a lower "
                        + " or ".join("{%s}" % name for name in lower) + " or more {warmup}",
                        **lower, warmup=("warmup", tc.optimizer.warmup)) from None
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
    result_args = dict(run_dir=run_dir, state=state, model=model, train_config=tc, tokenizer=plan.corpus.tokenizer,
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
    try:            # the model's cached decode is the model it trained: what generate and a draft will run
        provenance.verify(model, done.params, None, run_dir)
    except CheckpointError as e:
        raise RunFailed(f"{e}; the run is saved") from None
    stack.close()       # the run is whole: its lock goes now, not with a process the sample's signal ends
    if plan.prompt is not None:
        # The run is saved: the sample writes nothing, so under the command line's handlers a
        # signal ends it at once (one compiled loop has no safe point); a library caller's
        # own process is never ended, and the signal is acted on after it.
        with stops.exit_at_once():
            done = done._replace(sample=generate.complete(done, plan.prompt, max_new_tokens=plan.job.sample.tokens))
        signals.check()
    return done


def _count(tree) -> int:
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def describe(model: LanguageModel, params) -> str:
    """A model in a few words, for the log: its parameters and, for the built-in, its shape.

    Example:
        >>> describe(ModelConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=1, max_len=4), {"w": np.zeros((3, 4))})
        '12 parameters, 1 layer, width 8, 2 heads, context 4'
    """
    words = f"{_count(params):,} parameters"
    if isinstance(model, ModelConfig):
        words += (f", {model.n_layers} layer" + "s" * (model.n_layers != 1) + f", width {model.d_model}, "
                  f"{model.n_heads} heads")
    words += f", context {model.max_len}"
    return words if type(model) is ModelConfig else f"{model.code}: {words}"


class Result(NamedTuple):
    """What a run gives back. `params`, `model` and `tokenizer` make it a model that
    `generate.complete(result, prompt)` continues; `state` is the final TrainState
    (for a LoRA run its params are the adapters and `base` the frozen weights, and
    `params` merges them), `records` the metrics, `sample` the text generated at the end."""

    run_dir: str
    state: trainer.TrainState         # the final state (gathered to every process in a multi-process run)
    model: LanguageModel            # the model value (its vocab_size the tokenizer's)
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


def train(job: Job | str | os.PathLike | corpus.Corpus | None = None, /, *, log=None, **settings) -> Result:
    """Make, plan and run a training job, with SIGINT, SIGTERM and SIGHUP as requests to
    save and stop from the first moment: `run(plan(make(...)))`. Give a `Job`, or the
    data and settings `make` takes (data_path, text, model, training, preset, tokenizer,
    vocab_size, cache_dir, run_dir, resume, init_from, trust_code, batches, devices,
    fsdp, prompt, sample_tokens: `help(job.make)` says what each does).

    Example:
        >>> import io, tempfile
        >>> r = train(model={"d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 8},
        ...           training={"steps": 20, "log_every": 10, "batch_size": 4}, run_dir=tempfile.mkdtemp() + "/r",
        ...           sample_tokens=5, log=io.StringIO())
        >>> int(r.state.step), [rec["step"] for rec in r.records], len(r.sample)
        (20, [10, 20], 5)
    """
    log = log or sys.stdout
    if isinstance(job, Job) and settings:
        raise ConfigError(f"train takes a Job or settings, not both ({sorted(settings)}); job.replace changes a Job")
    outer = signals.active()                     # the command line's, installed before JAX was imported
    with contextlib.nullcontext(outer) if outer else StopSignals(forward_to_sigterm=jax.process_count() > 1) as stops:
        return run(plan(job if isinstance(job, Job) else make(job, **settings), log=log), log=log, stops=stops)


class Evaluation(NamedTuple):
    """A model's loss on a text (`evaluate`)."""

    loss: float             # mean next-token cross-entropy, nats per token
    perplexity: float       # exp(loss)
    bits_per_byte: float    # the same loss per byte of the text: comparable across tokenizers
    tokens: int             # tokens predicted
    quantized: dict | None = None   # with quantize=: how the quantized model stands to its float weights


def evaluate(run, data_path: str, *, eval_tokens: int | str | None = "all", cache_dir: str | None = None,
             trust_code: bool = False, quantize: str | None = None, log=None) -> Evaluation:
    """The loss of a model (a run directory, or anything with .params, .model and
    .tokenizer) on a whole text file under the model's own tokenizer: the file is
    prepared once into the cache (`corpus.prepare`, streamed) and read back as a memory
    map in windows of the model's context stepping by it, so every token after the
    first is predicted once (`data.eval_windows`; eval_tokens N: a fixed sample of
    about N tokens, "all" or None: every window). The windows are evaluated by
    `train.evaluate`, the function that validates during training, a batch at a time
    (memory stays bounded), with a progress line on a terminal.

    quantize ("int8" or "bfloat16", `quantize.KINDS`): the loss is the quantized
    model's, and `quantized` says how it stands to the float weights on the same
    windows (`train.compare`): their loss, the relative rise, the KL divergence per
    token, top-1 agreement, the greedy tokens both generate from the text's first
    tokens (up to 256, as the context allows) and the bytes of the weights.

    Example:
        >>> import io, tempfile, os
        >>> from minitx_fn.tokenizer import CharTokenizer
        >>> cfg = ModelConfig(vocab_size=3, d_model=8, n_heads=2, max_len=4)
        >>> m = checkpoint.Model(cfg.init(jax.random.key(0)), cfg, CharTokenizer("abc"), {})
        >>> path = os.path.join(tempfile.mkdtemp(), "t.txt"); _ = open(path, "w").write("abcab" * 5)
        >>> e = evaluate(m, path, cache_dir=tempfile.mkdtemp(), log=io.StringIO())
        >>> e.tokens, round(e.perplexity / float(np.exp(e.loss)), 6)
        (24, 1.0)
    """
    log = log or sys.stdout
    loaded = run if hasattr(run, "params") else checkpoint.load_model(run, trust_code=trust_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    if eval_tokens not in (None, "all") and not (isinstance(eval_tokens, int) and not isinstance(eval_tokens, bool)
                                                 and eval_tokens >= 1):
        raise ConfigError("{n} must be a whole number >= 1, or 'all'", n=("eval_tokens", eval_tokens))
    if not isinstance(data_path, (str, os.PathLike)):
        raise DataError(f"the data must be a path (a str), not {type(data_path).__name__}")
    if quantize is not None:
        quantization.check_kind(quantize, "quantize")
        if quantization.is_quantized(loaded.params):              # it would be compared with itself
            raise ConfigError("{q} compares quantized weights with the run's float ones, but these are quantized "
                              "already; evaluate its float weights, or leave quantize out",
                              q=("quantize", quantize))
    source = _corpus(Data(path=data_path, cache_dir=cache_dir), log, tokenizer)
    if len(source.ids) < model.max_len + 1:
        raise DataError(f"the text has {len(source.ids)} tokens; this model reads windows of {model.max_len} tokens "
                        f"and their next one, so give it at least {model.max_len + 1}")
    windows = data.eval_windows(source.ids, model.max_len, None if eval_tokens in (None, "all") else eval_tokens)
    sizes, nbytes = tokenizer.token_bytes(), 0
    for start in range(0, len(windows), 4096):                  # the bytes the predicted tokens stand for
        nbytes += int(sizes[windows[start:start + 4096][:, 1:]].sum())
    tty = hasattr(log, "isatty") and log.isatty()

    def progress(done: int, total: int) -> None:
        signals.check()                                   # between two batches: a stop signal ends it here
        if tty:
            log.write(f"\r\033[Kevaluating: {done:,} / {total:,} windows of {model.max_len} tokens")
            log.flush()

    stood = None
    if quantize is None:
        loss = trainer.evaluate(loaded.params, windows, model=model, progress=progress)
    else:
        params = quantization.quantize(loaded.params, quantize)
        compared = trainer.compare(params, loaded.params, windows, model=model, progress=progress)
        loss = compared.loss
        stood = {"to": quantize, "float_loss": compared.reference_loss,
                 "loss_rise": compared.loss / compared.reference_loss - 1, "kl": compared.kl,
                 "top1_agreement": compared.top1_agreement,
                 **_greedy_agreement(params, loaded.params, np.asarray(windows[:1])[0], model),
                 "weight_bytes": quantization.weight_bytes(params),
                 "float_weight_bytes": quantization.weight_bytes(loaded.params)}
    if tty:
        log.write("\r\033[K")
    tokens = len(windows) * model.max_len
    return Evaluation(loss, math.exp(min(loss, 700.0)), loss * tokens / (max(nbytes, 1) * math.log(2)), tokens,
                      stood)


GREEDY_TOKENS = 256               # how far a quantized model's greedy text is compared with the float model's


def _greedy_agreement(params, reference, window: np.ndarray, model: LanguageModel) -> dict:
    """The greedy tokens params and reference generate from a window's first tokens (a
    sixteenth of the context, at least one): how many of them there are (GREEDY_TOKENS,
    or what the context leaves), how many are equal, and how many lead before the first
    difference."""
    prompt = window[:max(1, model.max_len // 16)]
    n = min(GREEDY_TOKENS, model.max_len - len(prompt))
    ours, theirs = (generate.generate(p, [prompt], model=model, max_new_tokens=n)[0] for p in (params, reference))
    differ = np.flatnonzero(ours != theirs)
    return {"greedy_tokens": n, "greedy_equal": int((ours == theirs).sum()),
            "greedy_equal_before_difference": int(differ[0]) if differ.size else n}


def kept(run_dir: str) -> str:
    """Which checkpoint survives a failure, in words.

    Example:
        >>> import tempfile
        >>> kept(tempfile.mkdtemp())
        'no checkpoint had been saved yet'
    """
    try:
        step = checkpoint.saved_step(run_dir)
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


def new_run(run_dir: str, params: dict, *, model: LanguageModel, tokenizer: Tokenizer,
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
        >>> path = new_run(run, cfg.init(jax.random.key(0)), model=cfg, tokenizer=CharTokenizer("abc"))
        >>> checkpoint.load_model(run).model == cfg
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
            return checkpoint.save(run_dir, state, model=model, train_config=tc, tokenizer=tokenizer,
                                   data=data, origin=origin)
    except BaseException as e:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)                                  # only if nothing is in it
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            raise StorageError(run_dir, e) from None
        raise


__all__ = ["Data", "Devices", "Evaluation", "Job", "Plan", "RESUMABLE", "Result", "Sample", "Start", "describe",
           "draw_losses", "evaluate", "kept", "make", "new_run", "plan", "run", "train"]
