"""Paired timing of minitx_fn train steps under ModelConfig variants, in one process.

    python -m benchmarks.variants medium remat=none remat=matmuls
    python -m benchmarks.variants baby "attention_block=32,remat=none" ""

Each argument is one variant: comma-separated FIELD=VALUE changes to the config's
defaults ("" is the defaults). Every variant is compiled first; then they run in
turns (`common.alternate`), --blocks times, --steps steps each, on the same batch.
A variant's ratio is the paired ratio to the first variant (`common.paired_ratio`).
This is how the entries of benchmarks/NOTES.md were measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax

from benchmarks.common import CONFIGS, alternate, check_options, model_config, model_option, paired_ratio, positive_int
from minitx_fn import train
from minitx_fn.config import TrainConfig


def _variant(text: str) -> dict:
    return dict(model_option(part) for part in text.split(",") if part)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.variants", description=__doc__.split("\n\n")[0])
    p.add_argument("config", choices=sorted(CONFIGS))
    p.add_argument("variants", nargs="+", type=_variant, help='e.g. "remat=none,attention_block=0"; "" = defaults')
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per variant per turn")
    p.add_argument("--blocks", type=positive_int, default=4, help="turns")
    args = p.parse_args(argv)

    for changes in args.variants:
        check_options(p, [args.config], changes)
    spec = CONFIGS[args.config]
    tc = TrainConfig(steps=1000, batch_size=spec["batch"], optimizer={"warmup": 10})
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (spec["batch"], spec["max_len"] + 1), 0, spec["vocab_size"])
    batch = (tokens[:, :-1], tokens[:, 1:])
    labels, steps, compile_s = [], {}, {}
    with jax.numpy_dtype_promotion("standard"):
        for changes in args.variants:
            label = ",".join(f"{k}={v}" for k, v in changes.items()) or "defaults"
            mc = model_config(spec, **changes)
            state = train.init_state(key, mc, tc.optimizer)
            t0 = time.perf_counter()
            compiled = train.train_step.lower(state, batch, model=mc, optimizer_config=tc.optimizer).compile()
            compile_s[label] = time.perf_counter() - t0
            holder = {"state": state}

            def one(compiled=compiled, holder=holder):
                holder["state"], metrics = compiled(holder["state"], batch)
                return metrics

            labels.append(label)
            steps[label] = one
        blocks = alternate(steps, blocks=args.blocks, per_block=args.steps)
    base = blocks[labels[0]]
    print(f"{args.config}: {args.blocks} turns of {args.steps} steps; ratio = paired median over turns")
    print("| variant | compile s | step ms (median of turns) | ratio to first |")
    print("|---|---|---|---|")
    for label in labels:
        turns = [statistics.median(b) for b in blocks[label]]
        print(f"| {label} | {compile_s[label]:.2f} | {1e3 * statistics.median(turns):.1f} | "
              f"{paired_ratio(blocks[label], base):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
