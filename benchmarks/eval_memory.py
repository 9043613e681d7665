"""Evaluation at GPT-2 small's shape: the batch `memory.evaluation_batch` sizes from the
memory free, and the peak memory and time of evaluating windows of the full context.

    python -m benchmarks.eval_memory                     GPT-2 small, 64 windows of 1,024: ~3 minutes on 2 cores
    python -m benchmarks.eval_memory --size tiny --windows 4

The model has random weights (what evaluation holds does not depend on them); the
windows are random ids. GPT-2 small's logits are 50,257 floats a position: 64 windows
at once would hold 13 GB of them, twice that with the log-softmax, so the batch is
sized to half the memory available (`memory.evaluation_batch`). Peak memory is the
process's largest resident set (ru_maxrss), compiling included.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

from benchmarks.common import check_output_path, device_info, positive_int, versions
from minitx_fn import runs

SIZES = {"small": dict(vocab_size=50257, d_model=768, n_heads=12, n_layers=12, max_len=1024),
         "tiny": dict(vocab_size=256, d_model=64, n_heads=2, n_layers=2, max_len=64)}


def measure(size: str, windows: int) -> dict:
    import jax

    from minitx_fn import memory, train
    from minitx_fn.config import ModelConfig
    model = ModelConfig(**SIZES[size])
    params = model.init(jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, model.vocab_size, (windows, model.max_len + 1)).astype(np.int32)
    available, batch = memory.available_bytes(), memory.evaluation_batch(model, model.max_len)
    start = time.perf_counter()
    loss = train.evaluate(params, ids, model=model)
    return {"size": size, "windows": windows, "positions": model.max_len, "available_bytes": available,
            "batch": batch, "batch_bytes_estimate": memory.evaluation_bytes(model, batch, model.max_len),
            "seconds": round(time.perf_counter() - start, 1), "loss": loss,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="the model's shape (default small)")
    p.add_argument("--windows", type=positive_int, default=64, help="windows evaluated (default 64, what "
                   "validation during training takes)")
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    args = p.parse_args(argv)
    if args.json:
        check_output_path(p, args.json, "--json")
    result = {**measure(args.size, args.windows), "device": device_info(), "versions": versions()}
    print(f"{args.size}: {result['windows']} windows of {result['positions']} in batches of {result['batch']} "
          f"(estimated {result['batch_bytes_estimate'] / 1e9:.1f} GB a batch, "
          f"{(result['available_bytes'] or 0) / 1e9:.1f} GB available): {result['seconds']} s, "
          f"peak resident memory {result['peak_rss_bytes'] / 1e9:.1f} GB")
    if args.json:
        runs.write_whole(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
