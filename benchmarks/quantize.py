"""Decoding from quantized weights: tokens per second at batch 1, float32 against int8 and bfloat16.

    python -m benchmarks.quantize                        GPT-2 small's shape, random weights, ~2 minutes
    python -m benchmarks.quantize --size tiny --new-tokens 8 --reps 1

A model of GPT-2 small's shape (V = 50,257, D = 768, L = 12, context 1024; random
weights: speed does not depend on what they are) decodes --new-tokens tokens greedily
after a 16-token prompt, from its float32 parameters and from `quantize.quantize`'s
int8 and bfloat16 ones (median of --reps timed runs, alternated, after one to
compile). Each row also gives the bytes of the parameters, the greedy tokens' agreement
with float32's and the largest logit difference on the prompt, relative to float32's
largest logit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

from benchmarks.common import alternate, check_output_path, device_info, positive_int, versions
from minitx_fn import defaults, quantize, runs

SIZES = {"small": dict(vocab_size=50257, d_model=768, n_heads=12, n_layers=12, max_len=1024),
         "tiny": dict(vocab_size=256, d_model=64, n_heads=2, n_layers=2, max_len=64)}
PROMPT = 16


def measure(size: str, new_tokens: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from minitx_fn.config import ModelConfig
    from minitx_fn.generate import generate
    model = ModelConfig(**SIZES[size], **defaults.ARCHS["gpt2"])
    params = model.init(jax.random.key(0))
    trees = {"float32": params, **{to: quantize.quantize(params, to) for to in quantize.KINDS}}
    prompt = np.random.default_rng(0).integers(0, model.vocab_size, PROMPT).tolist()
    tokens = {name: generate(tree, [prompt], model=model, max_new_tokens=new_tokens)[0] for name, tree in trees.items()}
    logits = {name: np.asarray(model.apply(tree, jnp.asarray([prompt])), np.float64) for name, tree in trees.items()}
    times = alternate({name: (lambda tree=tree: generate(tree, [prompt], model=model, max_new_tokens=new_tokens))
                       for name, tree in trees.items()}, blocks=reps, per_block=1, warmup=1)
    rows = {}
    for name, tree in trees.items():
        median = statistics.median(t for block in times[name] for t in block)
        rows[name] = {"weight_bytes": quantize.weight_bytes(tree), "tokens_per_s": round(new_tokens / median, 1),
                      "greedy_agreement": float(np.mean(tokens[name] == tokens["float32"])),
                      "relative_logit_diff": float(np.abs(logits[name] - logits["float32"]).max()
                                                   / np.abs(logits["float32"]).max())}
    for row in rows.values():
        row["speed_up"] = round(row["tokens_per_s"] / rows["float32"]["tokens_per_s"], 3)
    return {"size": size, "new_tokens": new_tokens, "prompt_tokens": PROMPT, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="the model's shape (default small)")
    p.add_argument("--new-tokens", type=positive_int, default=64, help="greedy tokens per timed decode (default 64)")
    p.add_argument("--reps", type=positive_int, default=5, help="timed runs of each row (default 5)")
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    args = p.parse_args(argv)
    if args.json:
        check_output_path(p, args.json, "--json")
    if PROMPT + args.new_tokens > SIZES[args.size]["max_len"]:
        p.error(f"--new-tokens {args.new_tokens}: the prompt ({PROMPT}) and the new tokens must fit the context, "
                f"{SIZES[args.size]['max_len']}")
    result = {**measure(args.size, args.new_tokens, args.reps), "device": device_info(), "versions": versions()}
    print(f"{args.size}: {args.new_tokens} greedy tokens after {PROMPT}, batch 1")
    print("| weights | MB | tokens/s | speed-up | greedy agreement | logit difference |")
    print("|---|---|---|---|---|---|")
    for name, row in result["rows"].items():
        print(f"| {name} | {row['weight_bytes'] / 1e6:.0f} | {row['tokens_per_s']:.1f} | {row['speed_up']:.2f}x | "
              f"{100 * row['greedy_agreement']:.0f}% | {row['relative_logit_diff']:.1e} |")
    if args.json:
        runs.write_whole(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
