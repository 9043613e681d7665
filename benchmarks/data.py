"""The data benchmark: preparing, training on and evaluating a corpus far larger than
Tiny Shakespeare, on a deterministic text this script writes itself.

    python -m benchmarks.data                          1 GB, every tokenizer (about 35 minutes on 2 cores, 13 of them BPE)
    python -m benchmarks.data --size-mb 64 --tokenizers char,byte --json data.json

The text: this Python's standard-library sources (`*.py` under `sysconfig`'s stdlib,
sorted by path), concatenated and repeated to --size-mb (its SHA-256 is reported, so
the same Python gives the same text). What is measured:

1. `minitx prepare` per tokenizer, each in a fresh process: wall time, MB/s and the
   process's peak resident memory (its VmHWM, read by the process as it ends).
2. `minitx train` once prepared (baby config, memory-mapped batches): the seconds
   its data check takes (the text's SHA-256, the cache's manifest and token file),
   the seconds from the process's start to "Starting training..." (imports, that
   check, the memory map, the validation sample, initialisation), then to the first
   step's line (the step's compilation included), and its peak resident memory.
3. Training throughput at the baby config: the memory-mapped path (host gather +
   prefetch) against the device-resident path (the first 64M training tokens held on
   the device), the same compiled step, in alternating blocks; the ratio is paired.
4. Evaluation time with the default --eval-tokens at validation splits of several
   sizes (prefixes of the prepared tokens), and the whole-split time for the smallest.
"""

from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np

from benchmarks import common


def write_corpus(path: str, size_mb: int) -> str:
    """Write the deterministic text to path; returns its SHA-256."""
    sources = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    pieces = []
    for source in sources:
        try:
            with open(source, "rb") as f:
                raw = f.read()
            raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        pieces.append(raw)
    cycle = b"".join(pieces)
    target = size_mb << 20
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        written = 0
        while written < target:
            piece = cycle[:target - written]
            if len(piece) < len(cycle):              # the last, partial copy ends on a character boundary
                piece = piece.decode("utf-8", "ignore").encode("utf-8")
            if not piece:
                break
            f.write(piece)
            digest.update(piece)
            written += len(piece)
    return digest.hexdigest()


# `minitx ARGS`, the command as a user runs it, in a process of its own that ends by
# printing its peak resident memory (VmHWM). Not the rusage of the child: Linux starts
# a forked child's maximum at its parent's size.
_MINITX_REPORTING_PEAK = ("import sys\nfrom minitx_fn.cli import main\ncode = main(sys.argv[1:])\n"
                          "print('peak_rss_kb', *[line.split()[1] for line in open('/proc/self/status')\n"
                          "      if line.startswith('VmHWM')], flush=True)\nsys.exit(code)")


def _minitx(*args: str) -> list[str]:
    return [sys.executable, "-c", _MINITX_REPORTING_PEAK, *args]


