"""Gradient accumulation: the memory a step needs, and its time, for K micro-batches.

    python -m benchmarks.accumulate                          baby, B = 64, K = 1, 4, 16
    python -m benchmarks.accumulate --config tiny --batch 32 --accumulate 1 2 4 8

For each K the jitted step (`train.train_step(..., accumulate=K)`) is compiled for one
global batch of B sequences; XLA's own memory analysis of the compiled step gives the
bytes its temporaries take (activations, gradients in flight: what accumulation
shrinks), and the step is timed (median of --reps, after a warm-up). The parameters,
Adam's moments and the batch are the same for every K and are reported once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.common import CONFIGS, check_output_path, device_info, model_config, positive_int, versions
from minitx_fn import runs, train
from minitx_fn.config import TrainConfig


def measure(name: str, batch: int, accumulate: list[int], reps: int) -> dict:
    mc = model_config(CONFIGS[name])
    tc = TrainConfig(steps=1000, batch_size=batch, optimizer={"warmup": 10})
    x = jnp.zeros((batch, mc.max_len), jnp.int32)
    rows = []
    for k in accumulate:
        state = train.init_state(jax.random.key(0), mc, tc.optimizer)
        compiled = train.train_step.lower(state, (x, x), model=mc, optimizer_config=tc.optimizer,
                                          accumulate=k).compile()
        analysis = compiled.memory_analysis()
        state, metrics = compiled(state, (x, x))                       # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            state, metrics = compiled(state, (x, x))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - started)
        rows.append({"accumulate": k, "micro_batch": batch // k,
                     "temp_mb": round(analysis.temp_size_in_bytes / 1e6, 2),
                     "arguments_mb": round(analysis.argument_size_in_bytes / 1e6, 2),
                     "step_ms_median": round(1e3 * statistics.median(times), 2)})
        print(json.dumps(rows[-1]), flush=True)
    return {"config": name, "batch": batch, "device": device_info(), "versions": versions(), "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accumulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="baby")
    p.add_argument("--batch", type=positive_int, default=64, help="global batch B (default 64)")
    p.add_argument("--accumulate", type=positive_int, nargs="+", default=[1, 4, 16], help="K values (default 1 4 16)")
    p.add_argument("--reps", type=positive_int, default=5, help="timed steps per K (default 5)")
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    args = p.parse_args(argv)
    bad = [k for k in args.accumulate if args.batch % k]
    if bad:
        p.error(f"--accumulate {bad} must divide --batch {args.batch}")
    if args.json:
        check_output_path(p, args.json, "--json")
    result = measure(args.config, args.batch, args.accumulate, args.reps)
    if args.json:
        runs.write_whole(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
