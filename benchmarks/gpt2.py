"""GPT-2 in our own layers against Hugging Face's, at GPT-2's real sizes, offline.

    python -m benchmarks.gpt2                       GPT-2 small (124M), about 5 minutes on 2 CPU cores
    python -m benchmarks.gpt2 --size tiny --json gpt2.json

No download: transformers builds a GPT2LMHeadModel with random weights
(torch.manual_seed(0)) at the size's config and saves it with `save_pretrained`,
beside a byte-level BPE of GPT-2's vocabulary size (the 256 bytes, the first merges of
byte pairs, and "<|endoftext|>": the ids, not GPT-2's learned merges, which are not
here). Then, as a user would:

1. `minitx import-hf` of that folder: wall time, and the checkpoint's size.
2. Logits of one (1, T) window of random ids, ours (jitted, float32) against
   transformers' (eager attention, float32): the largest absolute difference, and
   that difference over the largest |logit|.
3. Greedy decoding, `generate` against `model.generate(do_sample=False)`, in three
   cases: batch 1 after a short prompt, batch 1 after a long one, and batch 8 with
   prompts of 8 lengths from short to long (ours in one call; theirs left-padded with
   an attention mask, as a user would). Per case: whether every row's tokens are
   equal; each side's new tokens per second for --new-tokens tokens (prefill
   included) and its time to the first token (a generation of one token: the
   prefill), median of --reps runs alternated between the two after one to compile
   or warm up; and a roofline line for ours: the bytes a decode step reads (every
   weight once, the tied head once, and the cache slots it attends over) over the
   time of one step, (full - first token) / (new tokens - 1), against the memory read
   bandwidth measured in the same run (the best of 10 sums of a 1 GiB array).

Needs the extra `parity` (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import alternate, check_output_path, positive_int, read_bandwidth_gbs

SIZES = {
    # GPT-2 small, as its config.json gives it.
    "small": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    # For the tests: seconds.
    "tiny": dict(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=2),
}
PROMPTS = {"small": (16, 512), "tiny": (4, 16)}       # the short and the long prompt of each size
BATCH = 8                                             # rows of the mixed batch


def pair_bpe_json(vocab_size: int) -> str:
    """A byte-level BPE of exactly vocab_size ids: the 256 bytes, then merges of byte
    pairs in order, then "<|endoftext|>" (GPT-2's last id)."""
    import tokenizers as tk

    from minitx_fn.gpt2 import bytes_to_unicode
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) == vocab_size - 1:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    assert hf.get_vocab_size() == vocab_size
    return hf.to_str()


def decode_cases(short: int, long: int) -> dict[str, list[int]]:
    """The prompt lengths of each decoding case.

    Example:
        >>> decode_cases(16, 512)["batch 8"]
        [16, 86, 157, 228, 299, 370, 441, 512]
    """
    return {"batch 1, short prompt": [short], "batch 1, long prompt": [long],
            f"batch {BATCH}": np.linspace(short, long, BATCH).astype(int).tolist()}


def median_s(blocks: list[list[float]]) -> float:
    return float(np.median([t for block in blocks for t in block]))


