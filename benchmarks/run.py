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
import io
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
from minitx_fn.layers import attention

CONFIGS = {
    "tiny": dict(vocab_size=65, d_model=64, n_layers=2, n_heads=4, max_len=64, batch=16),
    "baby": dict(vocab_size=65, d_model=128, n_layers=4, n_heads=4, max_len=64, batch=12),
    "medium": dict(vocab_size=65, d_model=384, n_layers=6, n_heads=6, max_len=256, batch=8),
    "gpt2-small": dict(vocab_size=65, d_model=768, n_layers=12, n_heads=12, max_len=1024, batch=8),
}
BLOCK_PAUSE_S = 0.25
LOOP_STEPS = {"tiny": 200, "baby": 60, "medium": 10, "gpt2-small": 10}     # ~2-12 s per timed run on this CPU
SUITES = {"quick": ["tiny", "baby"], "full": ["tiny", "baby", "medium"]}


def model_config(spec: dict, **options) -> ModelConfig:
    """The ModelConfig of a CONFIGS entry (its sizes, without the batch) with `options` changed."""
    return ModelConfig(**{k: v for k, v in spec.items() if k != "batch"}, **options)


def check_options(parser: argparse.ArgumentParser, names: list[str], options: dict) -> None:
    """Exit through `parser.error` (status 2, one line) if `options` make an invalid config for any of `names`."""
    for name in names:
        try:
            model_config(CONFIGS[name], **options)
        except (TypeError, ValueError) as e:
            parser.error(f"--option for config {name}: {e}")


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
    found = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": _jaxlib_version(),
             "optax": optax.__version__, "flax": flax.__version__, "numpy": np.__version__}
    try:
        import torch
        found["torch"] = torch.__version__
        found["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return found


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


def _torch_step(mc: ModelConfig, tc: TrainConfig, params: dict, x, y):
    """PyTorch eager's train step on the same weights and batch, or None without torch.

    The first loss is checked against ours, so the rows time the same model.
    """
    try:
        import torch
    except ImportError:
        print("torch rows skipped: PyTorch is not installed (pip install torch)", file=sys.stderr)
        return None
    from benchmarks import torch_reference

    step, _ = torch_reference.make_step(mc, tc, params)
    xt, yt = (torch.from_numpy(np.array(a)).long() for a in (x, y))
    first, ours = float(step(xt, yt)), float(model.loss(params, x, y, config=mc))
    if abs(first - ours) > 1e-4 * max(1.0, abs(ours)):
        raise AssertionError(f"PyTorch's first loss {first} differs from minitx_fn's {ours}")
    return lambda: step(xt, yt)


def bench_train(name: str, spec: dict, peak: float, *, steps: int, blocks: int, with_torch: bool = True,
                **model_options) -> list[dict]:
    mc = model_config(spec, **model_options)
    tc = TrainConfig(steps=1000, batch_size=spec["batch"], warmup=10)
    b, t = spec["batch"], mc.max_len
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (b, t + 1), 0, mc.vocab_size)
    x, y = tokens[:, :-1], tokens[:, 1:]

    ours_state = train.init_state(key, mc, tc)
    flops = train.model_flops_per_step(mc, b, train.non_embedding_params(ours_state.params))
    torch_step = _torch_step(mc, tc, ours_state.params, x, y) if with_torch and mc.dtype == "float32" else None
    t0 = time.perf_counter()
    compiled_ours = train.update.lower(ours_state, x, y, model_config=mc, train_config=tc).compile()
    compile_s = {"minitx": time.perf_counter() - t0}

    flax_step, flax_opt, ref = _flax_step_fn(mc, tc)
    variables = jax.tree.map(jnp.copy, ref.to_flax_model(ours_state.params, mc))   # own buffers: both donate
    flax_state = (variables, flax_opt.init(variables))
    t0 = time.perf_counter()
    compiled_flax = flax_step.lower(flax_state, x, y).compile()
    compile_s["flax"] = time.perf_counter() - t0

    states = {"minitx": ours_state, "flax": flax_state}

    def jax_step(impl, compiled):
        def one():
            states[impl], out = compiled(states[impl], x, y)
            return out
        return one

    steps_of = {"minitx": jax_step("minitx", compiled_ours), "flax": jax_step("flax", compiled_flax)}
    if torch_step is not None:
        steps_of["torch"], compile_s["torch"] = torch_step, None                 # eager: nothing compiled

    def run(impl: str, n: int) -> list[float]:
        """n timed steps of one implementation, each ending in block_until_ready."""
        return [_timed(steps_of[impl]) for _ in range(n)]

    for impl in steps_of:                                        # warm-up
        run(impl, 2)
    per_block = max(1, steps // blocks)
    times = {impl: [] for impl in steps_of}
    block_medians = {impl: [] for impl in steps_of}
    for _ in range(blocks):
        for impl in steps_of:
            # PyTorch's OpenMP threads spin for a while after its work; a short pause
            # lets them go idle before the next implementation's block is timed.
            time.sleep(BLOCK_PAUSE_S)
            block = run(impl, per_block)
            times[impl] += block
            block_medians[impl].append(statistics.median(block))

    def paired(other: str) -> float | None:
        """Median over blocks of median(minitx) / median(other) in the same block."""
        if other not in block_medians:
            return None
        return round(statistics.median(a / c for a, c in zip(block_medians["minitx"], block_medians[other])), 3)

    rows = []
    for impl, ts in times.items():
        med = statistics.median(ts)
        compiled_in = compile_s[impl]
        rows.append({"config": name, "impl": impl, "batch": b, "context": t,
                     "compile_s": None if compiled_in is None else round(compiled_in, 3), "steps": len(ts),
                     "step_ms_median": round(1e3 * med, 3),
                     "step_ms_min": round(1e3 * min(ts), 3), "step_ms_max": round(1e3 * max(ts), 3),
                     "tokens_per_s": round(b * t / med, 1), "model_gflops_per_step": round(flops / 1e9, 3),
                     "mfu": round(flops / med / (peak * 1e9), 4), "peak_memory_mb": round(peak_memory_mb(), 1),
                     "ratio_minitx_over_flax": paired("flax"), "ratio_minitx_over_torch": paired("torch")})
    return rows


# ----------------------------------------------------------------------------- loop


def bench_loop(name: str, spec: dict, *, steps: int, reps: int = 5, **model_options) -> dict:
    """tokens/s of `train.fit` (the loop behind `minitx train`) against the bare jitted step.

    Bare: `steps` calls of `train.train_step` back to back, one sync at the end.
    Loop: `train.fit` over the same number of steps, logging every 10 (losses fetched
    then, checked for NaN, a line printed), no evaluation or checkpoint. Both start
    compiled; runs alternate, bare then loop, `reps` times; medians are reported.
    """
    mc = model_config(spec, **model_options)
    tc = TrainConfig(steps=steps, batch_size=spec["batch"], warmup=0, log_every=10, eval_every=10 * steps,
                     save_every=10 * steps)                    # one config: the loop reuses the bare step's compile
    init_key, data_key = train.keys(0)
    data = jax.random.randint(data_key, (100_000,), 0, mc.vocab_size)

    def bare(state, n: int):
        for _ in range(n):
            state, metrics = train.train_step(state, data, data_key, model_config=mc, train_config=tc,
                                              mesh=None, fsdp=False)      # as fit calls it
        return metrics["loss"]

    def loop(state, n: int):
        return train.fit(state, data=data, data_key=data_key, model_config=mc, train_config=tc,
                         out=io.StringIO()).state.step

    def fresh():
        return train.init_state(init_key, mc, tc)

    _sync(bare(fresh(), 1))                                                 # compile (both share train_step)
    times = {"bare": [], "loop": []}
    for _ in range(reps):
        for kind, run in (("bare", bare), ("loop", loop)):
            state = _sync(fresh())
            times[kind].append(_timed(lambda: run(state, steps)))
    tokens = steps * spec["batch"] * mc.max_len
    bare_tps, loop_tps = (tokens / statistics.median(times[k]) for k in ("bare", "loop"))
    return {"config": name, "steps": steps, "bare_tokens_per_s": round(bare_tps, 1),
            "loop_tokens_per_s": round(loop_tps, 1), "loop_over_bare": round(loop_tps / bare_tps, 3)}


# ----------------------------------------------------------------------------- decode


def per_token_ms(probe_ms: float, one_token_ms: float, probe_tokens: int) -> float | None:
    """(time of probe_tokens tokens - time of 1) / (probe_tokens - 1), or None when the
    difference is not positive: the per-token cost is below the timer's noise there."""
    ms = (probe_ms - one_token_ms) / (probe_tokens - 1)
    return round(ms, 4) if ms > 0 else None


def bench_decode(name: str, spec: dict, *, batch: int, new_tokens: int, probe_tokens: int, reps: int,
                 **model_options) -> list[dict]:
    mc = model_config(spec, **model_options)
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
        early = per_token_ms(_median_ms(make(short, probe_tokens), r), prefill_short, probe_tokens)
        late_ms = per_token_ms(_median_ms(make(late, probe_tokens), r), prefill_late, probe_tokens)
        row = {"config": name, "batch": batch, "mode": mode, "new_tokens": new_tokens,
               "prefill_ms": round(prefill_short, 3), "tokens_per_s": round(batch * new_tokens / total_ms * 1e3, 1),
               "ms_per_token_early": early, "ms_per_token_late": late_ms}
        if mode == "cached":
            # Each decode step must read every parameter and the whole (L, B, S, H, K) key and value cache.
            cache = model.init_cache(mc, batch)
            bytes_read = sum(a.nbytes for a in jax.tree.leaves(params)) + cache.k.nbytes + cache.v.nbytes
            row["bytes_per_token"] = int(bytes_read)
            row["achieved_gbs"] = None if late_ms is None else round(bytes_read / (late_ms / 1e3) / 1e9, 2)
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
        ["config", "impl", "compile s", "step ms (median)", "min", "max", "tokens/s", "MFU", "minitx/flax",
         "minitx/torch"],
        [[r["config"], r["impl"], "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}",
          f"{r['step_ms_median']:.2f}", f"{r['step_ms_min']:.2f}", f"{r['step_ms_max']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
          *(f"{r[k]:.2f}" if r["impl"] == "minitx" and r[k] is not None else "" for k in
            ("ratio_minitx_over_flax", "ratio_minitx_over_torch"))] for r in result["train"]], out)
    _markdown_table(
        ["config", "steps", "bare step tokens/s", "train.fit tokens/s", "fit/bare"],
        [[r["config"], r["steps"], f"{r['bare_tokens_per_s']:,.0f}", f"{r['loop_tokens_per_s']:,.0f}",
          f"{r['loop_over_bare']:.3f}"] for r in result["loop"]], out)
    _markdown_table(
        ["config", "batch", "mode", "tokens/s", "prefill ms", "ms/token early", "ms/token late", "GB/s read"],
        [[r["config"], r["batch"], r["mode"], f"{r['tokens_per_s']:,.0f}", f"{r['prefill_ms']:.2f}",
          *("below noise" if r[k] is None else f"{r[k]:.3f}" for k in ("ms_per_token_early", "ms_per_token_late")),
          r.get("achieved_gbs") or ""]
         for r in result["decode"]], out)
    if "peak_gflops_bf16" in result:
        print(f"\nbfloat16 matmul peak {result['peak_gflops_bf16']:.0f} GFLOP/s", file=out)
    if "copy_bandwidth_gbs" in result:
        print(f"Device copy bandwidth: {result['copy_bandwidth_gbs']:.0f} GB/s", file=out)


