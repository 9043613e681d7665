"""The figures of README.md and docs/*.md, rendered from the JSON the benchmarks wrote.

Every measured figure in those pages stands between two markers,

    <!-- figures:NAME -->
    ...what RENDER[NAME]() returns, written here...
    <!-- /figures -->

and NAME's function below reads it from a JSON file in the repository
(`docs/figures/*.json`, `benchmarks/results-*.json`), so a table cannot drift from
the run that made it. Dated history stays in `benchmarks/NOTES.md`.

    python docs/figures.py            # rewrite every block from its JSON
    python docs/figures.py --check    # exit 1, naming each block that differs (tests/test_docs.py)

A new benchmark result: save its JSON under docs/figures/, point the function at it,
run the first command, and read the diff.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ("README.md", "docs/*.md")
BLOCK = re.compile(r"(<!-- figures:([a-z0-9-]+) -->\n)(.*?)(<!-- /figures -->)", re.S)

# The JSON each figure comes from (paths from the repository root).
BENCH_FULL = "benchmarks/results-cpu-2026-11-28.json"
BENCH_QUICK = "docs/figures/bench-quick-cpu-2026-12-03.json"
SCALING = "docs/figures/scaling-cpu-2026-11-30.json"
GPT2 = "docs/figures/gpt2-cpu-2026-12-03.json"
DATA = "docs/figures/data-cpu-2026-11-30.json"
DATA_BPE = "docs/figures/data-cpu-2026-11-30-bpe.json"
ACCUMULATE = "docs/figures/accumulate-cpu-2026-12-02.json"
FINETUNE = "docs/figures/finetune-cpu-2026-12-02.json"
ARCH = "docs/figures/arch-cpu-2026-12-03.json"
SPECULATIVE = "docs/figures/speculative-cpu-2026-12-03.json"
QUANTIZE = "docs/figures/quantize-cpu-2026-12-07.json"
INT8_LOOP = "docs/figures/int8-loop-cpu-2026-12-07.json"
EVAL_MEMORY = "docs/figures/eval-memory-cpu-2026-12-07.json"
QUALITY = "docs/figures/quality-cpu-2026-12-07.json"


def load(path: str) -> dict:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return json.load(f)


def date_of(path: str, d: dict) -> str:
    """The run's date: its `date` field, else the one in its file name."""
    return d.get("date") or re.search(r"\d{4}-\d{2}-\d{2}", os.path.basename(path)).group(0)


def source(path: str, command: str, *more: str) -> str:
    """The line under a table: the command, the run's date, device and versions, the JSON."""
    d = load(path)
    device = d.get("device")
    device = f"{device['kind']} ({device['host']})" if isinstance(device, dict) else device
    versions = d.get("versions") or {k: d[k] for k in ("jax", "torch", "transformers") if k in d}
    shown = ", ".join(f"{k} {versions[k]}" for k in ("jax", "flax", "torch", "transformers") if k in versions)
    files = ", ".join(f"`{p}`" for p in (path, *more))
    return f"<sub>`{command}`, {date_of(path, d)}, {device}, {shown}; JSON: {files}.</sub>"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def n(x, digits=0) -> str:
    """A number with thousands separators."""
    return f"{x:,.{digits}f}"


def sci(x) -> str:
    """0.0003 -> 3e-4."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def e(x) -> str:
    """3.5e-06 -> 3.5e-6."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def pct(x, digits=1) -> str:
    return f"{100 * x:.{digits}f}%"


def rows_by(rows: list[dict], key: str) -> dict:
    return {r[key]: r for r in rows}


# ----------------------------------------------------------------------------- README


