"""Why int8 weights do not yet decode faster inside the compiled loop: the same chain of
GPT-2-small-shaped matrix-vector products with int8 weights, timed once as a program of
its own and once inside a `lax.fori_loop`, beside float32 weights.

    python -m benchmarks.int8_loop                       ~1 minute on 2 cores

Eight (3072, 768) products a pass, x (1, 768) float32, weights stored (out, in);
int8 is `(x @ W.astype(f32).T) * s`, converted inside the product (no float copy). The
loop runs four passes; its figure is per pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from benchmarks.common import check_output_path, device_info, positive_int, versions
from minitx_fn import runs

PRODUCTS, D_OUT, D_IN, PASSES = 8, 3072, 768, 4


def _chain(x, weights, scales, int8: bool):
    import jax.numpy as jnp
    for i in range(PRODUCTS):
        w = weights[i].astype(jnp.float32) if int8 else weights[i]
        y = (x @ w.T) * scales[i][None, :]
        x = x + 1e-3 * y.sum()
    return x


def measure(reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    w8 = jnp.asarray(rng.integers(-127, 128, (PRODUCTS, D_OUT, D_IN)).astype(np.int8))
    scales = jnp.full((PRODUCTS, D_OUT), 1e-3, jnp.float32)
    x = jnp.ones((1, D_IN), jnp.float32)
    rows = {}
    for name, weights, int8 in (("float32", w8.astype(jnp.float32), False), ("int8", w8, True)):
        once = jax.jit(lambda x, w, s, int8=int8: _chain(x, w, s, int8).sum())
        looped = jax.jit(lambda x, w, s, int8=int8: jax.lax.fori_loop(
            0, PASSES, lambda i, x: _chain(x, w, s, int8), x).sum())
        for where, fn, passes in (("a program of its own", once, 1), ("inside fori_loop", looped, PASSES)):
            fn(x, weights, scales).block_until_ready()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn(x, weights, scales).block_until_ready()
                times.append((time.perf_counter() - start) / passes)
            rows[f"{name}, {where}"] = {"ms_per_pass": round(1000 * statistics.median(times), 3),
                                        "weights_per_s": PRODUCTS * D_OUT * D_IN / statistics.median(times)}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=positive_int, default=20, help="timed runs of each row (default 20)")
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    args = p.parse_args(argv)
    if args.json:
        check_output_path(p, args.json, "--json")
    result = {"rows": measure(args.reps), "device": device_info(), "versions": versions()}
    print("| weights, where | ms per pass | weights read per second |")
    print("|---|---|---|")
    for name, row in result["rows"].items():
        print(f"| {name} | {row['ms_per_pass']:.2f} | {row['weights_per_s'] / 1e9:.2f} G |")
    if args.json:
        runs.write_whole(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