def _timed_process(argv: list[str], marks: tuple[str, ...] = ()) -> dict:
    """Run argv (a `_minitx` command); wall seconds, the seconds at which each mark
    first appeared in its output, and its peak resident MB."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    seen, lines = {}, []
    for line in process.stdout:
        lines.append(line)
        for mark in marks:
            if mark not in seen and line.startswith(mark):
                seen[mark] = time.perf_counter() - started
    if process.wait() != 0:
        raise SystemExit(f"{' '.join(argv[3:])} failed ({process.returncode}):\n{''.join(lines[-20:])}")
    peak = [line.split()[1] for line in lines if line.startswith("peak_rss_kb")]
    return {"wall_s": time.perf_counter() - started, "marks_s": seen,
            "peak_rss_mb": int(peak[0]) / 1024 if peak else float("nan"), "output": "".join(lines)}


def bench_prepare(path: str, cache: str, kinds: list[str], size_mb: float) -> list[dict]:
    rows = []
    for kind in kinds:
        result = _timed_process(_minitx("prepare", "--data", path, "--tokenizer", kind, "--cache-dir", cache))
        rows.append({"tokenizer": kind, "wall_s": round(result["wall_s"], 1),
                     "mb_per_s": round(size_mb / result["wall_s"], 1), "peak_rss_mb": round(result["peak_rss_mb"])})
        print(f"prepare {kind}: {rows[-1]}", flush=True)
    return rows


def bench_first_step(path: str, cache: str, out_dir: str) -> dict:
    result = _timed_process(_minitx("train", "--data", path, "--cache-dir", cache, "--preset", "shakespeare-baby",
                                    "--steps", "20", "--log-every", "1", "--eval-every", "1000", "--save-every",
                                    "1000", "--max-new-tokens", "1", "--out", out_dir),
                            marks=("Starting training...", "Step 1,"))
    marks = result["marks_s"]
    checked = re.search(r"text and cache checked in ([0-9.]+) s", result["output"])
    row = {"data_check_s": float(checked.group(1)) if checked else None,
           "to_starting_s": round(marks["Starting training..."], 2), "to_first_step_s": round(marks["Step 1,"], 2),
           "peak_rss_mb": round(result["peak_rss_mb"]),
           "batches": next(line for line in result["output"].splitlines() if line.startswith("Batches:"))}
    print(f"train: {row}", flush=True)
    return row


def bench_throughput(ids: np.ndarray, boundary: int, vocab_size: int, *, blocks: int, steps: int) -> dict:
    """Tokens/s of the same compiled baby step fed by the two batch paths."""
    import jax
    import jax.numpy as jnp

    from minitx_fn import data, train
    from minitx_fn.config import TrainConfig

    spec = common.CONFIGS["baby"]
    mc = common.model_config({**spec, "vocab_size": vocab_size})
    tc = TrainConfig(batch_size=spec["batch"])
    b, t = spec["batch"], mc.max_len
    train_ids = ids[:boundary]
    resident = jnp.asarray(np.asarray(train_ids[:1 << 26], np.int32))
    key = train.keys(0).data
    step = functools.partial(train.train_step, model=mc, optimizer_config=tc.optimizer)
    states = {name: train.init_state(jax.random.key(0), mc, tc.optimizer) for name in ("memmap", "device")}
    at = {"memmap": 0, "device": 0}
    prefetch = data.Prefetcher(lambda s: data.host_batch_at(train_ids, key, s, batch_size=b, context=t), start=0)

    def run(name: str):
        def go():
            state = states[name]
            for _ in range(steps):
                batch = prefetch(at["memmap"]) if name == "memmap" else train.batch_at(
                    resident, key, at["device"], batch_size=b, context=t)
                at[name] += 1
                state, metrics = step(state, batch)
            states[name] = state
            return metrics["loss"]
        return go

    try:
        times = common.alternate({"memmap": run("memmap"), "device": run("device")}, blocks=blocks, per_block=1)
    finally:
        prefetch.close()
    per_s = {name: steps * b * t / statistics.median(sum(block) for block in blocks_)
             for name, blocks_ in times.items()}
    row = {"memmap_tokens_per_s": round(per_s["memmap"]), "device_tokens_per_s": round(per_s["device"]),
           "memmap_over_device_time": round(common.paired_ratio(times["memmap"], times["device"]), 3),
           "steps_per_block": steps, "blocks": blocks}
    print(f"throughput: {row}", flush=True)
    return row


def bench_eval(ids: np.ndarray, vocab_size: int, sizes_mb: list[int], reps: int) -> list[dict]:
    import jax

    from minitx_fn import data, train
    from minitx_fn.defaults import DEFAULT_EVAL_TOKENS

    mc = common.model_config({**common.CONFIGS["baby"], "vocab_size": vocab_size})
    params = mc.init(jax.random.key(0))
    rows = []
    for size in sizes_mb:
        val = ids[:min(size << 20, len(ids))]
        for label, max_tokens in (("default", DEFAULT_EVAL_TOKENS if len(val) > DEFAULT_EVAL_TOKENS else None),
                                  ("all", None)):
            if label == "all" and size != sizes_mb[0]:
                continue
            windows = data.eval_windows(val, mc.max_len, max_tokens)
            train.evaluate(params, data.Windows(val, windows.starts[:64], mc.max_len), model=mc)   # compile
            seconds = statistics.median(
                _seconds(lambda: train.evaluate(params, windows, model=mc)) for _ in range(reps))
            rows.append({"validation_mb": size, "eval_tokens": label, "windows": len(windows),
                         "seconds": round(seconds, 2)})
            print(f"eval: {rows[-1]}", flush=True)
    return rows


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=common.positive_int, default=1024, help="size of the text (default 1024)")
    parser.add_argument("--tokenizers", default="char,byte,bpe", help="prepared and timed (default char,byte,bpe)")
    parser.add_argument("--dir", help="where the text, cache and run go (default: a new temporary folder)")
    parser.add_argument("--eval-sizes-mb", default="1,10,100,1000", help="validation split sizes to evaluate")
    parser.add_argument("--blocks", type=common.positive_int, default=5, help="alternating throughput blocks")
    parser.add_argument("--steps", type=common.positive_int, default=20, help="train steps per block")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    kinds = [k for k in args.tokenizers.split(",") if k]
    if not kinds or any(k not in ("char", "byte", "bpe") for k in kinds):
        parser.error("--tokenizers is a comma-separated list of char, byte, bpe")
    try:
        eval_sizes = [int(s) for s in args.eval_sizes_mb.split(",")]
    except ValueError:
        parser.error("--eval-sizes-mb is a comma-separated list of whole numbers")
    folder = args.dir or tempfile.mkdtemp(prefix="minitx-data-bench-")
    os.makedirs(folder, exist_ok=True)
    path, cache = os.path.join(folder, "corpus.txt"), os.path.join(folder, "cache")
    started = time.perf_counter()
    sha256 = write_corpus(path, args.size_mb)
    size_mb = os.path.getsize(path) / 2**20
    print(f"text: {path}, {size_mb:,.0f} MiB, SHA-256 {sha256} ({time.perf_counter() - started:.0f} s)", flush=True)
    result = {"text": {"mib": round(size_mb, 1), "sha256": sha256}, "device": common.device_info(),
              "versions": common.versions(), "prepare": bench_prepare(path, cache, kinds, size_mb * 2**20 / 1e6)}
    if "char" in kinds:
        result["train"] = bench_first_step(path, cache, os.path.join(folder, "run"))
        from minitx_fn import corpus
        prepared = corpus.prepare(path, "char", cache_dir=cache, out=open(os.devnull, "w"))
        result["throughput"] = bench_throughput(prepared.ids, prepared.boundary, prepared.tokenizer.vocab_size,
                                                blocks=args.blocks, steps=args.steps)
        result["eval"] = bench_eval(prepared.validation if len(prepared.validation) >= max(eval_sizes) << 20
                                    else prepared.ids, prepared.tokenizer.vocab_size, eval_sizes, reps=3)
    if args.json:
        from minitx_fn import runs
        runs.write_whole(args.json, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("versions",)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
