"""Time to quality: the wall-clock seconds (and steps) each recipe takes to reach a
validation loss on Tiny Shakespeare, against nanoGPT's recipe run with PyTorch eager
on the same machine in the same run.

    python -m benchmarks.quality --json q.json --plot q.png     ~15 minutes on 2 CPU cores
    python -m benchmarks.quality --data FILE --seeds 1 --steps-scale 0.01   seconds: the code path

Recipes (each over --seeds seeds, the same initial weights and the same batches for
every recipe of a seed):

    torch-adamw   nanoGPT's CPU recipe for Tiny Shakespeare (4 layers, 4 heads, width 128,
                  context 64, batch 12, 2000 steps, AdamW lr 1e-3 with 100 warm-up steps
                  and a cosine to 1e-4, betas (0.9, 0.99), weight decay 0.1 on matrices,
                  clipping at 1), run by `benchmarks/torch_reference.py`'s twin of our
                  model in PyTorch eager: the yardstick
    adamw         the same recipe, ours (`minitx train --preset shakespeare-baby`)
    muon-gpt      the baby's GPT layers with shakespeare-fast's training: Muon, 400 steps
    fast          our best recipe (`minitx train --preset shakespeare-fast`): Llama's layers
                  (rotary positions, RMSNorm, SwiGLU, no biases) and Muon, 400 steps

The target is the median over seeds of torch-adamw's best validation loss. A run's
time to the target is the training time (evaluations excluded, compilation included:
a user waits for it) until its first evaluation at or below the target. Validation is
the same fixed windows of the held-out 10% for every run, every --eval-every steps.
The data is the char-level Tiny Shakespeare in `../shared/data/` (or --data).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from benchmarks.common import SHARED_TEXT, check_output_path, device_info, positive_int, versions
from minitx_fn import defaults, runs

EVAL_WINDOWS = 512                          # fixed validation windows of 64 + 1 (32,768 predicted tokens)


def _recipe(preset: str) -> dict:
    """A preset's model and training, as the recipes read them."""
    chosen = defaults.preset(preset, has_data=True)
    return {"model": chosen["model"], "train": chosen["train"]}


def _muon_alone() -> dict:
    """shakespeare-fast's training on the baby's GPT layers: what Muon does without Llama's layers."""
    fast, baby = _recipe("shakespeare-fast"), _recipe("shakespeare-baby")
    return {"model": baby["model"], "train": fast["train"]}


RECIPES = {"torch-adamw": {**_recipe("shakespeare-baby"), "framework": "torch"},
           "adamw": {**_recipe("shakespeare-baby"), "framework": "jax"},
           "muon-gpt": {**_muon_alone(), "framework": "jax"},
           "fast": {**_recipe("shakespeare-fast"), "framework": "jax"}}


def _configs(recipe: dict, vocab_size: int, steps_scale: float):
    from minitx_fn.config import ModelConfig, OptimizerConfig, TrainConfig
    train = dict(recipe["train"])
    steps = max(2, round(train["steps"] * steps_scale))
    optimizer = dict(train.get("optimizer", {}))
    optimizer["warmup"] = min(round(optimizer.get("warmup", 0) * steps_scale), steps - 1)
    tc = TrainConfig(steps=steps, batch_size=train["batch_size"],
                     optimizer=OptimizerConfig(decay_steps=steps, **optimizer))
    return ModelConfig(vocab_size=vocab_size, **recipe["model"]), tc


def _batches(ids, seed: int, steps: int, batch_size: int, context: int) -> np.ndarray:
    """(steps, B, T + 1) windows of the training ids, the batches `train.batch_at` draws for this seed."""
    import jax
    import jax.numpy as jnp

    from minitx_fn import train
    data, data_key = jnp.asarray(ids), train.keys(seed).data
    out = []
    for step in range(steps):
        x, y = train.batch_at(data, data_key, jnp.int32(step), batch_size=batch_size, context=context)
        out.append(np.concatenate([np.asarray(x), np.asarray(y)[:, -1:]], axis=1))
    jax.block_until_ready(data)
    return np.stack(out)