def headline() -> str:
    full, gpt2, ft, arch = load(BENCH_FULL), load(GPT2), load(FINETUNE), load(ARCH)
    acc, data = load(ACCUMULATE), load(DATA)
    train = {(r["config"], r["impl"]): r for r in full["train"]}
    dec = {(r["config"], r["batch"], r["mode"]): r for r in full["decode"]}
    a = rows_by(arch["rows"], "arch")
    short = gpt2["decode"]["batch 1, short prompt"]
    f = rows_by(ft["rows"], "mode")
    k = rows_by(acc["rows"], "accumulate")
    prep = rows_by(data["prepare"], "tokenizer")
    total = f["full"]["trained_parameters"]
    rows = [
        ["Tiny Shakespeare, nanoGPT's CPU recipe (`--preset shakespeare-baby`): validation loss",
         f"**{a['gpt']['val_loss']:.4f}** (`--arch gpt`), **{a['llama']['val_loss']:.4f}** (`--arch llama`)",
         date_of(ARCH, arch), f"[arch]({ARCH})"],
        ["Train step: our time over the same model's in Flax (baby, medium; below 1 is faster)",
         f"{train[('baby', 'minitx')]['ratio_minitx_over_flax']:.2f}x, "
         f"{train[('medium', 'minitx')]['ratio_minitx_over_flax']:.2f}x",
         date_of(BENCH_FULL, full), f"[bench]({BENCH_FULL})"],
        ["... over PyTorch eager's, nanoGPT style (baby, medium)",
         f"{train[('baby', 'minitx')]['ratio_minitx_over_torch']:.2f}x, "
         f"{train[('medium', 'minitx')]['ratio_minitx_over_torch']:.2f}x",
         date_of(BENCH_FULL, full), f"[bench]({BENCH_FULL})"],
        ["Decoding with the KV cache against recomputing the window (baby, batch 1)",
         f"{n(dec[('baby', 1, 'cached')]['tokens_per_s'])} against "
         f"{n(dec[('baby', 1, 'recompute')]['tokens_per_s'])} tokens/s",
         date_of(BENCH_FULL, full), f"[bench]({BENCH_FULL})"],
        ["GPT-2 small decoding, batch 1, against transformers' `generate`",
         f"{short['ours_tokens_per_s']:.1f} against {short['transformers_tokens_per_s']:.1f} tokens/s; "
         f"{pct(short['bandwidth_utilisation'], 0)} of the memory bandwidth",
         date_of(GPT2, gpt2), f"[gpt2]({GPT2})"],
        ["GPT-2 small imported: logits against transformers'",
         f"{e(gpt2['relative_logit_diff'])} of the largest logit", date_of(GPT2, gpt2), f"[gpt2]({GPT2})"],
        ["LoRA (rank 8) against a full fine-tune, 500 steps: validation loss",
         f"{f['lora']['val_loss']:.3f} against {f['full']['val_loss']:.3f}, training "
         f"{pct(f['lora']['trained_parameters'] / total)} of the parameters",
         date_of(FINETUNE, ft), f"[finetune]({FINETUNE})"],
        ["Gradient accumulation (baby, batch 64), K = 1 and 16: the step's temporaries",
         f"{k[1]['temp_mb']:.0f} and {k[16]['temp_mb']:.1f} MB", date_of(ACCUMULATE, acc),
         f"[accumulate]({ACCUMULATE})"],
        ["A 1 GiB text prepared (`minitx prepare`), byte and char tokenizers",
         f"{prep['byte']['mb_per_s']:.0f} and {prep['char']['mb_per_s']:.0f} MB/s", date_of(DATA, data),
         f"[data]({DATA})"],
    ]
    return table(["measured", "figure", "run", "JSON"], rows)


# ----------------------------------------------------------------------------- docs/performance.md


def train_step() -> str:
    d = load(BENCH_FULL)
    rows = [[r["config"], r["impl"], "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}",
             f"{r['step_ms_median']:.2f}", f"{r['step_ms_min']:.2f}", f"{r['step_ms_max']:.2f}",
             n(r["tokens_per_s"]), pct(r["mfu"]),
             *(f"{r[k]:.2f}" if r["impl"] == "minitx" else "" for k in
               ("ratio_minitx_over_flax", "ratio_minitx_over_torch"))] for r in d["train"]]
    return "\n\n".join([
        table(["config", "impl", "compile s", "step ms (median)", "min", "max", "tokens/s", "MFU", "minitx/flax",
               "minitx/torch"], rows),
        f"Float32 matmul peak measured in the same run: {d['peak_gflops']:.1f} GFLOP/s; torch with "
        f"{d['versions']['torch_threads']} threads.",
        source(BENCH_FULL, "python -m benchmarks --suite full")])


