"""The `minitx` command: train a model, generate text from a checkpoint.

    minitx train                                  the built-in corpus, about 30 s on 2 CPU cores
    minitx train --data input.txt --preset shakespeare-baby
    minitx train --resume runs/input-001 --steps 4000
    minitx generate --checkpoint runs/input-001 --prompt "ROMEO:" --temperature 0.8 --top-k 20
    minitx attention --checkpoint runs/input-001 --prompt "ROMEO:" --out attention.png
    minitx plot runs/input-001

Errors in the input (flags, data files, prompts, checkpoints) print one line
`minitx: error: ...` and exit with status 2; a NaN loss exits 1; Ctrl-C during
training saves a checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

PRESETS = {
    # The built-in corpus: a small, fast model that learns the three-phrase cycle.
    "hello": {"width": 64, "layers": 2, "heads": 4, "context": 32, "batch_size": 16, "steps": 500, "lr": 3e-3,
              "warmup": 50, "eval_every": 250, "save_every": 500},
    # nanoGPT's CPU recipe for Tiny Shakespeare (its README, "baby GPT").
    "shakespeare-baby": {"width": 128, "layers": 4, "heads": 4, "context": 64, "batch_size": 12, "steps": 2000,
                         "lr": 1e-3, "min_lr": 1e-4, "warmup": 100, "eval_every": 250, "save_every": 500},
}
MODEL_FLAGS = {"width": "d_model", "layers": "n_layers", "heads": "n_heads", "context": "max_len"}
TRAIN_FLAGS = {"batch_size": "batch_size", "lr": "lr", "min_lr": "min_lr", "warmup": "warmup",
               "decay_steps": "decay_steps", "seed": "seed", "weight_decay": "weight_decay"}
# May differ from the saved run when resuming.
RESUMABLE_FLAGS = {"steps", "eval_every", "save_every", "log_every"}


class UsageError(Exception):
    """Bad input from the user: exit status 2 with a one-line message."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return None if value is None else int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not a whole number") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand; errors raise UsageError instead of exiting."""
    parser = _Parser(prog="minitx", description="A mini GPT-style character model in plain JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (on the built-in corpus unless --data is given)")
    t.add_argument("--data", help="UTF-8 text file; 90%% trains, the last 10%% validates")
    t.add_argument("--preset", choices=sorted(PRESETS), help="a set of defaults (hello without --data, "
                   "shakespeare-baby with it); any flag below overrides it")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    t.add_argument("--out", metavar="DIR", help="run directory (default: a new runs/<corpus>-NNN)")
    t.add_argument("--steps", type=_positive_int, help="train until this many steps in total")
    t.add_argument("--batch-size", type=_positive_int)
    t.add_argument("--context", type=_positive_int, help="context window T (the model's max_len)")
    t.add_argument("--layers", type=_positive_int)
    t.add_argument("--heads", type=_positive_int)
    t.add_argument("--width", type=_positive_int, help="model width D; a multiple of --heads")
    t.add_argument("--lr", type=_float, help="peak learning rate")
    t.add_argument("--min-lr", type=_float, help="final learning rate (default lr / 10)")
    t.add_argument("--warmup", type=int, help="linear warm-up steps")
    t.add_argument("--decay-steps", type=_positive_int, help="length of the cosine schedule (default --steps)")
    t.add_argument("--weight-decay", type=_float)
    t.add_argument("--seed", type=int)
    t.add_argument("--eval-every", type=_positive_int)
    t.add_argument("--save-every", type=_positive_int)
    t.add_argument("--log-every", type=_positive_int)
    t.add_argument("--prompt", help="seed of the sample printed at the end (default 'hello', or the text's "
                   "first character)")
    t.add_argument("--max-new-tokens", type=_positive_int, default=100)
    t.add_argument("--devices", type=_positive_int, help="data-parallel over the first N devices (default: all)")
    t.add_argument("--fsdp", action="store_true", help="split parameters and optimiser state over the devices")
    t.add_argument("--coordinator", metavar="HOST:PORT", default=os.environ.get("MINITX_COORDINATOR"),
                   help="multi-process run: address of process 0 (or MINITX_COORDINATOR)")
    t.add_argument("--num-processes", type=_positive_int, default=_env_int("MINITX_NUM_PROCESSES"),
                   help="multi-process run: how many processes (or MINITX_NUM_PROCESSES)")
    t.add_argument("--process-id", type=int, default=_env_int("MINITX_PROCESS_ID"),
                   help="multi-process run: this process's index, 0 .. N - 1 (or MINITX_PROCESS_ID)")

    g = sub.add_parser("generate", help="continue a prompt with a trained model")
    g.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory (or its checkpoint/)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive_int, default=100)
    g.add_argument("--temperature", type=_float, help="0 is greedy; default 1 when --top-k or --top-p is given")
    g.add_argument("--top-k", type=_positive_int)
    g.add_argument("--top-p", type=_float, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", help="stop after generating this string")

    a = sub.add_parser("attention", help="draw the attention maps of every layer and head for a prompt")
    a.add_argument("--checkpoint", required=True, metavar="DIR")
    a.add_argument("--prompt", required=True)
    a.add_argument("--out", required=True, metavar="FILE.png")

    p = sub.add_parser("plot", help="draw the loss curves of a run from its metrics.jsonl")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE.png", help="default RUN_DIR/loss.png")
    return parser


# ----------------------------------------------------------------------------- train


def _new_run_dir(name: str) -> str:
    os.makedirs("runs", exist_ok=True)
    for i in range(1, 10000):
        path = os.path.join("runs", f"{name}-{i:03d}")
        if not os.path.exists(path):
            return path
    raise UsageError("runs/ is full; pass --out")


def _settings(args) -> dict:
    """Preset defaults overridden by the flags given."""
    preset = args.preset or ("shakespeare-baby" if args.data else "hello")
    settings = dict(PRESETS[preset], seed=0, log_every=100)
    given = _given(args)
    settings.update(given)
    if "warmup" not in given:       # a short run keeps the preset's warm-up from exceeding it
        settings["warmup"] = min(settings["warmup"], settings.get("decay_steps", settings["steps"]) // 10)
    return settings


def _given(args) -> dict:
    names = set(MODEL_FLAGS) | set(TRAIN_FLAGS) | RESUMABLE_FLAGS
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def _configs(settings: dict, vocab_size: int):
    from minitx_fn.config import ModelConfig, TrainConfig
    try:
        mc = ModelConfig(vocab_size=vocab_size, **{MODEL_FLAGS[k]: settings[k] for k in MODEL_FLAGS})
        tc = TrainConfig(steps=settings["steps"], eval_every=settings["eval_every"],
                         save_every=settings["save_every"], log_every=settings["log_every"],
                         **{TRAIN_FLAGS[k]: settings[k] for k in TRAIN_FLAGS if k in settings})
    except ValueError as e:
        flag = {v: k for k, v in {**MODEL_FLAGS, **TRAIN_FLAGS}.items()}
        message = str(e)
        for field, name in flag.items():
            message = message.replace(f"{field}=", f"--{name.replace('_', '-')}=")
        raise UsageError(message) from None
    return mc, tc


def _load_text(data_path: str | None) -> tuple[str, str]:
    from minitx_fn import data
    if data_path is None:
        return data.builtin_text(), "hello"
    return data.read_text(data_path), os.path.splitext(os.path.basename(data_path))[0] or "data"


def _start_processes(args) -> bool:
    """Join a multi-process run when asked; True in the process that writes (process 0)."""
    given = [args.coordinator, args.num_processes, args.process_id]
    if all(v is None for v in given):
        return True
    if any(v is None for v in given):
        raise UsageError("a multi-process run needs all of --coordinator, --num-processes and --process-id")
    if not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process-id {args.process_id} must lie in [0, {args.num_processes})")
    from minitx_fn import distributed
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    return args.process_id == 0


def cmd_train(args, out=None) -> int:
    """`minitx train`: a new run, or --resume of a saved one; returns the exit status."""
    is_main = _start_processes(args)
    out = (out or sys.stdout) if is_main else open(os.devnull, "w")
    import jax
    import jax.numpy as jnp

    from minitx_fn import checkpoint, data, distributed, train
    from minitx_fn.tokenizer import Tokenizer

    if args.resume:
        ckpt = checkpoint.load(args.resume)
        saved = ckpt.meta
        run_dir = args.resume if os.path.basename(os.path.normpath(args.resume)) != checkpoint.NAME \
            else os.path.dirname(os.path.normpath(args.resume))
        data_path = saved.get("data_path")
        if args.data and (data_path is None or os.path.abspath(args.data) != os.path.abspath(data_path)):
            raise UsageError(f"--data {args.data!r} differs from the run's data {data_path!r}; "
                             f"omit --data when resuming")
        _check_resume_flags(args, saved)
        text, _ = _load_text(data_path)
        tokenizer = ckpt.tokenizer
        mc = ckpt.model_config
        tc = ckpt.train_config.replace(**{k: getattr(args, k) for k in RESUMABLE_FLAGS
                                          if getattr(args, k, None) is not None})
        state, data_key = ckpt.state, ckpt.data_key
        ids = tokenizer.encode(text)
        if int(state.step) >= tc.steps:
            raise UsageError(f"the run is already at step {int(state.step)}; pass --steps N with N larger "
                             f"to train further")
        if is_main:
            train.truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), int(state.step))
        print(f"Resuming {run_dir} from step {int(state.step)}", file=out)
    else:
        text, name = _load_text(args.data)
        tokenizer = Tokenizer.from_text(text)
        settings = _settings(args)
        mc, tc = _configs(settings, tokenizer.vocab_size)
        run_dir = args.out or _new_run_dir(name)
        if os.path.exists(os.path.join(run_dir, checkpoint.NAME)):
            raise UsageError(f"{run_dir!r} already holds a run; pass --resume {run_dir} to continue it, "
                             f"or another --out")
        ids = tokenizer.encode(text)
        init_key, data_key = train.keys(tc.seed)
        state = train.init_state(init_key, mc, tc)
        data_path = os.path.abspath(args.data) if args.data else None

    if args.data or (args.resume and data_path):
        train_ids, val_ids = data.split(ids)
        data.check_length(val_ids, mc.max_len, "validation (last 10% of the)")
        val_windows = data.eval_windows(val_ids, mc.max_len)
    else:
        train_ids, val_windows = ids, None                  # the built-in cycle: no held-out split
    data.check_length(train_ids, mc.max_len, "training")

    mesh = None
    if args.devices or jax.device_count() > 1:
        try:
            mesh = distributed.make_mesh(args.devices)
            distributed.check_batch(tc.batch_size, mesh)
        except ValueError as e:
            raise UsageError(str(e)) from None
        state = distributed.put_global(jax.device_get(state), distributed.state_shardings(state, mesh, args.fsdp))
        train_data = distributed.put_global(train_ids, distributed.replicated(mesh))
    else:
        train_data = jnp.asarray(train_ids)

    if is_main:
        os.makedirs(run_dir, exist_ok=True)
    metrics_path = os.path.join(run_dir, "metrics.jsonl") if is_main else None

    def save(s):
        host_state = distributed.to_host(s)                # every process takes part in the gather
        if is_main:
            checkpoint.save(run_dir, host_state, data_key=data_key, model_config=mc, train_config=tc,
                            tokenizer=tokenizer, extra={"data_path": data_path})

    from minitx_fn import model
    print(f"Run directory: {run_dir}", file=out)
    if mesh is not None:
        print(f"Data-parallel over {mesh.devices.size} devices in {jax.process_count()} process(es)"
              + (", parameters split (FSDP)" if args.fsdp else ""), file=out)
    print(f"Model: {model.count_params(state.params):,} parameters, {mc.n_layers} layers, width {mc.d_model}, "
          f"{mc.n_heads} heads, context {mc.max_len}, vocabulary {mc.vocab_size}", file=out)
    print("Starting training...", file=out, flush=True)
    started = time.perf_counter()
    try:
        result = train.fit(state, data=train_data, data_key=data_key, model_config=mc, train_config=tc,
                           val_windows=val_windows, metrics_path=metrics_path, save=save, out=out, mesh=mesh,
                           fsdp=args.fsdp)
    except train.NonFiniteLossError as e:
        saved_step = _saved_step(run_dir)
        kept = f"the last good checkpoint (step {saved_step}) is kept in {run_dir}" if saved_step is not None \
            else "no checkpoint had been saved yet"
        print(f"minitx: error: {e}; training stopped and {kept}. Try a lower --lr or more --warmup.",
              file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    final_step = int(distributed.scalar(result.state.step))
    # Gathering is a collective: every process takes part before the others leave.
    params = result.state.params if mesh is None else jax.device_put(
        distributed.to_host(result.state.params), jax.local_devices()[0])
    if not is_main:
        return 0
    if result.interrupted:
        print(f"\nInterrupted at step {final_step}; checkpoint saved. "
              f"Continue with: minitx train --resume {run_dir}", file=out)
        return 130
    summary = {"step": final_step, "train_seconds": round(elapsed, 1)}
    if result.last_record and "val_loss" in result.last_record:
        summary["val_loss"] = result.last_record["val_loss"]
    print(f"Finished {summary['step']} steps in {elapsed:.1f} s" +
          (f"; validation loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""), file=out)
    from minitx_fn import plot
    try:
        png = plot.plot_losses(metrics_path, os.path.join(run_dir, "loss.png"))
        if png:
            print(f"Loss curves: {png}", file=out)
    except plot.MissingMatplotlibError:
        pass                                 # the picture is optional; metrics.jsonl has the numbers

    prompt = args.prompt if args.prompt is not None else ("hello" if "hello" in text[:64] else text[0])
    print("Generated text:", file=out)
    print(prompt + _generate_text(params, mc, tokenizer, prompt, args.max_new_tokens, jax.random.key(0)), file=out)
    return 0


def _check_resume_flags(args, saved: dict) -> None:
    """Flags given with --resume must agree with the saved run, except RESUMABLE_FLAGS."""
    current = {**{name: saved["model_config"][field] for name, field in MODEL_FLAGS.items()},
               **{name: saved["train_config"][field] for name, field in TRAIN_FLAGS.items()}}
    conflicts = [f"--{k.replace('_', '-')} {v} (saved: {current[k]})" for k, v in _given(args).items()
                 if k in current and v != current[k]]
    if args.preset:
        conflicts.append(f"--preset {args.preset}")
    if conflicts:
        raise UsageError(f"resuming keeps the run's settings, but these differ: {', '.join(conflicts)}; "
                         f"drop them, or start a new run with --out")


def _saved_step(run_dir: str) -> int | None:
    from minitx_fn import checkpoint
    try:
        with open(os.path.join(checkpoint.locate(run_dir), "meta.json")) as f:
            return json.load(f)["step"]
    except Exception:
        return None


def _generate_text(params, mc, tokenizer, prompt: str, max_new_tokens: int, key, sampler=None,
                   stop: str | None = None) -> str:
    from minitx_fn.generate import generate
    from minitx_fn.sampling import GREEDY
    if not prompt:
        raise UsageError("the prompt is empty; give at least one character")
    ids = tokenizer.encode(prompt)
    stop_ids = tuple(tokenizer.encode(stop)) if stop else ()
    new = generate(params, [ids], config=mc, key=key, max_new_tokens=max_new_tokens, sampler=sampler or GREEDY,
                   stop=stop_ids)[0]
    return tokenizer.decode(new)


# ----------------------------------------------------------------------------- generate


def cmd_generate(args, out=None) -> int:
    """`minitx generate`: continue a prompt from a checkpoint (greedy unless a sampling flag is given)."""
    out = out or sys.stdout
    import jax

    from minitx_fn import checkpoint
    from minitx_fn.sampling import Sampler

    temperature = args.temperature
    if temperature is None:
        temperature = 1.0 if (args.top_k or args.top_p is not None) else 0.0
    try:
        sampler = Sampler(temperature=temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        raise UsageError(str(e).replace("top_k=", "--top-k=").replace("top_p=", "--top-p=")
                         .replace("temperature=", "--temperature=")) from None
    ckpt = checkpoint.load(args.checkpoint)
    text = _generate_text(ckpt.state.params, ckpt.model_config, ckpt.tokenizer, args.prompt, args.max_new_tokens,
                          jax.random.key(args.seed), sampler, args.stop)
    print(args.prompt + text, file=out)
    return 0


def cmd_attention(args, out=None) -> int:
    """`minitx attention`: a PNG grid of the attention maps (L rows, H columns) for a prompt."""
    import jax.numpy as jnp

    from minitx_fn import checkpoint, model, plot

    ckpt = checkpoint.load(args.checkpoint)
    mc = ckpt.model_config
    if not args.prompt:
        raise UsageError("the prompt is empty; give at least one character")
    if len(args.prompt) > mc.max_len:
        raise UsageError(f"the prompt has {len(args.prompt)} characters; the model's context is {mc.max_len}")
    ids = jnp.asarray(ckpt.tokenizer.encode(args.prompt))[None, :]
    maps = np.asarray(model.attention_maps(ckpt.state.params, ids, config=mc))[:, 0]     # (L, H, T, T)
    plot.plot_attention(maps, args.prompt, args.out)
    print(f"Attention maps ({mc.n_layers} layers x {mc.n_heads} heads): {args.out}", file=out or sys.stdout)
    return 0


def cmd_plot(args, out=None) -> int:
    """`minitx plot`: the loss curves of a run from its metrics.jsonl."""
    from minitx_fn import plot

    metrics = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise UsageError(f"{metrics!r} does not exist; pass the directory of a training run")
    png = plot.plot_losses(metrics, args.out or os.path.join(args.run_dir, "loss.png"))
    if png is None:
        raise UsageError(f"{metrics!r} has no records yet; train for at least --log-every steps")
    print(f"Loss curves: {png}", file=out or sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `minitx`; bad input prints one line and returns 2, never a traceback."""
    from minitx_fn.checkpoint import CheckpointError
    from minitx_fn.data import DataError
    from minitx_fn.plot import MissingMatplotlibError
    from minitx_fn.tokenizer import UnknownCharactersError

    try:
        args = build_parser().parse_args(argv)
        commands = {"train": cmd_train, "generate": cmd_generate, "attention": cmd_attention, "plot": cmd_plot}
        return commands[args.command](args)
    except (UsageError, DataError, CheckpointError, UnknownCharactersError, MissingMatplotlibError) as e:
        print(f"minitx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minitx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
