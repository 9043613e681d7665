"""Everything a short GPU session should measure, in one command:

    python -m benchmarks.gpu                 # on the GPU machine: about 8 minutes
    python -m benchmarks.gpu --smoke         # the same steps at toy sizes, on a CPU, in seconds (tested in CI)

Steps, most important first, each logged to OUT/NN-name.log and never stopping the
ones after it:

  1. env           the device, its memory and the versions
  2. bench-bf16    python -m benchmarks --suite full --dtype bfloat16 (tiny, baby,
                   medium, GPT-2-small shape; matmul peaks, copy bandwidth), JSON + picture
  3. recipe        minitx train --preset shakespeare-char on Tiny Shakespeare (nanoGPT:
                   validation loss 1.4697 in about 3 minutes on an A100)
  4. tests         the tests of the accelerator path: model, float32 equivalence,
                   generation, training, bfloat16
  5. bench-f32     the same benchmark in float32
  6. variants      the remat policy and attention block size, re-decided on this device
                   (benchmarks/NOTES.md says why they were chosen on a CPU)
  7. summary       OUT/summary.md: the figures the README and NOTES quote

OUT is --out, else $OUT (the device tool's folder), else ./gpu-results; give each
run a fresh one, as the recipe's run directory OUT/shakespeare-char is never
overwritten (a second run into the same OUT reports that step failed). The recipe
reads --data, else ../shared/data/tinyshakespeare.txt, else data/tinyshakespeare.txt
(`minitx data shakespeare` fetches it where there is a network).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"), os.path.join("data", "tinyshakespeare.txt")]
TESTS = ["tests/test_model.py", "tests/test_model_reference.py", "tests/test_layers.py", "tests/test_generate.py",
         "tests/test_train.py"]


def _bench_args(smoke: bool, dtype: str, out: str) -> list[str]:
    sizes = ["--configs", "micro", "--steps", "1", "--blocks", "1", "--new-tokens", "4", "--loop-steps", "1",
             "--no-torch", "--option", "attention_block=4", "--decode-batches", "2", "--peak-n", "128"
             ] if smoke else ["--suite", "full"]
    return [*sizes, "--dtype", dtype, "--json", os.path.join(out, f"bench-{dtype}.json"),
            "--plot", os.path.join(out, f"bench-{dtype}.png")]


def _recipe(smoke: bool, out: str) -> dict:
    """The settings of `job.train` for nanoGPT's GPU recipe (`minitx train --data DATA --preset shakespeare-char`)."""
    settings = {"preset": "shakespeare-char", "run_dir": os.path.join(out, "shakespeare-char")}
    if smoke:   # the preset's wiring at toy sizes: every setting below overrides one of it
        settings.update(model={"d_model": 24, "n_layers": 1, "max_len": 32},
                        training={"steps": 4, "batch_size": 2, "eval_every": 4}, sample_tokens=20)
    return settings


def _env() -> dict:
    import jax

    from benchmarks.common import device_info, versions
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return {"device": device_info(), "versions": versions(),
            "memory_gb": None if not stats else round(stats.get("bytes_limit", 0) / 1e9, 1)}


def _summary(out: str, outcomes: dict) -> str:
    lines = [f"# GPU session, {time.strftime('%Y-%m-%d %H:%M')}", ""]
    env_path = os.path.join(out, "env.json")
    if os.path.exists(env_path):
        lines.append(f"Device: `{json.load(open(env_path))}`")
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {seconds:.0f} |" for name, (status, seconds) in outcomes.items()]
    for dtype in ("bfloat16", "float32"):
        path = os.path.join(out, f"bench-{dtype}.json")
        if os.path.exists(path):
            result = json.load(open(path))
            lines += ["", f"## {dtype}", "", "| config | impl | step ms | MFU | minitx/flax |", "|---|---|---|---|---|"]
            lines += [f"| {r['config']} | {r['impl']} | {r['step_ms_median']:.2f} | {100 * r['mfu']:.1f}% | "
                      f"{r['ratio_minitx_over_flax'] or ''} |" for r in result["train"]]
            if "copy_bandwidth_gbs" in result:
                lines.append(f"\ncopy bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s")
    metrics = os.path.join(out, "shakespeare-char", "metrics.jsonl")
    if os.path.exists(metrics):
        from minitx_fn import runs
        val = [r for r in runs.read_records(metrics).records if "val_loss" in r]
        if val:
            lines += ["", f"shakespeare-char: validation loss {val[-1]['val_loss']:.4f} at step {val[-1]['step']} "
                          f"(best {min(r['val_loss'] for r in val):.4f})"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes, on any device, in seconds")
    p.add_argument("--out", help="results folder (default $OUT, else gpu-results)")
    p.add_argument("--data", help="Tiny Shakespeare for the recipe (default: found beside the repository)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out or os.environ.get("OUT") or "gpu-results")
    os.makedirs(out, exist_ok=True)
    data = args.data or next((t for t in TEXTS if os.path.exists(t)), None)
    if args.smoke and data is None:
        data = os.path.join(out, "smoke-text.txt")
        with open(data, "w") as f:
            f.write("to be or not to be, that is the question. " * 40)

    from benchmarks import run as bench
    from benchmarks import variants
    from minitx_fn import job

    def write_env():
        with open(os.path.join(out, "env.json"), "w") as f:
            json.dump(_env(), f, indent=1)

    def tests():
        selected = ["tests/test_train.py", "-k", "batch_of_a_step"] if args.smoke else TESTS
        # One process (-o addopts= drops pyproject's -n 2): the tests share one GPU, and
        # the GPU image has no pytest-xdist.
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-o", "addopts=", *selected], cwd=ROOT,
                              text=True, capture_output=True, timeout=600)
        print(done.stdout[-5000:], done.stderr[-2000:])
        if done.returncode:
            raise RuntimeError(f"pytest exited {done.returncode}")

    def recipe():
        if data is None:
            raise RuntimeError("no Tiny Shakespeare here; pass --data (minitx data shakespeare fetches it)")
        result = job.train(data, **_recipe(args.smoke, out))
        print(f"Generated text:\n{result.prompt}{result.sample}")

    steps = {
        "env": write_env,
        "bench-bf16": lambda: bench.main(_bench_args(args.smoke, "bfloat16", out)),
        "recipe": recipe,
        "tests": tests,
        "bench-f32": lambda: bench.main(_bench_args(args.smoke, "float32", out)),
        "variants": lambda: variants.main(["micro", "", "remat=none", "--steps", "1", "--blocks", "1"] if args.smoke
                                          else ["gpt2-small", "", "remat=none", "attention_block=0",
                                                "attention_block=256", "--steps", "3", "--blocks", "3"]),
    }
    outcomes = {}
    for i, (name, step) in enumerate(steps.items(), 1):
        started = time.perf_counter()
        log = io.StringIO()
        status = "ok"
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                step()
            except SystemExit as e:
                status = "ok" if not e.code else f"exit {e.code}"
            except Exception:                          # keep going: the other steps' figures still count
                status = "failed"
                traceback.print_exc()
        with open(os.path.join(out, f"{i:02d}-{name}.log"), "w") as f:
            f.write(log.getvalue())
        outcomes[name] = (status, time.perf_counter() - started)
        print(f"{name}: {status} in {outcomes[name][1]:.0f} s", flush=True)
    print(_summary(out, outcomes))
    return 0 if all(status == "ok" for status, _ in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