def train_card() -> str:
    d = load(BENCH_QUICK)
    rows = [[r["config"], r["impl"], f"{r['compile_s']:.2f}", f"{r['step_ms_median']:.2f}", pct(r["mfu"]),
             f"{r['xla_gflops_per_step']:.2f}", pct(r["mfu_xla"])] for r in d["train"] if r["impl"] != "torch"]
    compiles = ", ".join(f"{r['compiles_while_timed']} at {r['config']}" for r in d["loop"])
    baby = {r["impl"]: r for r in d["train"] if r["config"] == "baby"}
    return "\n\n".join([
        table(["config", "impl", "compile s", "step ms (median)", "MFU (6 N B T + attention)", "XLA GFLOP/step",
               "MFU (XLA's FLOPs)"], rows),
        f"At baby the formula gives {baby['flax']['model_gflops_per_step']:.1f} GFLOP a step; XLA counts "
        f"{baby['flax']['xla_gflops_per_step']:.2f} in Flax's step and {baby['minitx']['xla_gflops_per_step']:.2f} "
        f"in ours. Compilations while the step and the loop were timed: {compiles}. Float32 matmul peak in this "
        f"run: {d['peak_gflops']:.1f} GFLOP/s.",
        source(BENCH_QUICK, "python -m benchmarks --suite quick")])


def loop() -> str:
    d = load(BENCH_FULL)
    rows = [[r["config"], r["steps"], n(r["bare_tokens_per_s"]), n(r["loop_tokens_per_s"]),
             f"{r['loop_over_bare']:.3f}"] for r in d["loop"]]
    return "\n\n".join([table(["config", "steps", "bare step tokens/s", "loop.fit tokens/s", "fit/bare"], rows),
                        source(BENCH_FULL, "python -m benchmarks --suite full")])


def decode() -> str:
    d = load(BENCH_FULL)
    rows = [[r["config"], r["batch"], r["mode"], n(r["tokens_per_s"]), f"{r['prefill_ms']:.2f}",
             *("below noise" if r[k] is None else f"{r[k]:.3f}" for k in ("ms_per_token_early", "ms_per_token_late")),
             r.get("achieved_gbs") or ""] for r in d["decode"]]
    by = {(r["config"], r["batch"], r["mode"]): r["tokens_per_s"] for r in d["decode"]}
    speed = {(c, b): by[(c, b, "cached")] / by[(c, b, "recompute")] for c, b, m in by if m == "cached"}
    return "\n\n".join([
        table(["config", "batch", "mode", "tokens/s", "prefill ms", "ms/token early", "ms/token late", "GB/s read"],
              rows),
        "The cached decoder's tokens/s over the recompute loop's: " + "; ".join(
            f"{c} {speed[(c, 1)]:.0f}x at batch 1, {speed[(c, 8)]:.0f}x at batch 8"
            for c in dict.fromkeys(c for c, _ in speed)) + ".",
        source(BENCH_FULL, "python -m benchmarks --suite full")])


def scaling() -> str:
    d = load(SCALING)
    pts = d["scaling"]
    rows = [[r["axis"], r["context"], r["width"], f"{r['step_ms']:,.1f}", r["model_gflops_per_step"],
             r["planned_memory_mb"]] for r in pts]
    ctx = [r for r in pts if r["axis"] == "context"]
    wid = [r for r in pts if r["axis"] == "width"]

    def grow(rs, key):
        return rs[-1][key] / rs[0][key]

    def ms_per_gflop(r):
        return r["step_ms"] / r["model_gflops_per_step"]

    tokens = ctx[-1]["context"] / ctx[0]["context"]
    return "\n\n".join([
        table(["axis", "context T", "width D", "step ms", "GFLOP per step", "planned memory MB"], rows),
        f"With context, {tokens:.0f}x the tokens cost {grow(ctx, 'model_gflops_per_step'):.0f}x the FLOPs "
        f"(attention's T² term) and {grow(ctx, 'step_ms'):.0f}x the time, "
        f"{min(map(ms_per_gflop, ctx)):.0f} to {max(map(ms_per_gflop, ctx)):.0f} ms per GFLOP throughout; the memory "
        f"XLA plans grows {grow(ctx, 'planned_memory_mb'):.0f}x. With width the time grows "
        f"{grow(wid, 'step_ms'):.0f}x for {grow(wid, 'model_gflops_per_step'):.0f}x the FLOPs: "
        f"{ms_per_gflop(wid[0]):.0f} ms per GFLOP at D = {wid[0]['width']}, {ms_per_gflop(wid[-1]):.0f} at "
        f"D = {wid[-1]['width']}, as wider matmuls run nearer the peak "
        f"({d['peak_gflops']:.0f} GFLOP/s in this run).",
        source(SCALING, "python -m benchmarks --suite scaling --scaling-steps 3")])


