"""Speculative decoding on a trained pair: how often the draft is right, and whether it pays.

    python -m benchmarks.speculative                    Tiny Shakespeare from ../shared/data, ~3 minutes
    python -m benchmarks.speculative --steps 300 --draft-tokens 2 4 --json speculative.json

Trains the target with nanoGPT's baby recipe (`--preset shakespeare-baby`: D = 128,
L = 4, context 64, char tokenizer) and a draft with the same recipe at one layer of
width 64 (the same data, so the same tokenizer and context). Then, from the first
16 characters of the validation text, --new-tokens tokens greedily: the target
alone, and with the draft at each --draft-tokens K. Per K: the share of the drafted
tokens the target accepted (accepted / proposed, `speculative.Speculation`), tokens
per target pass ((new tokens - 1) / rounds: the first comes from the prefill),
tokens/s, and the speed-up over the target alone
(median of --reps timed runs, alternated between all rows, after one to compile).
Greedy tokens with a draft must equal those without: the benchmark says if not.
One row samples (temperature 0.8, K = the last given) for the acceptance when the
tokens are drawn.
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

from benchmarks.common import SHARED_TEXT, alternate, check_output_path, device_info, positive_int, versions
from minitx_fn import defaults, job, model, runs, speculative
from minitx_fn.errors import Error
from minitx_fn.sampling import Sampler

DRAFT_MODEL = {"n_layers": 1, "d_model": 64}        # on top of the preset's model
PROMPT_CHARS = 16


def train_pair(text_path: str, work: str, preset: str, steps: int):
    training = {"steps": steps, "eval_every": steps, "log_every": steps, "save_every": steps}
    target = job.train(text_path, preset=preset, sample_tokens=0, run_dir=os.path.join(work, "target"),
                       log=io.StringIO(), training=training)
    draft = job.train(text_path, preset=preset, model=DRAFT_MODEL, sample_tokens=0,
                      run_dir=os.path.join(work, "draft"), log=io.StringIO(), training=training)
    return target, draft


def measure(target, draft, prompt, *, ks: list[int], new_tokens: int, reps: int) -> dict:
    import jax

    from minitx_fn.generate import generate
    cfg = target.model
    plain = generate(target.params, [prompt], model=cfg, max_new_tokens=new_tokens)[0]
    runs = {"target alone": lambda: generate(target.params, [prompt], model=cfg, max_new_tokens=new_tokens)}
    rows = {}
    for k in ks:
        out = speculative.speculate(target.params, [prompt], model=cfg, draft=draft, draft_tokens=k,
                                    max_new_tokens=new_tokens)
        rows[f"K = {k}"] = {"draft_tokens": k, "greedy_equal": bool(np.array_equal(out.tokens[0], plain)),
                            "accepted_share": round(int(out.accepted[0]) / int(out.proposed[0]), 3),
                            "tokens_per_target_pass": round((new_tokens - 1) / int(out.rounds[0]), 2)}
        runs[f"K = {k}"] = lambda k=k: speculative.speculate(target.params, [prompt], model=cfg, draft=draft,
                                                             draft_tokens=k, max_new_tokens=new_tokens)
    sampler, k = Sampler(temperature=0.8), ks[-1]
    sampled = speculative.speculate(target.params, [prompt], model=cfg, draft=draft, draft_tokens=k,
                                    max_new_tokens=new_tokens, sampler=sampler, key=jax.random.key(0))
    times = alternate(runs, blocks=reps, per_block=1, warmup=1)
    alone = statistics.median(t for block in times["target alone"] for t in block)
    result = {"target_alone_tokens_per_s": round(new_tokens / alone, 1), "rows": rows,
              "sampled": {"temperature": 0.8, "draft_tokens": k,
                          "accepted_share": round(int(sampled.accepted[0]) / int(sampled.proposed[0]), 3)}}
    for name, row in rows.items():
        median = statistics.median(t for block in times[name] for t in block)
        row["tokens_per_s"] = round(new_tokens / median, 1)
        row["speed_up"] = round(alone / median, 3)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speculative", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=SHARED_TEXT, help="a UTF-8 text (default: ../shared/data/tinyshakespeare.txt)")
    p.add_argument("--preset", choices=sorted(defaults.PRESETS), default=defaults.PRESET_TEXT,
                   help=f"the recipe of both models (default {defaults.PRESET_TEXT})")
    p.add_argument("--steps", type=positive_int, help="steps of each run (default: the preset's)")
    p.add_argument("--draft-tokens", type=positive_int, nargs="+", default=[1, 2, 4, 8], metavar="K",
                   help="the K of each row (default 1 2 4 8)")
    p.add_argument("--new-tokens", type=positive_int, default=256, help="greedy tokens per timed decode (at least 2: "
                   "the first comes from the prefill, the rest from rounds)")
    p.add_argument("--reps", type=positive_int, default=5, help="timed runs of each row (default 5)")
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    args = p.parse_args(argv)
    if not os.path.isfile(args.data):
        p.error(f"--data {args.data!r} is not a file; give a UTF-8 text (Tiny Shakespeare: ../shared/data)")
    context = defaults.PRESETS[args.preset]["model"]["max_len"]
    if max(args.draft_tokens) >= context:
        p.error(f"--draft-tokens {max(args.draft_tokens)} must be below the preset's context, {context}")
    if args.new_tokens < 2:
        p.error(f"--new-tokens {args.new_tokens}: give at least 2 (the first token comes from the prefill, "
                f"not a round)")
    if args.json:
        check_output_path(p, args.json, "--json")
    steps = args.steps or defaults.PRESETS[args.preset]["train"]["steps"]
    with tempfile.TemporaryDirectory(prefix="minitx-speculative-") as work:
        print(f"training the target and the draft, {steps} steps each", flush=True)
        try:
            target, draft = train_pair(args.data, work, args.preset, steps)
        except Error as e:                        # the data checks come before any training
            p.error(str(e))
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    from minitx_fn import corpus
    prompt = target.tokenizer.encode(text[corpus.train_boundary(len(text)):][:PROMPT_CHARS])
    result = measure(target, draft, prompt, ks=args.draft_tokens, new_tokens=args.new_tokens, reps=args.reps)
    result.update({"data": os.path.abspath(args.data), "preset": args.preset, "steps": steps,
                   "target_parameters": model.count_params(target.params),
                   "draft_parameters": model.count_params(draft.params),
                   "new_tokens": args.new_tokens, "device": device_info(), "versions": versions()})
    print(f"target {result['target_parameters']:,} parameters, draft {result['draft_parameters']:,}; greedy, "
          f"{args.new_tokens} new tokens; target alone {result['target_alone_tokens_per_s']:.1f} tokens/s")
    print("| draft tokens K | accepted | tokens per target pass | tokens/s | speed-up | greedy tokens equal |")
    print("|---|---|---|---|---|---|")
    for row in result["rows"].values():
        print(f"| {row['draft_tokens']} | {100 * row['accepted_share']:.0f}% | {row['tokens_per_target_pass']:.2f} | "
              f"{row['tokens_per_s']:.1f} | {row['speed_up']:.2f}x | {'yes' if row['greedy_equal'] else 'NO'} |")
    s = result["sampled"]
    print(f"sampling at temperature {s['temperature']}, K = {s['draft_tokens']}: {100 * s['accepted_share']:.0f}% "
          f"of the drafted tokens accepted")
    if args.json:
        runs.write_whole(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
