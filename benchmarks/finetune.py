"""Fine-tuning with numbers, no download: pretrain, export, import, fine-tune (full and
LoRA), against training from scratch.

    python -m benchmarks.finetune                  Tiny Shakespeare from ../shared/data
    python -m benchmarks.finetune --data FILE --pretrain-steps 200 --steps 100

1. A small GPT-2-shaped model (learned positions, tied embeddings, byte tokenizer)
   pretrains on the first half of the text.
2. It is exported as a Hugging Face GPT-2 folder (`hf.export_run`) and imported back
   (`hf.import_run`), the path a downloaded GPT-2 takes.
3. Three runs of the same length train on the second half: from scratch, a full
   fine-tune of the imported model, and LoRA on it. They share the tokenizer, so the
   same validation windows (the last 10% of the second half).

Per run: the validation loss before and after, the curve, the time, the checkpoint's
size (params.npz + opt_state.npz), and the memory XLA's analysis gives the compiled
step (its arguments and temporaries; the trained state and the frozen base are
among the arguments). The curves go to a picture, the rows to JSON.

4. The same memory analysis at GPT-2 small's size (--memory-config, abstract shapes:
   nothing is allocated or run), for a full fine-tune and LoRA on the attention
   projections and on every matrix.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

from benchmarks.common import CONFIGS, SHARED_TEXT, check_output_path, device_info, model_config, positive_int, versions
from minitx_fn import checkpoint, hf, job, model, runs, train
from minitx_fn.config import LoraConfig, TrainConfig

# GPT-2's two choices on a CONFIGS model: learned positions and the embedding as the head.
GPT2_SHAPE = {"dropout": 0.0, "positions": "learned", "tie_embeddings": True}
MODES = ("scratch", "full", "lora")


def step_memory_mb(result: job.Result) -> dict:
    """XLA's memory analysis of the run's compiled step: arguments (state, batch, and a
    LoRA run's base) and temporaries, in MB."""
    mc, tc = result.model, result.train_config
    x = jnp.zeros((tc.batch_size, mc.max_len), jnp.int32)
    args = (result.state, (x, x)) + (() if result.base is None else (result.base,))
    return _analysis_mb(train.train_step.lower(*args, model=mc, optimizer_config=tc.optimizer, seed=tc.seed,
                                               accumulate=tc.grad_accum, lora=tc.lora).compile())


def _analysis_mb(compiled) -> dict:
    analysis = compiled.memory_analysis()
    return {"arguments_mb": round(analysis.argument_size_in_bytes / 1e6, 2),
            "temp_mb": round(analysis.temp_size_in_bytes / 1e6, 2)}


def memory_at(name: str, context: int, batch: int, rank: int) -> list[dict]:
    """The compiled step's memory for a full fine-tune and LoRA (attn, all) of a
    CONFIGS model, from abstract shapes (jax.eval_shape): compiled, never run."""
    mc = model_config(CONFIGS[name], max_len=context)
    oc, key = TrainConfig(steps=100).optimizer, jax.random.key(0)
    x = jax.ShapeDtypeStruct((batch, context), jnp.int32)
    base = jax.eval_shape(mc.init, key)
    rows = []
    for targets in (None, "attn", "all"):
        lora = None if targets is None else LoraConfig(rank=rank, targets=targets)
        if lora is None:
            args = (jax.eval_shape(lambda: train.init_state(key, mc, oc)), (x, x))
        else:
            args = (jax.eval_shape(lambda: train.lora_state(key, mc, base, oc, lora)), (x, x), base)
        compiled = train.train_step.lower(*args, model=mc, optimizer_config=oc, lora=lora).compile()
        rows.append({"mode": "full" if lora is None else f"lora {targets}", **_analysis_mb(compiled)})
        print(json.dumps({"config": name, "context": context, "batch": batch, **rows[-1]}), flush=True)
    return rows


def checkpoint_mb(run_dir: str) -> float:
    files = checkpoint.load(run_dir).meta["files"]
    return round(sum(f["bytes"] for f in files.values()) / 1e6, 3)


def gpt2_shaped(name: str) -> dict:
    """The model fields of a CONFIGS entry (vocab_size and batch aside), GPT-2-shaped."""
    return {**{k: v for k, v in CONFIGS[name].items() if k not in ("vocab_size", "batch")}, **GPT2_SHAPE}


def measure(text_path: str, work: str, config: str, pretrain_steps: int, steps: int, batch: int, eval_every: int,
            lr: dict, lora_rank: int, lora_alpha: float, log) -> dict:
    shape = gpt2_shaped(config)
    text = open(text_path, encoding="utf-8").read()
    half = len(text) // 2
    first, second = os.path.join(work, "first-half.txt"), os.path.join(work, "second-half.txt")
    open(first, "w", encoding="utf-8").write(text[:half])
    open(second, "w", encoding="utf-8").write(text[half:])
    quiet = io.StringIO()
    cadence = {"batch_size": batch, "eval_every": eval_every, "log_every": eval_every, "save_every": steps}
    print(f"pretraining {pretrain_steps} steps on the first half ({half:,} characters)", file=log, flush=True)
    pre = job.train(first, tokenizer="byte", model=shape, run_dir=os.path.join(work, "pretrained"), sample_tokens=0,
                    training={**cadence, "steps": pretrain_steps, "optimizer": {"lr": lr["pretrain"]},
                              "save_every": pretrain_steps}, log=quiet)
    hf.export_run(pre.run_dir, os.path.join(work, "hf"))
    imported = os.path.join(work, "imported")
    hf.import_run(os.path.join(work, "hf"), imported, log=quiet)
    rows = {}
    for mode in MODES:
        settings = {"training": {**cadence, "steps": steps, "optimizer": {"lr": lr[mode]}}}
        if mode == "scratch":
            settings.update(tokenizer="byte", model=shape)
        else:
            settings["init_from"] = imported
        if mode == "lora":
            settings["training"]["lora"] = {"rank": lora_rank, "alpha": lora_alpha, "targets": "all"}
        plan = job.plan(job.make(second, run_dir=os.path.join(work, mode), sample_tokens=0, **settings), log=quiet)
        # Where a fine-tune starts: the imported model (a LoRA run's base, its adapters still 0).
        start_params = None if mode == "scratch" else plan.base if plan.base is not None else plan.state.params
        start_loss = None if start_params is None else train.evaluate(start_params, plan.val_windows,
                                                                      model=plan.model)
        print(f"{mode}: {steps} steps on the second half", file=log, flush=True)
        result = job.run(plan, log=quiet)
        curve = [(r["step"], r["val_loss"]) for r in result.records if "val_loss" in r]
        rows[mode] = {"mode": mode, "lr": lr[mode], "val_loss_start": start_loss, "val_loss": curve[-1][1],
                      "curve": curve, "seconds": round(result.elapsed, 1),
                      "trained_parameters": model.count_params(result.state.params),
                      "checkpoint_mb": checkpoint_mb(result.run_dir), **step_memory_mb(result)}
        print(json.dumps({k: v for k, v in rows[mode].items() if k != "curve"}), file=log, flush=True)
    return {"data": os.path.abspath(text_path), "config": config, "model": shape, "pretrain_steps": pretrain_steps,
            "pretrain_val_loss": [r["val_loss"] for r in pre.records if "val_loss" in r][-1],
            "steps": steps, "batch": batch, "lora": {"rank": lora_rank, "alpha": lora_alpha, "targets": "all"},
            "device": device_info(), "versions": versions(), "rows": [rows[m] for m in MODES]}


def draw(result: dict, path: str) -> None:
    """The three validation curves on the second half."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for row in result["rows"]:
        start = [] if row["val_loss_start"] is None else [(0, row["val_loss_start"])]    # a fine-tune's step 0
        steps, losses = zip(*(start + [tuple(point) for point in row["curve"]]))
        ax.plot(steps, losses, marker=".", label=f"{row['mode']} (lr {row['lr']:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title("Second half of Tiny Shakespeare: from scratch vs fine-tuned", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=SHARED_TEXT, help="a UTF-8 text (default: ../shared/data/tinyshakespeare.txt)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="baby", help="the model's sizes, made GPT-2-shaped "
                   "(default baby: nanoGPT's baby GPT)")
    p.add_argument("--pretrain-steps", type=positive_int, default=1000)
    p.add_argument("--steps", type=positive_int, default=500, help="steps of each run on the second half")
    p.add_argument("--batch", type=positive_int, default=12)
    p.add_argument("--eval-every", type=positive_int, default=50)
    p.add_argument("--lora-rank", type=positive_int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lr-pretrain", type=float, default=1e-3)
    p.add_argument("--lr-scratch", type=float, default=1e-3)
    p.add_argument("--lr-full", type=float, default=3e-4)
    p.add_argument("--lr-lora", type=float, default=2e-3)
    p.add_argument("--memory-config", choices=sorted(CONFIGS), default="gpt2-small",
                   help="the model of the memory table (default gpt2-small)")
    p.add_argument("--memory-context", type=positive_int, default=256)
    p.add_argument("--memory-batch", type=positive_int, default=1)
    p.add_argument("--work", metavar="DIR", help="where the runs go (default: a new temporary folder)")
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    p.add_argument("--plot", metavar="FILE", help="draw the three validation curves here (needs matplotlib)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.data):
        p.error(f"--data {args.data!r} is not a file; give a UTF-8 text (Tiny Shakespeare: ../shared/data)")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_path(p, path, flag)
    if args.work and os.path.exists(args.work):
        p.error(f"--work {args.work!r} exists; give a new folder")
    work = args.work or tempfile.mkdtemp(prefix="minitx-finetune-")
    os.makedirs(work, exist_ok=True)
    lr = {"pretrain": args.lr_pretrain, "scratch": args.lr_scratch, "full": args.lr_full, "lora": args.lr_lora}
    result = measure(args.data, work, args.config, args.pretrain_steps, args.steps, args.batch, args.eval_every, lr,
                     args.lora_rank, args.lora_alpha, log=sys.stdout)
    result["memory"] = {"config": args.memory_config, "context": args.memory_context, "batch": args.memory_batch,
                        "lora_rank": args.lora_rank, "rows": memory_at(args.memory_config, args.memory_context,
                                                                      args.memory_batch, args.lora_rank)}
    print(f"runs kept in {work}")
    if args.json:
        runs.write_whole(args.json, json.dumps(result, indent=1) + "\n")
    if args.plot:
        draw(result, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