def gpt2_parity() -> str:
    d = load(GPT2)
    rows = [["`minitx import-hf` of the saved folder (read, check, write the run)",
             f"{d['import_s']:.1f} s; the run is {d['checkpoint_bytes'] / 1e9:.2f} GB (parameters and Adam's two "
             "moments)"],
            [f"logits of {d['logits_window']} random ids, ours against transformers'",
             f"largest difference {e(d['max_abs_logit_diff'])}, {e(d['relative_logit_diff'])} of the largest logit"]]
    return "\n\n".join([table([f"measured (GPT-2 small: {n(d['parameters'])} parameters, float32)", "figure"], rows),
                        source(GPT2, "python -m benchmarks.gpt2")])


def gpt2_decode() -> str:
    d = load(GPT2)

    def lengths(c):
        p = c["prompt_lengths"]
        return str(p[0]) if len(set(p)) == 1 else f"{min(p)} to {max(p)}"

    rows = [[case, lengths(c), f"{c['ours_tokens_per_s']:.1f}", f"{c['transformers_tokens_per_s']:.1f}",
             f"{c['ours_over_transformers']:.2f}x",
             f"{c['ours_first_token_ms']:.0f} / {c['transformers_first_token_ms']:.0f} ms",
             "yes" if c["greedy_equal"] else "no"] for case, c in d["decode"].items()]
    roof = [[case, f"{(c['weight_bytes'] + c['cache_bytes']) / 1e6:.0f} MB (cache: "
             + (f"{len(c['prompt_lengths'])} rows of " if len(c["prompt_lengths"]) > 1 else "")
             + f"{c['cache_slots']} slots, {c['cache_bytes'] / 1e6:.1f} MB)",
             f"{c['ours_step_ms']:.1f} ms", f"{c['read_gbs']:.1f} GB/s", pct(c["bandwidth_utilisation"], 0)]
            for case, c in d["decode"].items()]
    new = {c["new_tokens"] for c in d["decode"].values()}.pop()
    return "\n\n".join([
        f"{new} greedy tokens, prefill included:",
        table(["case", "prompt lengths", "ours tokens/s", "transformers tokens/s", "ours / transformers",
               "first token ours / theirs", "greedy tokens equal"], rows),
        f"Memory read bandwidth measured in the same run (the best of 10 sums of a 1 GiB array): "
        f"{d['read_bandwidth_gbs']} GB/s. A decode step reads the weights "
        f"({next(iter(d['decode'].values()))['weight_bytes'] / 1e6:.0f} MB, the tied head once) and the cache "
        "slots it attends over:",
        table(["case", "read per decode step", "step", "read rate", "share of the bandwidth"], roof),
        source(GPT2, "python -m benchmarks.gpt2")])


# ----------------------------------------------------------------------------- docs/training.md, docs/data.md


def accumulate() -> str:
    d = load(ACCUMULATE)
    rows = [[r["accumulate"], r["micro_batch"], f"{r['temp_mb']:.1f} MB", f"{r['arguments_mb']:.2f} MB",
             f"{r['step_ms_median']:.0f} ms"] for r in d["rows"]]
    return "\n\n".join([
        f"{d['config']}, batch {d['batch']}; temporaries and arguments (parameters, Adam's moments, the batch) "
        "from XLA's memory analysis of the compiled step, the step's time the median of 5:",
        table(["K (`--grad-accum`)", "micro-batch", "temporaries", "arguments", "step"], rows),
        source(ACCUMULATE, "python -m benchmarks.accumulate")])