def decode_case(params, c, hf_model, lengths: list[int], *, new_tokens: int, reps: int, bandwidth: float) -> dict:
    """One decoding case: ours and transformers' greedy tokens, speed and time to first
    token, alternated; and ours against the memory bandwidth."""
    import jax
    import torch

    from minitx_fn.generate import bucket_length, cache_slots, generate

    rng = np.random.default_rng(len(lengths) * 1000 + max(lengths))
    prompts = [rng.integers(0, c.vocab_size, n) for n in lengths]
    width = max(lengths)
    padded = np.zeros((len(prompts), width), np.int64)                 # left-padded, as generation needs
    mask = np.zeros((len(prompts), width), np.int64)
    for row, p in enumerate(prompts):
        padded[row, width - len(p):], mask[row, width - len(p):] = p, 1
    ids, attention = torch.from_numpy(padded), torch.from_numpy(mask)

    def theirs(n):
        with torch.no_grad():
            return hf_model.generate(ids, attention_mask=attention, do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, pad_token_id=0)[:, width:].numpy()

    def ours(n):
        return generate(params, prompts, model=c, max_new_tokens=n)

    equal = all(np.array_equal(a, b) for a, b in zip(ours(new_tokens), theirs(new_tokens)))
    times = alternate({"ours": lambda: ours(new_tokens), "transformers": lambda: theirs(new_tokens),
                       "ours_first": lambda: ours(1), "transformers_first": lambda: theirs(1)},
                      blocks=reps, per_block=1, warmup=1, pause_s=0.2)
    t = {name: median_s(blocks) for name, blocks in times.items()}
    step_s = (t["ours"] - t["ours_first"]) / (new_tokens - 1)            # one decode step of the whole batch
    timed_step = step_s > 0                       # too few tokens: the difference drowns in the noise
    slots = cache_slots(bucket_length(width, c.max_len), new_tokens, c.max_len)
    weights = sum(a.nbytes for a in jax.tree.leaves(params))
    cache = 2 * c.n_layers * len(prompts) * slots * c.n_kv_heads * c.head_dim * np.dtype(c.compute_dtype).itemsize
    return {"prompt_lengths": lengths, "new_tokens": new_tokens, "greedy_equal": bool(equal),
            "ours_tokens_per_s": round(len(prompts) * new_tokens / t["ours"], 2),
            "transformers_tokens_per_s": round(len(prompts) * new_tokens / t["transformers"], 2),
            "ours_over_transformers": round(t["transformers"] / t["ours"], 3),
            "ours_first_token_ms": round(1e3 * t["ours_first"], 1),
            "transformers_first_token_ms": round(1e3 * t["transformers_first"], 1),
            "ours_step_ms": round(1e3 * step_s, 2) if timed_step else None, "weight_bytes": weights,
            "cache_slots": slots, "cache_bytes": cache,
            "read_gbs": round((weights + cache) / step_s / 1e9, 2) if timed_step else None,
            "bandwidth_utilisation": round((weights + cache) / step_s / 1e9 / bandwidth, 3) if timed_step else None}


def run(size: str, work: str, *, reps: int, window: int, new_tokens: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from minitx_fn import checkpoint, hf, model
    transformers.logging.set_verbosity_error()

    spec = SIZES[size]
    torch.manual_seed(0)
    hf_dir, run_dir = os.path.join(work, "hf"), os.path.join(work, "run")
    t0 = time.perf_counter()
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**spec, bos_token_id=None, eos_token_id=None))
    hf_model.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "tokenizer.json"), "w") as f:
        f.write(pair_bpe_json(spec["vocab_size"]))
    built = time.perf_counter() - t0

    t0 = time.perf_counter()
    hf.import_run(hf_dir, run_dir)                                     # what `minitx import-hf` runs
    imported = time.perf_counter() - t0
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(run_dir) for f in fs)
    params, c, tok, _ = checkpoint.load_model(run_dir)         # params, model, tokenizer, meta

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, c.vocab_size, (1, min(window, c.max_len)))
    ours = np.asarray(jax.jit(model.apply, static_argnames="config")(params, jnp.asarray(ids, jnp.int32), config=c))
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(ids)).logits.numpy()
    diff = float(np.abs(ours - theirs).max())

    bandwidth = read_bandwidth_gbs()
    cases = {name: decode_case(params, c, hf_model, lengths, new_tokens=new_tokens, reps=reps, bandwidth=bandwidth)
             for name, lengths in decode_cases(*PROMPTS[size]).items()}
    return {"size": size, "config": spec, "parameters": model.count_params(params),
            "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "device": str(jax.devices()[0]),
            "date": time.strftime("%Y-%m-%d"), "build_and_save_s": round(built, 2), "import_s": round(imported, 2),
            "checkpoint_bytes": ckpt_bytes, "logits_window": int(ids.shape[1]), "max_abs_logit_diff": diff,
            "max_abs_logit": float(np.abs(theirs).max()), "relative_logit_diff": diff / float(np.abs(theirs).max()),
            "read_bandwidth_gbs": round(bandwidth, 2), "decode": cases}