def _run_jax(model, tc, params, batches, windows, eval_every) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from minitx_fn import train
    state = train.new_state(params, train.make_optimizer(tc.optimizer))
    step = jax.jit(train.step_fn(model, tc.optimizer), donate_argnums=0)
    curve, spent = [], 0.0
    for i, window in enumerate(batches):
        start = time.perf_counter()
        window = jnp.asarray(window)
        state, metrics = step(state, (window[:, :-1], window[:, 1:]))
        jax.block_until_ready(metrics["loss"])
        spent += time.perf_counter() - start
        if (i + 1) % eval_every == 0 or i + 1 == len(batches):
            curve.append({"step": i + 1, "seconds": spent,
                          "val_loss": train.evaluate(state.params, windows, model=model, batch_size=128)})
    return curve


def _run_torch(model, tc, params, batches, windows, eval_every) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from benchmarks import torch_reference
    from minitx_fn import train
    step, lm = torch_reference.make_step(model, tc, params)
    optimizer = step.optimizer
    schedule = train.learning_rate_schedule(tc.optimizer)
    rates = [float(schedule(i)) for i in range(len(batches))]             # nanoGPT's get_lr, one scalar a step
    curve, spent = [], 0.0
    for i, window in enumerate(batches):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = rates[i]
        window = torch.from_numpy(window.astype(np.int64))
        step(window[:, :-1], window[:, 1:])
        spent += time.perf_counter() - start
        if (i + 1) % eval_every == 0 or i + 1 == len(batches):
            with torch.no_grad():
                total = 0.0
                for s in range(0, len(windows), 128):
                    w = torch.from_numpy(np.asarray(windows[s:s + 128]).astype(np.int64))
                    logits = lm(w[:, :-1])
                    total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                   reduction="mean")) * len(w)
            curve.append({"step": i + 1, "seconds": spent, "val_loss": total / len(windows)})
    return curve