def data_prepare() -> str:
    d, bpe = load(DATA), load(DATA_BPE)
    names = {"char": "`minitx prepare --tokenizer char`", "byte": "`minitx prepare --tokenizer byte`",
             "bpe": "`minitx prepare --tokenizer bpe` (4,096 ids, merges from the first 64 MB)"}
    rows = [[names[r["tokenizer"]], f"{r['wall_s']:.1f} s", f"{r['mb_per_s']:.1f} MB/s", f"{r['peak_rss_mb']} MB"]
            for r in d["prepare"] + bpe["prepare"]]
    t = d["train"]
    rows += [["`minitx train` once prepared (baby config, memory-mapped): from the process's start to "
              "\"Starting training...\"", f"{t['to_starting_s']:.1f} s", "", ""],
             ["... to the first step's line (its compilation included)", f"{t['to_first_step_s']:.1f} s", "",
              f"{t['peak_rss_mb']} MB for the whole run"]]
    return "\n\n".join([
        f"A {d['text']['mib']:,.0f} MiB text (SHA-256 `{d['text']['sha256'][:8]}...`), each step in a fresh process:",
        table(["step", "time", "rate", "peak resident memory"], rows),
        source(DATA, "python -m benchmarks.data", DATA_BPE)])


def data_batches() -> str:
    d = load(DATA)
    t = d["throughput"]
    ev = d["eval"]
    default = [r for r in ev if r["eval_tokens"] == "default"]
    whole = [r for r in ev if r["eval_tokens"] == "all"]
    text = (f"Training tokens/s at the baby config, the same compiled step fed by either path, {t['blocks']} "
            f"alternating blocks of {t['steps_per_block']} steps: memory-mapped {n(t['memmap_tokens_per_s'])}, "
            f"device-resident {n(t['device_tokens_per_s'])}; paired time ratio {t['memmap_over_device_time']:.3f}. "
            f"Evaluation with the default `--eval-tokens` ({n(default[0]['windows'])} windows): "
            + ", ".join(f"{r['seconds']:.1f}" for r in default) + " s with validation splits of "
            + ", ".join(n(r["validation_mb"]) for r in default) + " MB")
    if whole:
        text += (f"; every window of the {whole[0]['validation_mb']} MB split ({n(whole[0]['windows'])} windows) "
                 f"took {whole[0]['seconds']:.0f} s")
    return text + ".\n\n" + source(DATA, "python -m benchmarks.data")


# ----------------------------------------------------------------------------- docs/finetuning.md


def finetune_memory() -> str:
    d = load(FINETUNE)["memory"]
    names = {"full": "full fine-tune (parameters and Adam's two moments)",
             "lora attn": f"LoRA rank {d['lora_rank']} on `attn` (base frozen)",
             "lora all": f"LoRA rank {d['lora_rank']} on `all`"}
    rows = [[names[r["mode"]], f"{n(r['arguments_mb'])} MB", f"{n(r['temp_mb'])} MB",
             f"{n(r['arguments_mb'] + r['temp_mb'])} MB"] for r in d["rows"]]
    m = rows_by(d["rows"], "mode")
    ratio = (m["full"]["arguments_mb"] + m["full"]["temp_mb"]) / (m["lora attn"]["arguments_mb"]
                                                                  + m["lora attn"]["temp_mb"])
    return "\n\n".join([
        f"GPT-2 small, context {d['context']}, batch {d['batch']}:",
        table(["GPT-2 small step", "arguments", "temporaries", "together"], rows),
        f"With adapters on the attention only, the step needs {ratio:.1f} times less memory than a full fine-tune.",
        source(FINETUNE, "python -m benchmarks.finetune")])


