"""GPT-2 in our own layers against Hugging Face's, at GPT-2's real sizes, offline.

    python -m benchmarks.gpt2                       GPT-2 small (124M), about 3 minutes on 2 CPU cores
    python -m benchmarks.gpt2 --size tiny --json gpt2.json

No download: transformers builds a GPT2LMHeadModel with random weights
(torch.manual_seed(0)) at the size's config and saves it with `save_pretrained`,
beside a byte-level BPE of GPT-2's vocabulary size (the 256 bytes, the first merges of
byte pairs, and "<|endoftext|>": the ids, not GPT-2's learned merges, which are not
here). Then, as a user would:

1. `minitx import-gpt2` of that folder: wall time, and the checkpoint's size.
2. Logits of one (1, T) window of random ids, ours (jitted, float32) against
   transformers' (eager attention, float32): the largest absolute difference, and
   that difference over the largest |logit|.
3. 20 greedy tokens from a prompt, our `generate` against `model.generate(
   do_sample=False)`: whether they are equal, and each one's decode speed (new
   tokens per second, median of --reps runs after one to compile or warm up, prefill
   included); ours also with the context cut to --window positions, as our decoder
   attends over every slot of its fixed-size cache.

Needs the extra `parity` (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import check_output_path, positive_int

SIZES = {
    # GPT-2 small, as its config.json gives it.
    "small": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    # For the tests: seconds.
    "tiny": dict(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=2),
}


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


def _median_rate(fn, tokens: int, reps: int) -> float:
    fn()                                          # compile (ours) or warm up (theirs)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


def run(size: str, work: str, *, reps: int, window: int, new_tokens: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from minitx_fn import checkpoint, gpt2, model
    from minitx_fn.generate import generate
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
    gpt2.import_run(hf_dir, run_dir)                                     # what `minitx import-gpt2` runs
    imported = time.perf_counter() - t0
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(run_dir) for f in fs)
    params, c, tok, _ = checkpoint.load_model(run_dir)

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, c.vocab_size, (1, min(window, c.max_len)))
    ours = np.asarray(jax.jit(model.apply, static_argnames="config")(params, jnp.asarray(ids, jnp.int32), config=c))
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(ids)).logits.numpy()
    diff = float(np.abs(ours - theirs).max())

    prompt = tok.encode("Hello, I'm a language model,")
    with torch.no_grad():
        def hf_generate():
            return hf_model.generate(torch.from_numpy(prompt[None].astype(np.int64)), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     pad_token_id=0)[0, len(prompt):].numpy()
        expected = hf_generate()
        hf_rate = _median_rate(hf_generate, new_tokens, reps)

    def our_generate():
        return generate(params, [prompt], config=c, key=None, max_new_tokens=new_tokens)[0]
    got = our_generate()
    our_rate = _median_rate(our_generate, new_tokens, reps)

    # The same weights with the context cut to `window` positions: our decoder attends
    # over all S cache slots every token (fixed shapes), so this shows what S costs.
    short = c.replace(max_len=min(window, c.max_len))
    short_params = {**params, "pos": {"table": params["pos"]["table"][:short.max_len]}}
    short_rate = _median_rate(lambda: generate(short_params, [prompt], config=short, key=None,
                                               max_new_tokens=new_tokens)[0], new_tokens, reps)
    return {"size": size, "config": spec, "parameters": model.count_params(params),
            "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(jax.devices()[0]), "build_and_save_s": round(built, 2), "import_s": round(imported, 2),
            "checkpoint_bytes": ckpt_bytes, "logits_window": int(ids.shape[1]), "max_abs_logit_diff": diff,
            "max_abs_logit": float(np.abs(theirs).max()), "relative_logit_diff": diff / float(np.abs(theirs).max()),
            "greedy_tokens": new_tokens, "greedy_equal": bool(np.array_equal(got, expected)),
            "ours_tokens_per_s": round(our_rate, 2), "transformers_tokens_per_s": round(hf_rate, 2),
            "ours_tokens_per_s_context_window": round(short_rate, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpt2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--reps", type=positive_int, default=3, help="timed generations of each side (default 3)")
    parser.add_argument("--window", type=positive_int, default=128, help="positions of the logits compared "
                        "(default 128)")
    parser.add_argument("--new-tokens", type=positive_int, default=20, help="greedy tokens compared (default 20)")
    parser.add_argument("--json", metavar="FILE", help="also write the result here")
    args = parser.parse_args(argv)
    if args.json:                                 # before the work, not after it
        check_output_path(parser, args.json, "--json")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        parser.error("needs torch and transformers: pip install -e \".[parity]\"")
    with tempfile.TemporaryDirectory(prefix="minitx-gpt2-") as work:
        result = run(args.size, work, reps=args.reps, window=args.window, new_tokens=args.new_tokens)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
