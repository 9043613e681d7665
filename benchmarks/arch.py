"""GPT and Llama side by side: the same recipe, the same data, two configurations of
the same layers.

    python -m benchmarks.arch                          Tiny Shakespeare from ../shared/data
    python -m benchmarks.arch --data FILE --steps 500 --json arch.json

Each row trains nanoGPT's baby recipe (`--preset shakespeare-baby`: D = 128, L = 4,
H = 4, context 64, batch 12, char tokenizer; `--preset` picks another) with one
`--arch` group and the same seed,
then reports the parameters, the validation loss at the end, the training rate
(the median over the logged windows after the first, which holds the compilation),
greedy decoding speed (the median of 3 timed `generate` calls after a warm-up) and
the KV cache's bytes per token (grouped-query attention stores G heads, not H).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile

import numpy as np

from benchmarks.common import SHARED_TEXT, check_output_path, device_info, median_ms, positive_int, versions
from minitx_fn import defaults, generate, job, model, runs

ROWS = {"gpt": defaults.ARCHS["gpt"], "llama": defaults.ARCHS["llama"],
        "llama, 1 kv head": {**defaults.ARCHS["llama"], "n_kv_heads": 1}}


def decode_rate(result: job.Result, new_tokens: int, repeats: int = 3) -> float:
    """Greedy tokens per second from a one-token prompt, median of `repeats` after a warm-up."""
    run = lambda: generate.generate(result.params, [[0]], model=result.model, max_new_tokens=new_tokens)  # noqa: E731
    run()                                                       # compiles
    return new_tokens / (median_ms(run, repeats) / 1e3)


def measure(text_path: str, work: str, preset: str, steps: int, eval_every: int, new_tokens: int, log,
            names: tuple[str, ...] = tuple(ROWS)) -> dict:
    rows = []
    for name in names:
        arch = ROWS[name]
        print(f"{name}: {steps} steps", file=log, flush=True)
        result = job.train(text_path, preset=preset, model=dict(arch), sample_tokens=0,
                           run_dir=os.path.join(work, name.replace(",", "").replace(" ", "-")), log=io.StringIO(),
                           training={"steps": steps, "eval_every": eval_every, "log_every": eval_every,
                                     "save_every": steps})
        mc, tc = result.model, result.train_config
        rates = [r["tokens_per_s"] for r in result.records[1:] if "tokens_per_s" in r]
        rate = statistics.median(rates) if rates else None              # none when a run logs once
        rows.append({"arch": name, "fields": arch, "parameters": model.count_params(result.params),
                     "val_loss": [r["val_loss"] for r in result.records if "val_loss" in r][-1],
                     "train_tokens_per_s": rate and round(rate, 1),
                     "step_ms": rate and round(1e3 * tc.batch_size * mc.max_len / rate, 2),
                     "decode_tokens_per_s": round(decode_rate(result, new_tokens), 1),
                     "kv_cache_bytes_per_token": 2 * mc.n_layers * mc.n_kv_heads * mc.head_dim
                     * np.dtype(mc.dtype).itemsize, "seconds": round(result.elapsed, 1)})
        print(json.dumps(rows[-1]), file=log, flush=True)
    return {"data": os.path.abspath(text_path), "preset": preset, "steps": steps,
            "decode_new_tokens": new_tokens, "device": device_info(), "versions": versions(), "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.arch", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=SHARED_TEXT, help="a UTF-8 text (default: ../shared/data/tinyshakespeare.txt)")
    p.add_argument("--preset", choices=sorted(defaults.PRESETS), default=defaults.PRESET_TEXT,
                   help=f"the recipe every row trains (default {defaults.PRESET_TEXT})")
    p.add_argument("--steps", type=positive_int, help="steps of each run (default: the preset's)")
    p.add_argument("--eval-every", type=positive_int, default=250)
    p.add_argument("--new-tokens", type=positive_int, default=200, help="greedy tokens per timed decode")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ARCH",
                   help=f"which rows to train (default all: {', '.join(repr(name) for name in ROWS)})")
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    args = p.parse_args(argv)
    if not os.path.isfile(args.data):
        p.error(f"--data {args.data!r} is not a file; give a UTF-8 text (Tiny Shakespeare: ../shared/data)")
    if args.json:
        check_output_path(p, args.json, "--json")
    with tempfile.TemporaryDirectory(prefix="minitx-arch-") as work:
        steps = args.steps or defaults.PRESETS[args.preset]["train"]["steps"]
        result = measure(args.data, work, args.preset, steps, args.eval_every, args.new_tokens, log=sys.stdout,
                         names=tuple(args.rows))
    print(f"{'arch':<18} {'params':>9} {'val loss':>9} {'step ms':>8} {'decode tok/s':>13} {'KV B/token':>11}")
    for r in result["rows"]:
        print(f"{r['arch']:<18} {r['parameters']:>9,} {r['val_loss']:>9.4f} {r['step_ms'] or float('nan'):>8.2f} "
              f"{r['decode_tokens_per_s']:>13.1f} {r['kv_cache_bytes_per_token']:>11,}")
    if args.json:
        runs.write_whole(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