def finetune_recipe() -> str:
    d = load(FINETUNE)
    names = {"scratch": "from scratch", "full": "full fine-tune",
             "lora": f"LoRA, rank {d['lora']['rank']}, alpha {d['lora']['alpha']:g}, `{d['lora']['targets']}`"}
    f = rows_by(d["rows"], "mode")
    total = f["full"]["trained_parameters"]
    best = min(r["val_loss"] for r in d["rows"])
    rows = [[names[r["mode"]], sci(r["lr"]),
             "(random)" if r["val_loss_start"] is None else f"{r['val_loss_start']:.3f}",
             f"**{r['val_loss']:.3f}**" if r["val_loss"] == best else f"{r['val_loss']:.3f}",
             f"{r['seconds']:.1f} s",
             n(r["trained_parameters"]) + ("" if r["trained_parameters"] == total
                                            else f" ({pct(r['trained_parameters'] / total)})"),
             f"{r['checkpoint_mb']:.2f} MB", f"{r['arguments_mb']:.1f} + {r['temp_mb']:.1f} MB"] for r in d["rows"]]
    return "\n\n".join([
        table([f"{d['steps']} steps on the second half", "lr", "val loss at step 0", f"val loss at {d['steps']}",
               "time", "trained parameters", "checkpoint", "step: arguments + temporaries"], rows),
        f"The pretrained model's validation loss on the first half: {d['pretrain_val_loss']:.3f} after "
        f"{n(d['pretrain_steps'])} steps. LoRA's checkpoint is "
        f"{f['full']['checkpoint_mb'] / f['lora']['checkpoint_mb']:.1f} times smaller than the full fine-tune's "
        "(the base is referenced, not copied).",
        source(FINETUNE, "python -m benchmarks.finetune")])


# ----------------------------------------------------------------------------- docs/llama.md, docs/generation.md


def arch() -> str:
    d = load(ARCH)
    names = {"gpt": "`gpt`", "llama": "`llama`", "llama, 1 kv head": "`llama --kv-heads 1`"}
    rows = [[names[r["arch"]], n(r["parameters"]), f"{r['val_loss']:.4f}", f"{r['step_ms']:.1f} ms",
             f"{n(r['decode_tokens_per_s'])} tokens/s", f"{n(r['kv_cache_bytes_per_token'])} bytes"]
            for r in d["rows"]]
    a = rows_by(d["rows"], "arch")
    mq = a["llama, 1 kv head"]["decode_tokens_per_s"] / a["llama"]["decode_tokens_per_s"]
    return "\n\n".join([
        f"nanoGPT's baby recipe (`--preset {d['preset']}`) on Tiny Shakespeare, {n(d['steps'])} steps, seed 0:",
        table(["`--arch`", "parameters", "val loss", "step (median)", "greedy decode, batch 1",
               "KV cache per token"], rows),
        f"One key/value head decodes {mq:.2f} times as fast as four here.",
        source(ARCH, "python -m benchmarks.arch")])


def speculative() -> str:
    d = load(SPECULATIVE)
    rows = [[r["draft_tokens"], pct(r["accepted_share"], 0), f"{r['tokens_per_target_pass']:.2f}",
             n(r["tokens_per_s"]), f"{r['speed_up']:.2f}x", "yes" if r["greedy_equal"] else "no"]
            for r in d["rows"].values()]
    s = d["sampled"]
    return "\n\n".join([
        f"A target of {n(d['target_parameters'])} parameters and a draft of {n(d['draft_parameters'])}, "
        f"{n(d['steps'])} steps each on Tiny Shakespeare; {d['new_tokens']} greedy tokens:",
        table(["draft tokens K", "accepted (of the drafted tokens it could keep)", "tokens per model pass",
               "tokens/s", f"against the model alone ({n(d['target_alone_tokens_per_s'])} tokens/s)",
               "greedy tokens equal"], rows),
        f"Sampling at temperature {s['temperature']} with K = {s['draft_tokens']} accepts "
        f"{pct(s['accepted_share'], 0)}.",
        source(SPECULATIVE, "python -m benchmarks.speculative")])


def quantized() -> str:
    d = load(QUANTIZE)
    rows = [[name, n(r["weight_bytes"] / 1e6), n(r["tokens_per_s"], 1), f"{r['speed_up']:.2f}x",
             pct(r["greedy_agreement"], 0), e(r["relative_logit_diff"])] for name, r in d["rows"].items()]
    return "\n\n".join([
        f"GPT-2 small's shape (random weights), {d['new_tokens']} greedy tokens after "
        f"{d['prompt_tokens']}, batch 1:",
        table(["weights", "MB", "tokens/s", "against float32", "greedy tokens equal to float32's",
               "largest logit difference (of the largest logit)"], rows),
        source(QUANTIZE, "python -m benchmarks.quantize")])