def print_report(result: dict, out=None) -> None:
    """The decoding comparison as a table, then one roofline line per case."""
    print(f"GPT-2 {result['size']} ({result['parameters']:,} parameters), greedy, "
          f"{next(iter(result['decode'].values()))['new_tokens']} new tokens, median of the alternated runs; "
          f"jax {result['jax']}, torch {result['torch']} ({result['torch_threads']} threads), "
          f"transformers {result['transformers']}", file=out)
    print("| case | prompt lengths | ours tokens/s | transformers tokens/s | ours / transformers | "
          "first token ours / theirs | greedy tokens equal |", file=out)
    print("|---|---|---|---|---|---|---|", file=out)
    for name, r in result["decode"].items():
        lengths = r["prompt_lengths"]
        shown = str(lengths[0]) if len(lengths) == 1 else f"{lengths[0]} to {lengths[-1]}"
        print(f"| {name} | {shown} | {r['ours_tokens_per_s']:.1f} | {r['transformers_tokens_per_s']:.1f} | "
              f"{r['ours_over_transformers']:.2f}x | {r['ours_first_token_ms']:.0f} / "
              f"{r['transformers_first_token_ms']:.0f} ms | {'yes' if r['greedy_equal'] else 'NO'} |", file=out)
    print(f"\nMemory read bandwidth, measured in this run: {result['read_bandwidth_gbs']:.1f} GB/s", file=out)
    for name, r in result["decode"].items():
        if r["ours_step_ms"] is None:
            print(f"roofline, ours, {name}: a step's time is below the noise of {r['new_tokens']} tokens; give more "
                  f"--new-tokens", file=out)
            continue
        print(f"roofline, ours, {name}: {(r['weight_bytes'] + r['cache_bytes']) / 1e6:,.0f} MB read per decode step "
              f"(weights {r['weight_bytes'] / 1e6:,.0f} MB, cache {r['cache_slots']} slots "
              f"{r['cache_bytes'] / 1e6:,.1f}"
              f" MB) in {r['ours_step_ms']:.1f} ms: {r['read_gbs']:.1f} GB/s, "
              f"{100 * r['bandwidth_utilisation']:.0f}% of the bandwidth", file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpt2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--reps", type=positive_int, default=3, help="timed generations of each side (default 3)")
    parser.add_argument("--window", type=positive_int, default=128, help="positions of the logits compared "
                        "(default 128)")
    parser.add_argument("--new-tokens", type=positive_int, default=128, help="greedy tokens per row (default 128)")
    parser.add_argument("--json", metavar="FILE", help="also write the result here")
    args = parser.parse_args(argv)
    if args.json:                                 # before the work, not after it
        check_output_path(parser, args.json, "--json")
    room = SIZES[args.size]["n_positions"] - PROMPTS[args.size][1]
    if not 2 <= args.new_tokens <= room:
        parser.error(f"--new-tokens {args.new_tokens} must lie in [2, {room}]: after the {PROMPTS[args.size][1]}-token "
                     f"prompt, GPT-2 {args.size} has {room} positions left (and a step's time needs two tokens)")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        parser.error("needs torch and transformers: pip install -e \".[parity]\"")
    with tempfile.TemporaryDirectory(prefix="minitx-gpt2-") as work:
        result = run(args.size, work, reps=args.reps, window=args.window, new_tokens=args.new_tokens)
    print_report(result)
    if args.json:
        from minitx_fn import runs
        runs.write_whole(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
