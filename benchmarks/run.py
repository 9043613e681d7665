"""Time the jitted train step and decode, side by side with the Flax reference.

Run from the repository root (the Flax reference lives in tests/):

    python -m benchmarks --suite quick --json out.json

Method. Compile time is measured separately (lower + compile). Every timed call
ends in block_until_ready. Train steps of minitx_fn (A) and Flax (B) alternate in
blocks, A B A B ..., on the same batch and optimiser, so that drift of a shared,
noisy machine hits both alike; the ratio reported is the median over block pairs
of median(A) / median(B). MFU is model FLOPs per step (6 N B T + 12 L B T^2 D,
N = non-embedding parameters) over the step time and the matmul peak measured in
the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minitx_fn import generate as gen
from minitx_fn import model, train
from minitx_fn.config import ModelConfig, TrainConfig

CONFIGS = {
    "tiny": dict(vocab_size=65, d_model=64, n_layers=2, n_heads=4, max_len=64, batch=16),
    "baby": dict(vocab_size=65, d_model=128, n_layers=4, n_heads=4, max_len=64, batch=12),
    "medium": dict(vocab_size=65, d_model=384, n_layers=6, n_heads=6, max_len=256, batch=8),
    "gpt2-small": dict(vocab_size=65, d_model=768, n_layers=12, n_heads=12, max_len=1024, batch=8),
}
SUITES = {"quick": ["tiny", "baby"], "full": ["tiny", "baby", "medium"]}


def _sync(x):
    return jax.block_until_ready(x)


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _sync(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def device_info() -> dict:
    d = jax.devices()[0]
    return {"platform": d.platform, "kind": d.device_kind, "count": jax.device_count(),
            "host": platform.processor() or platform.machine()}


def _jaxlib_version() -> str:
    import jaxlib
    return getattr(jaxlib, "__version__", None) or jaxlib.version.__version__


def versions() -> dict:
    import flax
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": _jaxlib_version(),
            "optax": optax.__version__, "flax": flax.__version__, "numpy": np.__version__}


def matmul_peak_gflops(dtype, n: int, reps: int = 10) -> float:
    """Best of `reps` timings of an n x n matmul, as GFLOP/s (2 n^3 per product)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    _sync(f(a, a))
    best = min(_timed(lambda: f(a, a)) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def copy_bandwidth_gbs(n_bytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy: bytes read + written per second (GPU only)."""
    x = jnp.zeros((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    _sync(f(x))
    return 2 * n_bytes / min(_timed(lambda: f(x)) for _ in range(reps)) / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    _sync(fn())
    return time.perf_counter() - t


def peak_memory_mb() -> float:
    d = jax.devices()[0]
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # KiB on Linux -> MiB


# ----------------------------------------------------------------------------- train


def _flax_step_fn(mc: ModelConfig, tc: TrainConfig):
    from tests import flax_reference as ref

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key in ("kernel", "embedding"), params)

    opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                      optax.adamw(train.learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2,
                                  weight_decay=tc.weight_decay, mask=decay_mask))

    def step(state, x, y):
        variables, opt_state = state
        loss, grads = jax.value_and_grad(ref.flax_loss)(variables, x, y, mc)
        updates, opt_state = opt.update(grads, opt_state, variables)
        return (optax.apply_updates(variables, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0), opt, ref


def bench_train(name: str, spec: dict, peak: float, *, steps: int, blocks: int, **model_options) -> list[dict]:
    mc = ModelConfig(**{k: v for k, v in spec.items() if k != "batch"}, **model_options)
    tc = TrainConfig(steps=1000, batch_size=spec["batch"], warmup=10)
    b, t = spec["batch"], mc.max_len
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (b, t + 1), 0, mc.vocab_size)
    x, y = tokens[:, :-1], tokens[:, 1:]

    ours_state = train.init_state(key, mc, tc)
    flops = train.model_flops_per_step(mc, b, train.non_embedding_params(ours_state.params))
    t0 = time.perf_counter()
    compiled_ours = train.update.lower(ours_state, x, y, model_config=mc, train_config=tc).compile()
    compile_ours = time.perf_counter() - t0

    flax_step, flax_opt, ref = _flax_step_fn(mc, tc)
    variables = jax.tree.map(jnp.copy, ref.to_flax_model(ours_state.params, mc))   # own buffers: both donate
    flax_state = (variables, flax_opt.init(variables))
    t0 = time.perf_counter()
    compiled_flax = flax_step.lower(flax_state, x, y).compile()
    compile_flax = time.perf_counter() - t0

    states = {"minitx": ours_state, "flax": flax_state}
    steps_of = {"minitx": compiled_ours, "flax": compiled_flax}

    def run(impl: str, n: int) -> list[float]:
        """n timed steps of one implementation, each ending in block_until_ready."""
        times = []
        for _ in range(n):
            t1 = time.perf_counter()
            states[impl], out = steps_of[impl](states[impl], x, y)
            _sync(out)
            times.append(time.perf_counter() - t1)
        return times

    run("minitx", 2), run("flax", 2)                             # warm-up
    per_block = max(1, steps // blocks)
    ours_times, flax_times, ratios = [], [], []
    for _ in range(blocks):
        a, c = run("minitx", per_block), run("flax", per_block)
        ours_times += a
        flax_times += c
        ratios.append(statistics.median(a) / statistics.median(c))
    ratio = statistics.median(ratios)
    rows = []
    for impl, times, compile_s in (("minitx", ours_times, compile_ours), ("flax", flax_times, compile_flax)):
        med = statistics.median(times)
        rows.append({"config": name, "impl": impl, "batch": b, "context": t, "compile_s": round(compile_s, 3),
                     "steps": len(times), "step_ms_median": round(1e3 * med, 3),
                     "step_ms_min": round(1e3 * min(times), 3), "step_ms_max": round(1e3 * max(times), 3),
                     "tokens_per_s": round(b * t / med, 1), "model_gflops_per_step": round(flops / 1e9, 3),
                     "mfu": round(flops / med / (peak * 1e9), 4), "peak_memory_mb": round(peak_memory_mb(), 1),
                     "ratio_minitx_over_flax": round(ratio, 3)})
    return rows


# ----------------------------------------------------------------------------- decode


def bench_decode(name: str, spec: dict, *, batch: int, new_tokens: int, probe_tokens: int, reps: int) -> list[dict]:
    mc = ModelConfig(**{k: v for k, v in spec.items() if k != "batch"})
    s = mc.max_len
    params = model.init(jax.random.key(0), mc)
    key = jax.random.key(1)
    short = [[1]] * batch
    late = [[1] * (s - probe_tokens - 1)] * batch
    rows = []

    def cached(prompts, n):
        return lambda: gen.generate(params, prompts, config=mc, key=key, max_new_tokens=n)

    def recompute(prompts, n):
        return lambda: gen.generate_recompute(params, np.asarray(prompts), config=mc, key=key, max_new_tokens=n)

    for mode, make, r in (("cached", cached, reps), ("recompute", recompute, 1)):
        make(short, new_tokens)()                                  # compile
        make(short, probe_tokens)(), make(late, probe_tokens)(), make(late, 1)(), make(short, 1)()
        total_ms = _median_ms(make(short, new_tokens), r)
        prefill_short = _median_ms(make(short, 1), r)
        prefill_late = _median_ms(make(late, 1), r)
        early = (_median_ms(make(short, probe_tokens), r) - prefill_short) / (probe_tokens - 1)
        late_ms = (_median_ms(make(late, probe_tokens), r) - prefill_late) / (probe_tokens - 1)
        row = {"config": name, "batch": batch, "mode": mode, "new_tokens": new_tokens,
               "prefill_ms": round(prefill_short, 3), "tokens_per_s": round(batch * new_tokens / total_ms * 1e3, 1),
               "ms_per_token_early": round(early, 3), "ms_per_token_late": round(late_ms, 3)}
        if mode == "cached":
            # Each decode step must read every parameter and the whole (L, B, S, H, K) key and value cache.
            cache = model.init_cache(mc, batch)
            bytes_read = sum(a.nbytes for a in jax.tree.leaves(params)) + cache.k.nbytes + cache.v.nbytes
            row["bytes_per_token"] = int(bytes_read)
            row["achieved_gbs"] = round(bytes_read / (late_ms / 1e3) / 1e9, 2)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report


def _markdown_table(header: list[str], rows: list[list], out) -> None:
    print("\n| " + " | ".join(header) + " |", file=out)
    print("|" + "---|" * len(header), file=out)
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |", file=out)


def print_table(result: dict, out=None) -> None:
    out = out or sys.stdout
    print(f"\nDevice: {result['device']['kind']} ({result['device']['platform']}); "
          f"jax {result['versions']['jax']}, flax {result['versions']['flax']}; "
          f"float32 matmul peak {result['peak_gflops']:.1f} GFLOP/s", file=out)
    _markdown_table(
        ["config", "impl", "compile s", "step ms (median)", "min", "max", "tokens/s", "MFU", "minitx/flax"],
        [[r["config"], r["impl"], f"{r['compile_s']:.2f}", f"{r['step_ms_median']:.2f}", f"{r['step_ms_min']:.2f}",
          f"{r['step_ms_max']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
          f"{r['ratio_minitx_over_flax']:.2f}"] for r in result["train"]], out)
    _markdown_table(
        ["config", "batch", "mode", "tokens/s", "prefill ms", "ms/token early", "ms/token late", "GB/s read"],
        [[r["config"], r["batch"], r["mode"], f"{r['tokens_per_s']:,.0f}", f"{r['prefill_ms']:.2f}",
          f"{r['ms_per_token_early']:.3f}", f"{r['ms_per_token_late']:.3f}", r.get("achieved_gbs", "")]
         for r in result["decode"]], out)
    if "copy_bandwidth_gbs" in result:
        print(f"\nDevice copy bandwidth: {result['copy_bandwidth_gbs']:.0f} GB/s; "
              f"bfloat16 matmul peak {result['peak_gflops_bf16']:.0f} GFLOP/s", file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), help="override the suite's configs")
    p.add_argument("--steps", type=int, default=20, help="timed train steps per implementation")
    p.add_argument("--blocks", type=int, default=4, help="A/B alternation blocks")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--attention", choices=["einsum", "dot_product_attention"], default="einsum",
                   help="minitx_fn's attention path (the Flax reference is unchanged)")
    p.add_argument("--unrolled", action="store_true", help="minitx_fn with scan_layers=False")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)

    on_gpu = jax.devices()[0].platform == "gpu"
    names = args.configs or SUITES[args.suite] + (["gpt2-small"] if on_gpu and args.suite == "full" else [])
    result = {"device": device_info(), "versions": versions(), "suite": args.suite,
              "options": {"attention": args.attention, "scan_layers": not args.unrolled},
              "date": time.strftime("%Y-%m-%d"), "peak_gflops": matmul_peak_gflops(jnp.float32, 2048 if on_gpu else 1024)}
    if on_gpu:
        result["peak_gflops_bf16"] = matmul_peak_gflops(jnp.bfloat16, 8192)
        result["peak_gflops"] = matmul_peak_gflops(jnp.float32, 8192)
        result["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    result["train"], result["decode"] = [], []
    with jax.numpy_dtype_promotion("standard"):
        for name in names:
            print(f"train: {name}", file=sys.stderr, flush=True)
            result["train"] += bench_train(name, CONFIGS[name], result["peak_gflops"], steps=args.steps,
                                           blocks=args.blocks, attention=args.attention,
                                           scan_layers=not args.unrolled)
        for name in names:
            if name == "gpt2-small":
                continue
            for batch in (1, 8):
                print(f"decode: {name} batch {batch}", file=sys.stderr, flush=True)
                result["decode"] += bench_decode(name, CONFIGS[name], batch=batch, new_tokens=args.new_tokens,
                                                 probe_tokens=min(32, args.new_tokens), reps=3)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
