"""Where a decode step spends its time, per XLA operation, at GPT-2 small's sizes.

    python -m benchmarks.profile_decode
    python -m benchmarks.profile_decode --prompt 512 --new-tokens 32 --top 30
    python -m benchmarks.profile_decode --quantize int8

Random weights of GPT-2 small's shape (D = 768, L = 12, V = 50,257, context 1,024,
learned positions, tied head), one greedy generation of --new-tokens tokens after a
--prompt-token prompt, compiled once and traced once with `jax.profiler`, XLA:CPU's
per-operation events switched on (as in `benchmarks.profile_step`). Operations are
summed over the worker threads and grouped by output shape and kind, per generated
token (the prefill's share is spread over them). This is how benchmarks/NOTES.md
found the per-token copies of the stacked weights and caches.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import positive_int  # noqa: E402
from benchmarks.profile_step import operation_times  # noqa: E402
from minitx_fn import decode, generate, quantize  # noqa: E402
from minitx_fn.config import ModelConfig  # noqa: E402
from minitx_fn.sampling import Sampler  # noqa: E402

GPT2_SMALL = ModelConfig(vocab_size=50257, d_model=768, n_heads=12, n_layers=12, d_ff=3072, max_len=1024,
                         positions="learned", tie_embeddings=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=positive_int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--new-tokens", type=positive_int, default=64, help="generated tokens (default 64)")
    p.add_argument("--top", type=positive_int, default=20, help="rows to print")
    p.add_argument("--quantize", choices=quantize.KINDS, help="decode from quantized weights (`quantize.quantize`)")
    args = p.parse_args(argv)
    c = GPT2_SMALL
    if args.prompt + args.new_tokens > c.max_len:
        p.error(f"--prompt + --new-tokens must fit GPT-2 small's {c.max_len} positions")
    params = c.init(jax.random.key(0))
    params = decode.decode_params(c, params if args.quantize is None else quantize.quantize(params, args.quantize))
    window = np.zeros((1, c.max_len), np.int32)
    window[0, :args.prompt] = np.random.default_rng(0).integers(0, c.vocab_size, args.prompt)
    call = (params, jnp.asarray(window), jnp.asarray([args.prompt], jnp.int32), jax.random.key(0),
            jnp.zeros((0,), jnp.int32))
    static = dict(model=c, sampler=Sampler(temperature=0.0), max_new_tokens=args.new_tokens, keep_logits=False,
                  prompt_len=decode.bucket_length(args.prompt, c.max_len))
    compiled = generate.decode_loop.lower(*call, **static).compile()
    jax.block_until_ready(compiled(*call))
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*call))
    wall = time.perf_counter() - t0
    grouped, calls = collections.Counter(), collections.Counter()
    for op, ns, n_calls, shape, _ in operation_times(lambda: jax.block_until_ready(compiled(*call)),
                                                     compiled.as_text(), 1):
        group = (shape, re.sub(r"[.\d]+$", "", op))                       # copy_bitcast_fusion.12 -> its kind
        grouped[group] += ns
        calls[group] += n_calls
    n = args.new_tokens
    print(f"GPT-2 small, {args.prompt}-token prompt, {n} new tokens: {1e3 * wall / n:.2f} ms per token "
          f"({n / wall:.1f} tokens/s); operations summed over threads {sum(grouped.values()) / n / 1e6:.2f} ms per token")
    print("| ms per token | calls per token | output shape | operation |")
    print("|---|---|---|---|")
    for (shape, kind), ns in grouped.most_common(args.top):
        print(f"| {ns / n / 1e6:.3f} | {calls[(shape, kind)] / n:.1f} | `{shape}` | `{kind}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
