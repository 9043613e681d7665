"""Where a minitx_fn train step spends its time, per XLA operation.

    python -m benchmarks.profile_step medium
    python -m benchmarks.profile_step medium --option remat=none --top 40

Traces three compiled steps with `jax.profiler` (XLA:CPU's per-operation events
switched on with --xla_cpu_enable_xprof_traceme), sums each operation's time over
the XLA worker threads and groups operations by output shape and the JAX operation
they came from (HLO metadata). Operations of different threads can overlap, so the
sum may exceed the step's wall time; read it for proportions. This is how the
"scan bookkeeping" and per-matmul figures of benchmarks/NOTES.md were found.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

from benchmarks.common import (CONFIGS, check_options, model_config, model_option, positive_int,  # noqa: E402
                               timed)
from minitx_fn import train  # noqa: E402
from minitx_fn.config import TrainConfig  # noqa: E402


def _op_origins(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (output shape, the JAX operation in its metadata)."""
    origins = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            name = re.sub(r".*/closed_call/", "", op.group(1)).replace("jit(train_step)/", "") if op else ""
            origins[m.group(1)] = (m.group(2).split("{")[0], name[-60:])
    return origins


def operation_times(fn, hlo_text: str, reps: int) -> list[tuple[str, int, int, str, str]]:
    """Trace `reps` calls of fn (which must block until done) with `jax.profiler`, and
    sum each XLA operation's time over XLA:CPU's worker threads: (name, total ns,
    calls, output shape, the JAX operation it came from) per operation of the compiled
    program whose text is hlo_text."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(reps):
                fn()
        profile = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    per_op, calls = collections.Counter(), collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):                    # XLA:CPU's worker threads
                continue
            for event in line.events:
                if not event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    per_op[event.name] += event.duration_ns
                    calls[event.name] += 1
    origins = _op_origins(hlo_text)
    return [(op, ns, calls[op], *origins.get(op, ("?", ""))) for op, ns in per_op.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("config", choices=sorted(CONFIGS))
    p.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE", type=model_option)
    p.add_argument("--top", type=positive_int, default=30, help="rows to print")
    args = p.parse_args(argv)
    check_options(p, [args.config], dict(args.option))

    spec, traced = CONFIGS[args.config], 3
    mc = model_config(spec, **dict(args.option))
    tc = TrainConfig(steps=1000, batch_size=spec["batch"], optimizer={"warmup": 10})
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (spec["batch"], mc.max_len + 1), 0, mc.vocab_size)
    batch = (tokens[:, :-1], tokens[:, 1:])
    state = [train.init_state(key, mc, tc.optimizer)]
    with jax.numpy_dtype_promotion("standard"):
        step = train.train_step.lower(state[0], batch, model=mc, optimizer_config=tc.optimizer).compile()

    def one():
        state[0], metrics = step(state[0], batch)
        return metrics

    for _ in range(2):
        timed(one)
    wall = statistics.median(timed(one) for _ in range(5))
    ops = operation_times(lambda: timed(one), step.as_text(), traced)
    grouped, grouped_calls = collections.Counter(), collections.Counter()
    for op, ns, n_calls, shape, origin in ops:
        group = (shape, origin or re.sub(r"\.\d+$", "", op))
        grouped[group] += ns
        grouped_calls[group] += n_calls
    print(f"{args.config}: median step {1e3 * wall:.1f} ms; operations summed over threads "
          f"{sum(op[1] for op in ops) / traced / 1e6:.1f} ms per step")
    print("| ms per step | calls per step | output shape | from |")
    print("|---|---|---|---|")
    for (shape, origin), ns in grouped.most_common(args.top):
        print(f"| {ns / traced / 1e6:.2f} | {grouped_calls[(shape, origin)] / traced:.1f} | `{shape}` | `{origin}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
