"""Paired timing of minitx_fn train steps under ModelConfig variants, in one process.

    python -m benchmarks.variants medium remat=none remat=matmuls
    python -m benchmarks.variants baby "scan_layers=false,remat=none" ""

Each argument is one variant: comma-separated FIELD=VALUE changes to the config's
defaults ("" is the defaults). Every variant is compiled first; then they run in
turns, --blocks times, --steps steps each (every step ends in block_until_ready),
on the same batch. A variant's ratio is the median over turns of its median step
time over the first variant's in the same turn, so a shared machine's drift hits
them alike. This is how the entries of benchmarks/NOTES.md were measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax

from benchmarks.run import CONFIGS, _model_option, _sync, check_options, model_config
from minitx_fn import train
from minitx_fn.config import TrainConfig


def _variant(text: str) -> dict:
    return dict(_model_option(part) for part in text.split(",") if part)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.variants", description=__doc__.split("\n\n")[0])
    p.add_argument("config", choices=sorted(CONFIGS))
    p.add_argument("variants", nargs="+", type=_variant, help='e.g. "remat=none,attention_block=0"; "" = defaults')
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per turn")
    p.add_argument("--blocks", type=int, default=4, help="turns")
    args = p.parse_args(argv)

    for changes in args.variants:
        check_options(p, [args.config], changes)
    spec = CONFIGS[args.config]
    tc = TrainConfig(steps=1000, batch_size=spec["batch"], warmup=10)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (spec["batch"], spec["max_len"] + 1), 0, spec["vocab_size"])
    x, y = tokens[:, :-1], tokens[:, 1:]
    runs = []
    with jax.numpy_dtype_promotion("standard"):
        for changes in args.variants:
            mc = model_config(spec, **changes)
            state = train.init_state(key, mc, tc)
            t0 = time.perf_counter()
            step = train.update.lower(state, x, y, model_config=mc, train_config=tc).compile()
            runs.append({"label": ",".join(f"{k}={v}" for k, v in changes.items()) or "defaults", "step": step,
                         "state": state, "compile_s": time.perf_counter() - t0, "medians": []})
        for run in runs:                                            # warm-up
            for _ in range(2):
                run["state"], out = run["step"](run["state"], x, y)
                _sync(out)
        for _ in range(args.blocks):
            for run in runs:
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    run["state"], out = run["step"](run["state"], x, y)
                    _sync(out)
                    times.append(time.perf_counter() - t0)
                run["medians"].append(statistics.median(times))
    base = runs[0]["medians"]
    print(f"{args.config}: {args.blocks} turns of {args.steps} steps; ratio = paired median over turns")
    print("| variant | compile s | step ms (median of turns) | ratio to first |")
    print("|---|---|---|---|")
    for run in runs:
        ratio = statistics.median(a / b for a, b in zip(run["medians"], base))
        print(f"| {run['label']} | {run['compile_s']:.2f} | {1e3 * statistics.median(run['medians']):.1f} | "
              f"{ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