def int8_loop() -> str:
    d = load(INT8_LOOP)
    rows = [[name, n(r["ms_per_pass"], 2), n(r["weights_per_s"] / 1e9, 2)] for name, r in d["rows"].items()]
    return "\n\n".join([
        "Eight (3072, 768) matrix-vector products at batch 1, alone and inside a `fori_loop`:",
        table(["weights, where", "ms per pass", "billion weights read per second"], rows),
        source(INT8_LOOP, "python -m benchmarks.int8_loop")])


def eval_memory() -> str:
    d = load(EVAL_MEMORY)
    return "\n\n".join([
        f"GPT-2 small's shape, {d['windows']} windows of {n(d['positions'])} positions: batches of {d['batch']} "
        f"(estimated {d['batch_bytes_estimate'] / 1e9:.1f} GB a batch with {d['available_bytes'] / 1e9:.1f} GB "
        f"available), {d['seconds']:.0f} s, peak resident memory {d['peak_rss_bytes'] / 1e9:.1f} GB.",
        source(EVAL_MEMORY, "python -m benchmarks.eval_memory")])


QUALITY_NAMES = {"torch-adamw": "nanoGPT's recipe, PyTorch eager (the twin of our model)",
                 "adamw": "ours, the same recipe (`--preset shakespeare-baby`)",
                 "muon-gpt": "ours, GPT layers with Muon, 400 steps",
                 "fast": "ours, best (`--preset shakespeare-fast`: Llama's layers, Muon, 400 steps)"}


def quality() -> str:
    d = load(QUALITY)
    rows = []
    for name, r in d["summary"].items():
        seconds = "-" if r["seconds_median"] is None else f"{r['seconds_median']:.1f}"
        spread = "-" if r["seconds_spread"] is None else "{:.1f}-{:.1f}".format(*r["seconds_spread"])
        ratio = "-" if r["time_ratio"] is None else f"**{r['time_ratio']:.2f}x**"
        steps = "-" if r["steps_median"] is None else n(r["steps_median"])
        rows.append([QUALITY_NAMES.get(name, name), r["reached"], seconds, spread, steps, ratio,
                     f"{r['best_val_loss_median']:.4f}"])
    return "\n\n".join([
        f"Tiny Shakespeare (char level), time to validation loss {d['target']:.4f}, the median over "
        f"{d['seeds']} seeds of the PyTorch run's best:",
        table(["recipe", "seeds that reach it", "seconds (median)", "spread", "steps (median)",
               "time against PyTorch", "best val loss (median)"], rows),
        source(QUALITY, "python -m benchmarks.quality")])


RENDER = {
    "headline": headline,
    "train-step": train_step,
    "train-card": train_card,
    "loop": loop,
    "decode": decode,
    "scaling": scaling,
    "gpt2-parity": gpt2_parity,
    "gpt2-decode": gpt2_decode,
    "accumulate": accumulate,
    "data-prepare": data_prepare,
    "data-batches": data_batches,
    "finetune-memory": finetune_memory,
    "finetune-recipe": finetune_recipe,
    "arch": arch,
    "speculative": speculative,
    "quantize": quantized,
    "int8-loop": int8_loop,
    "eval-memory": eval_memory,
    "quality": quality,
}


def pages() -> list[str]:
    return sorted(p for pattern in PAGES for p in glob.glob(os.path.join(ROOT, pattern)))


def render(text: str, where: str = "") -> str:
    """The text with every figures block rewritten from its JSON."""
    def one(m):
        name = m.group(2)
        if name not in RENDER:
            raise SystemExit(f"{where}: no figure named {name!r} (known: {', '.join(RENDER)})")
        return m.group(1) + "\n" + RENDER[name]().strip() + "\n\n" + m.group(4)
    return BLOCK.sub(one, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python docs/figures.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 naming each page that differs")
    args = p.parse_args(argv)
    stale = []
    for path in pages():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = render(text, os.path.relpath(path, ROOT))
        if new != text:
            stale.append(os.path.relpath(path, ROOT))
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    if args.check and stale:
        print("figures differ from their JSON in: " + ", ".join(stale) + " (run: python docs/figures.py)",
              file=sys.stderr)
        return 1
    print(("rewrote: " + ", ".join(stale)) if stale and not args.check else "figures match their JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