def measure(text: str, seeds: int, steps_scale: float, eval_every: int, recipes: list[str]) -> dict:
    import jax

    from minitx_fn import corpus, data
    from minitx_fn.errors import DataError
    source = corpus.Corpus.from_text(text)
    train_ids, val_ids = np.asarray(source.ids[:source.boundary]), np.asarray(source.ids[source.boundary:])
    longest = max(RECIPES[name]["model"]["max_len"] for name in recipes)
    if min(len(train_ids), len(val_ids)) < longest + 1:          # not one window to train on or to validate
        raise DataError(f"its validation split holds {len(val_ids)} tokens and its training split {len(train_ids)}; "
                        f"each needs at least {longest + 1}: give a longer text")
    runs_ = {name: [] for name in recipes}
    for seed in range(seeds):
        for name in recipes:
            recipe = RECIPES[name]
            model, tc = _configs(recipe, source.tokenizer.vocab_size, steps_scale)
            windows = data.eval_windows(val_ids, model.max_len, EVAL_WINDOWS * model.max_len)
            params = model.init(jax.random.key(seed))                   # the same weights for every recipe
            batches = _batches(train_ids, seed, tc.steps, tc.batch_size, model.max_len)
            run = _run_torch if recipe["framework"] == "torch" else _run_jax
            curve = run(model, tc, params, batches, np.asarray(windows[:len(windows)]), eval_every)
            runs_[name].append({"seed": seed, "steps": tc.steps, "curve": curve})
            print(f"  {name} seed {seed}: best validation loss {min(p['val_loss'] for p in curve):.4f} "
                  f"after {curve[-1]['seconds']:.1f} s of training", flush=True)
    yardstick = recipes[0]
    target = statistics.median(min(p["val_loss"] for p in r["curve"]) for r in runs_[yardstick])
    summary = {}
    for name, rs in runs_.items():
        reached = [next(((p["seconds"], p["step"]) for p in r["curve"] if p["val_loss"] <= target), None)
                   for r in rs]
        times = [t for t, _ in filter(None, reached)]
        summary[name] = {"reached": f"{len(times)} of {len(rs)}",
                         "seconds_median": statistics.median(times) if times else None,
                         "seconds_spread": [min(times), max(times)] if times else None,
                         "steps_median": statistics.median(s for _, s in filter(None, reached)) if times else None,
                         "best_val_loss_median": statistics.median(min(p["val_loss"] for p in r["curve"]) for r in rs)}
    base = summary[yardstick]["seconds_median"]
    for row in summary.values():
        row["time_ratio"] = None if base is None or row["seconds_median"] is None else row["seconds_median"] / base
    return {"target": target, "yardstick": yardstick, "eval_windows": EVAL_WINDOWS, "eval_every": eval_every,
            "seeds": seeds, "recipes": {name: RECIPES[name] for name in recipes}, "summary": summary, "runs": runs_}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, rs) in enumerate(result["runs"].items()):
        for j, r in enumerate(rs):
            ax.plot([p["seconds"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], color=f"C{i}",
                    alpha=0.8, label=name if j == 0 else None)
    ax.axhline(result["target"], color="gray", linestyle="--", label=f"target {result['target']:.3f}")
    ax.set(xlabel="training seconds (evaluation excluded)", ylabel="validation loss (nats per char)",
           ylim=(result["target"] - 0.3, result["target"] + 1.0))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=SHARED_TEXT, help="the text (default: ../shared/data/tinyshakespeare.txt)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per recipe (default 3)")
    p.add_argument("--eval-every", type=positive_int, default=50, help="steps between validations (default 50)")
    p.add_argument("--steps-scale", type=float, default=1.0, help="every recipe's steps and warm-up times this "
                   "(default 1; the tests run 0.01)")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                   help="the first is the yardstick (default: all)")
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    p.add_argument("--plot", metavar="FILE", help="draw validation loss against training time here (matplotlib)")
    args = p.parse_args(argv)
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path:
            check_output_path(p, path, flag)
    if not 0 < args.steps_scale <= 10:
        p.error(f"--steps-scale {args.steps_scale}: give a number in (0, 10]")
    if not os.path.isfile(args.data):
        p.error(f"--data {args.data!r}: no such file (Tiny Shakespeare lives in ../shared/data/)")
    if "torch" in {RECIPES[r]["framework"] for r in args.recipes}:
        try:
            import torch  # noqa: F401
        except ImportError:
            p.error("the torch-adamw recipe needs PyTorch (pip install torch), or leave it out with --recipes")
    try:
        with open(args.data, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        p.error(f"--data {args.data!r}: cannot read it as UTF-8 text ({e})")
    from minitx_fn.errors import Error
    try:
        result = {**measure(text, args.seeds, args.steps_scale, args.eval_every, args.recipes),
                  "device": device_info(), "versions": versions()}
    except Error as e:
        p.error(f"--data {args.data!r}: {e}")
    print(f"target: validation loss {result['target']:.4f} ({result['yardstick']}'s best, median over seeds)")
    print("| recipe | reached | seconds (median) | spread | steps (median) | against the yardstick |")
    print("|---|---|---|---|---|---|")
    for name, row in result["summary"].items():
        shown = (lambda x, f: "-" if x is None else f.format(x))
        spread = "-" if row["seconds_spread"] is None else "{:.1f}-{:.1f}".format(*row["seconds_spread"])
        print(f"| {name} | {row['reached']} | {shown(row['seconds_median'], '{:.1f}')} | {spread} | "
              f"{shown(row['steps_median'], '{:.0f}')} | {shown(row['time_ratio'], '{:.2f}x')} |")
    if args.json:
        runs.write_whole(args.json, json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
