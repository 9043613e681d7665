"""Time the jitted train step and decode, side by side with the Flax reference.

Run from the repository root (the Flax reference lives in tests/):

    python -m benchmarks --suite quick --json out.json

Method. Compile time is measured separately (lower + compile). Every timed call
ends in block_until_ready. Train steps of minitx_fn (A) and Flax (B) alternate in
blocks, A B A B ..., on the same batch and optimiser, so that drift of a shared,
noisy machine hits both alike; the ratio reported is the median over block pairs
of median(A) / median(B). MFU is model FLOPs per step (6 N B T + 12 L B T^2 D,
N = non-embedding parameters) over the step time and the matmul peak measured in
the same run; beside it the FLOPs XLA's cost analysis counts in the compiled step
(`compiled.cost_analysis()`), and its MFU. The loop rows count the XLA compilations
that happen while the already compiled step is timed: 0 means one compile per shape.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import (CONFIGS, alternate, check_options, copy_bandwidth_gbs, count_compiles, device_info,
                               flops_per_step, xla_flops_per_step,
                               check_output_path, matmul_peak_gflops, median_ms, model_config, model_option,
                               paired_ratio, peak_memory_mb, positive_int, sync, timed, versions)
from minitx_fn import generate as gen
from minitx_fn import loop, memory, runs, train
from minitx_fn.config import TrainConfig
from minitx_fn.layers import attention

BLOCK_PAUSE_S = 0.25
LOOP_STEPS = {"micro": 20, "tiny": 200, "baby": 60, "medium": 10, "gpt2-small": 10}   # ~2-12 s per run on 2 cores
SUITES = {"quick": ["tiny", "baby"], "full": ["tiny", "baby", "medium"], "scaling": []}
# The scaling sweep: context T at a fixed width, then width D at a fixed context.
SCALING = {"context": dict(d_model=128, n_layers=4, n_heads=4, batch=8, values=[64, 128, 256, 512, 1024]),
           "width": dict(max_len=256, n_layers=4, n_heads=4, batch=8, values=[64, 128, 256, 384, 512, 768])}


# ----------------------------------------------------------------------------- train


def _flax_step_fn(mc, tc: TrainConfig):
    """The Flax reference's train step with minitx_fn's optimiser (decay on its kernels and embedding)."""
    from tests import flax_reference as ref

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key in ("kernel", "embedding"), params)

    opt = train.make_optimizer(tc.optimizer, mask=decay_mask)

    def step(state, x, y):
        variables, opt_state = state
        loss, grads = jax.value_and_grad(ref.flax_loss)(variables, x, y, mc)
        updates, opt_state = opt.update(grads, opt_state, variables)
        return (optax.apply_updates(variables, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0), opt, ref


def _torch_step(mc, tc: TrainConfig, params: dict, x, y):
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
    first, ours = float(step(xt, yt)), float(train.cross_entropy(mc.apply(params, x), y))
    if abs(first - ours) > 1e-4 * max(1.0, abs(ours)):
        raise AssertionError(f"PyTorch's first loss {first} differs from minitx_fn's {ours}")
    return lambda: step(xt, yt)


def bench_train(name: str, spec: dict, peak: float, *, steps: int, blocks: int, with_torch: bool = True,
                **model_options) -> list[dict]:
    mc = model_config(spec, **model_options)
    tc = TrainConfig(steps=1000, batch_size=spec["batch"], optimizer={"warmup": 10})
    b, t = spec["batch"], mc.max_len
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (b, t + 1), 0, mc.vocab_size)
    x, y = tokens[:, :-1], tokens[:, 1:]

    ours_state = train.init_state(key, mc, tc.optimizer)
    flops = flops_per_step(mc, b)
    torch_step = _torch_step(mc, tc, ours_state.params, x, y) if with_torch and mc.dtype == "float32" else None
    t0 = time.perf_counter()
    compiled_ours = train.train_step.lower(ours_state, (x, y), model=mc, optimizer_config=tc.optimizer).compile()
    compile_s = {"minitx": time.perf_counter() - t0}

    flax_step, flax_opt, ref = _flax_step_fn(mc, tc)
    variables = jax.tree.map(jnp.copy, ref.to_flax_model(ours_state.params, mc))   # own buffers: both donate
    flax_state = (variables, flax_opt.init(variables))
    t0 = time.perf_counter()
    compiled_flax = flax_step.lower(flax_state, x, y).compile()
    compile_s["flax"] = time.perf_counter() - t0

    states = {"minitx": ours_state, "flax": flax_state}

    def ours():
        states["minitx"], metrics = compiled_ours(states["minitx"], (x, y))
        return metrics

    def theirs():
        states["flax"], loss = compiled_flax(states["flax"], x, y)
        return loss

    xla_flops = {"minitx": xla_flops_per_step(compiled_ours), "flax": xla_flops_per_step(compiled_flax)}
    steps_of = {"minitx": ours, "flax": theirs}
    if torch_step is not None:
        steps_of["torch"], compile_s["torch"] = torch_step, None                 # eager: nothing compiled
    blocks_of = alternate(steps_of, blocks=blocks, per_block=max(1, steps // blocks), pause_s=BLOCK_PAUSE_S)

    rows = []
    for impl, impl_blocks in blocks_of.items():
        ts = [t for block in impl_blocks for t in block]
        med = statistics.median(ts)
        compiled_in = compile_s[impl]
        rows.append({"config": name, "impl": impl, "batch": b, "context": t,
                     "compile_s": None if compiled_in is None else round(compiled_in, 3), "steps": len(ts),
                     "step_ms_median": round(1e3 * med, 3),
                     "step_ms_min": round(1e3 * min(ts), 3), "step_ms_max": round(1e3 * max(ts), 3),
                     "tokens_per_s": round(b * t / med, 1), "model_gflops_per_step": round(flops / 1e9, 3),
                     "mfu": round(flops / med / (peak * 1e9), 4), "peak_memory_mb": round(peak_memory_mb(), 1),
                     "xla_gflops_per_step": None if xla_flops.get(impl) is None else round(xla_flops[impl] / 1e9, 3),
                     "mfu_xla": None if xla_flops.get(impl) is None else round(xla_flops[impl] / med / (peak * 1e9), 4),
                     **{f"ratio_minitx_over_{other}": round(paired_ratio(blocks_of["minitx"], blocks_of[other]), 3)
                        if other in blocks_of else None for other in ("flax", "torch")}})
    return rows


# ----------------------------------------------------------------------------- loop


def bench_loop(name: str, spec: dict, *, steps: int, reps: int = 5, **model_options) -> dict:
    """tokens/s of `loop.fit` (the loop behind `minitx train`) against the bare jitted step.

    Bare: `steps` calls of `train.train_step` on `train.batch_at` batches back to back,
    one sync at the end. Loop: `loop.fit` over the same steps and batches, logging
    every 10 (losses fetched then, checked for NaN, a line printed), no evaluation or
    checkpoint. Both start compiled (one untimed run each); runs alternate, bare then
    loop, `reps` times; medians are reported, and the compilations while they ran.
    """
    mc = model_config(spec, **model_options)
    tc = TrainConfig(steps=steps, batch_size=spec["batch"], log_every=10, eval_every=10 * steps,
                     save_every=10 * steps, optimizer={"warmup": 0})                    # one config: the loop reuses the bare step's compile
    init_key, data_key, _ = train.keys(0)
    data = jax.random.randint(data_key, (100_000,), 0, mc.vocab_size)

    def step(state, batch):
        return train.train_step(state, batch, model=mc, optimizer_config=tc.optimizer)   # as minitx train

    def next_batch(step_number):
        return train.batch_at(data, data_key, step_number, batch_size=tc.batch_size, context=mc.max_len)

    def bare(state, n: int):
        for _ in range(n):
            state, metrics = step(state, next_batch(state.step))
        return metrics["loss"]

    def fitted(state, n: int):
        return loop.fit(state, step=step, next_batch=next_batch, steps=tc.steps, log_every=tc.log_every,
                        eval_every=tc.eval_every, save_every=tc.save_every, tokens_per_step=tc.batch_size * mc.max_len,
                        out=io.StringIO()).state.step

    def fresh():
        return train.init_state(init_key, mc, tc.optimizer)

    sync(bare(fresh(), 1))                                                  # compile (both share train_step)
    sync(fitted(fresh(), 1))                                                # and what the loop adds (its logging)
    times = {"bare": [], "loop": []}
    with count_compiles() as compiles:
        for _ in range(reps):
            for kind, run in (("bare", bare), ("loop", fitted)):
                state = sync(fresh())
                times[kind].append(timed(lambda: run(state, steps)))
    tokens = steps * spec["batch"] * mc.max_len
    bare_tps, loop_tps = (tokens / statistics.median(times[k]) for k in ("bare", "loop"))
    return {"config": name, "steps": steps, "bare_tokens_per_s": round(bare_tps, 1),
            "loop_tokens_per_s": round(loop_tps, 1), "loop_over_bare": round(loop_tps / bare_tps, 3),
            "compiles_while_timed": len(compiles)}


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
    probe_tokens = max(2, min(probe_tokens, s // 2))            # the late prompt must leave it room
    params = mc.init(jax.random.key(0))
    key = jax.random.key(1)
    short = [[1]] * batch
    late = [[1] * (s - probe_tokens - 1)] * batch
    rows = []

    def cached(prompts, n):
        return lambda: gen.generate(params, prompts, model=mc, key=key, max_new_tokens=n)

    def recompute(prompts, n):
        return lambda: gen.generate_recompute(params, np.asarray(prompts), model=mc, key=key, max_new_tokens=n)

    for mode, make, r in (("cached", cached, reps), ("recompute", recompute, 1)):
        make(short, new_tokens)()                                  # compile
        make(short, probe_tokens)(), make(late, probe_tokens)(), make(late, 1)(), make(short, 1)()
        total_ms = median_ms(make(short, new_tokens), r)
        prefill_short = median_ms(make(short, 1), r)
        prefill_late = median_ms(make(late, 1), r)
        early = per_token_ms(median_ms(make(short, probe_tokens), r), prefill_short, probe_tokens)
        late_ms = per_token_ms(median_ms(make(late, probe_tokens), r), prefill_late, probe_tokens)
        row = {"config": name, "batch": batch, "mode": mode, "new_tokens": new_tokens,
               "prefill_ms": round(prefill_short, 3), "tokens_per_s": round(batch * new_tokens / total_ms * 1e3, 1),
               "ms_per_token_early": early, "ms_per_token_late": late_ms}
        if mode == "cached":
            # Each decode step must read every parameter and the whole key and value cache.
            cache = mc.init_cache(batch)
            bytes_read = sum(a.nbytes for a in jax.tree.leaves((params, cache)))
            row["bytes_per_token"] = int(bytes_read)
            row["achieved_gbs"] = None if late_ms is None else round(bytes_read / (late_ms / 1e3) / 1e9, 2)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- scaling


def bench_scaling(*, steps: int, sweep: dict = SCALING, **model_options) -> list[dict]:
    """minitx_fn's train step across context lengths (fixed width) and widths (fixed
    context): median step time over `steps` steps, model FLOPs, and the memory XLA plans
    for the step (arguments + outputs + temporaries, from the compiled program's
    memory analysis, which a CPU reports too)."""
    rows = []
    for axis in ("context", "width"):
        values = sweep[axis]["values"]
        spec = {k: v for k, v in sweep[axis].items() if k != "values"}
        for value in values:
            sizes = {"max_len": value} if axis == "context" else {"d_model": value}
            sizes["n_heads"] = spec["n_heads"] if axis == "context" or value % spec["n_heads"] == 0 else 1
            mc = model_config({"vocab_size": 65, **spec, **sizes}, **model_options)
            tc = TrainConfig(steps=1000, batch_size=spec["batch"], optimizer={"warmup": 10})
            tokens = jax.random.randint(jax.random.key(0), (spec["batch"], mc.max_len + 1), 0, mc.vocab_size)
            batch = (tokens[:, :-1], tokens[:, 1:])
            state = {"s": train.init_state(jax.random.key(0), mc, tc.optimizer)}
            compiled = train.train_step.lower(state["s"], batch, model=mc, optimizer_config=tc.optimizer).compile()

            def one():
                state["s"], metrics = compiled(state["s"], batch)
                return metrics

            for _ in range(2):
                timed(one)
            med = statistics.median(timed(one) for _ in range(steps))
            analysis = compiled.memory_analysis()
            planned = None if analysis is None else (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                                                     + analysis.temp_size_in_bytes)
            flops = flops_per_step(mc, spec["batch"])
            rows.append({"axis": axis, "context": mc.max_len, "width": mc.d_model, "batch": spec["batch"],
                         "step_ms": float(f"{1e3 * med:.4g}"), "model_gflops_per_step": float(f"{flops / 1e9:.4g}"),
                         "planned_memory_mb": None if planned is None else round(planned / 2**20, 1)})
    return rows


# ----------------------------------------------------------------------------- report


def _markdown_table(header: list[str], rows: list[list], out) -> None:
    """A markdown table, or nothing for no rows (the scaling suite times no configs)."""
    if not rows:
        return
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
        ["config", "impl", "compile s", "step ms (median)", "min", "max", "tokens/s", "MFU", "XLA GFLOP/step",
         "MFU (XLA's FLOPs)", "minitx/flax", "minitx/torch"],
        [[r["config"], r["impl"], "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}",
          f"{r['step_ms_median']:.2f}", f"{r['step_ms_min']:.2f}", f"{r['step_ms_max']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
          *(("-", "-") if r.get("xla_gflops_per_step") is None else
            (f"{r['xla_gflops_per_step']:.2f}", f"{100 * r['mfu_xla']:.1f}%")),
          *(f"{r[k]:.2f}" if r["impl"] == "minitx" and r[k] is not None else "" for k in
            ("ratio_minitx_over_flax", "ratio_minitx_over_torch"))] for r in result["train"]], out)
    _markdown_table(
        ["config", "steps", "bare step tokens/s", "loop.fit tokens/s", "fit/bare", "compiles while timed"],
        [[r["config"], r["steps"], f"{r['bare_tokens_per_s']:,.0f}", f"{r['loop_tokens_per_s']:,.0f}",
          f"{r['loop_over_bare']:.3f}", r.get("compiles_while_timed", "")] for r in result["loop"]], out)
    _markdown_table(
        ["config", "batch", "mode", "tokens/s", "prefill ms", "ms/token early", "ms/token late", "GB/s read"],
        [[r["config"], r["batch"], r["mode"], f"{r['tokens_per_s']:,.0f}", f"{r['prefill_ms']:.2f}",
          *("below noise" if r[k] is None else f"{r[k]:.3f}" for k in ("ms_per_token_early", "ms_per_token_late")),
          r.get("achieved_gbs") or ""]
         for r in result["decode"]], out)
    if result.get("scaling"):
        _markdown_table(["axis", "context T", "width D", "step ms", "GFLOP per step", "planned memory MB"],
                        [[r["axis"], r["context"], r["width"], f"{r['step_ms']:.1f}", r["model_gflops_per_step"],
                          r["planned_memory_mb"]] for r in result["scaling"]], out)
    if "peak_gflops_bf16" in result:
        print(f"\nbfloat16 matmul peak {result['peak_gflops_bf16']:.0f} GFLOP/s", file=out)
    if "copy_bandwidth_gbs" in result:
        print(f"Device copy bandwidth: {result['copy_bandwidth_gbs']:.0f} GB/s", file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), help="override the suite's configs")
    p.add_argument("--steps", type=positive_int, default=20, help="timed train steps per implementation")
    p.add_argument("--blocks", type=positive_int, default=4, help="A/B alternation blocks")
    p.add_argument("--new-tokens", type=positive_int, default=256)
    p.add_argument("--loop-steps", type=positive_int, help="steps per timed run of the training-loop check "
                                                     "(default per config: " + str(LOOP_STEPS) + ")")
    p.add_argument("--attention", choices=attention.IMPLS, default="einsum",
                   help="minitx_fn's attention path (the Flax reference is unchanged)")
    p.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE", type=model_option,
                   help="any other ModelConfig field for minitx_fn, e.g. remat=none, attention_block=0 "
                        "(the Flax reference is unchanged)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of both models; MFU is against the peak of this dtype")
    p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch rows even if torch is installed")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="FILE.png", help="draw the results (python -m benchmarks.plot redraws a --json)")
    p.add_argument("--scaling-steps", type=positive_int, default=5, help="timed steps per point of --suite scaling")
    p.add_argument("--decode-batches", type=positive_int, nargs="+", default=[1, 8], help="batch sizes of the "
                   "decode rows (default 1 8)")
    p.add_argument("--peak-n", type=positive_int, help="size of the matmul that measures the peak (default 1024 on "
                   "a CPU, 8192 on a GPU)")
    args = p.parse_args(argv)
    if importlib.util.find_spec("tests") is None or importlib.util.find_spec("tests.flax_reference") is None:
        p.error("the Flax rows need the repository's tests/flax_reference.py: run python -m benchmarks from the "
                "repository's root folder")

    on_gpu = jax.devices()[0].platform == "gpu"
    names = args.configs or SUITES[args.suite] + (["gpt2-small"] if on_gpu and args.suite == "full" else [])
    options = {"attention": args.attention, "dtype": args.dtype, **dict(args.option)}
    check_options(p, names, options)
    if args.json:
        check_output_path(p, args.json, "--json")
    if args.plot:
        check_output_path(p, args.plot, "--plot")
        if not args.plot.lower().endswith((".png", ".pdf", ".svg")):
            p.error(f"--plot {args.plot!r}: give a .png, .pdf or .svg file name")
    for name in names:
        mc = model_config(CONFIGS[name], **options)
        try:
            memory.check(memory.training_bytes(mc, CONFIGS[name]["batch"]) + memory.generation_bytes(
                mc, max(args.decode_batches), args.new_tokens), f"config {name}",
                "choose smaller --option values, --decode-batches or fewer --new-tokens")
        except memory.MemoryBudgetError as e:
            p.error(str(e))
    peak_n = args.peak_n or (8192 if on_gpu else 1024)
    try:                                          # three n x n float32 matrices: the operands and the product
        memory.check(3 * 4 * peak_n**2, f"--peak-n {peak_n}", "choose a smaller --peak-n")
    except memory.MemoryBudgetError as e:
        p.error(str(e))
    result = {"device": device_info(), "versions": versions(), "suite": args.suite, "options": options,
              "date": time.strftime("%Y-%m-%d"), "peak_gflops": matmul_peak_gflops(jnp.float32, peak_n)}
    if on_gpu:
        result["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    if on_gpu or args.dtype == "bfloat16":
        result["peak_gflops_bf16"] = matmul_peak_gflops(jnp.bfloat16, peak_n)
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
            for batch in args.decode_batches:
                print(f"decode: {name} batch {batch}", file=sys.stderr, flush=True)
                result["decode"] += bench_decode(name, CONFIGS[name], batch=batch, new_tokens=args.new_tokens,
                                                 probe_tokens=min(32, args.new_tokens), reps=3, **options)
        if args.suite == "scaling" and not args.configs:
            print("scaling", file=sys.stderr, flush=True)
            result["scaling"] = bench_scaling(steps=args.scaling_steps, **options)
    print_table(result)
    if args.plot:
        from benchmarks import plot
        plot.draw(result, args.plot)
        print(f"Pictures: {args.plot}")
    if args.json:
        runs.write_whole(args.json, json.dumps(result, indent=1) + "\n")
    return 0