def _model_option(text: str) -> tuple[str, object]:
    """'remat=none' -> ('remat', 'none'); numbers and booleans parsed, other values kept as text."""
    field, sep, value = text.partition("=")
    if not sep or field not in ModelConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=VALUE with FIELD one of ModelConfig's fields")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), help="override the suite's configs")
    p.add_argument("--steps", type=int, default=20, help="timed train steps per implementation")
    p.add_argument("--blocks", type=int, default=4, help="A/B alternation blocks")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--loop-steps", type=int, help="steps per timed run of the training-loop check "
                                                     "(default per config: " + str(LOOP_STEPS) + ")")
    p.add_argument("--attention", choices=attention.IMPLS, default="einsum",
                   help="minitx_fn's attention path (the Flax reference is unchanged)")
    p.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE", type=_model_option,
                   help="any other ModelConfig field for minitx_fn, e.g. remat=none, attention_block=0 "
                        "(the Flax reference is unchanged)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of both models; MFU is against the peak of this dtype")
    p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch rows even if torch is installed")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)

    on_gpu = jax.devices()[0].platform == "gpu"
    names = args.configs or SUITES[args.suite] + (["gpt2-small"] if on_gpu and args.suite == "full" else [])
    options = {"attention": args.attention, "dtype": args.dtype, **dict(args.option)}
    check_options(p, names, options)
    result = {"device": device_info(), "versions": versions(), "suite": args.suite,
              "options": options,
              "date": time.strftime("%Y-%m-%d"), "peak_gflops": matmul_peak_gflops(jnp.float32, 2048 if on_gpu else 1024)}
    if on_gpu:
        result["peak_gflops"] = matmul_peak_gflops(jnp.float32, 8192)
        result["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    if on_gpu or args.dtype == "bfloat16":
        result["peak_gflops_bf16"] = matmul_peak_gflops(jnp.bfloat16, 8192 if on_gpu else 1024)
    result["train"], result["loop"], result["decode"] = [], [], []
    with jax.numpy_dtype_promotion("standard"):
        for name in names:
            print(f"train: {name}", file=sys.stderr, flush=True)
            peak = result["peak_gflops_bf16" if args.dtype == "bfloat16" else "peak_gflops"]
            result["train"] += bench_train(name, CONFIGS[name], peak, steps=args.steps, blocks=args.blocks,
                                           with_torch=not args.no_torch, **options)
        for name in names:
            print(f"loop: {name}", file=sys.stderr, flush=True)
            result["loop"].append(bench_loop(name, CONFIGS[name], steps=args.loop_steps or LOOP_STEPS[name],
                                             **options))
        for name in names:
            if name == "gpt2-small":
                continue
            for batch in (1, 8):
                print(f"decode: {name} batch {batch}", file=sys.stderr, flush=True)
                result["decode"] += bench_decode(name, CONFIGS[name], batch=batch, new_tokens=args.new_tokens,
                                                 probe_tokens=min(32, args.new_tokens), reps=3, **options)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
