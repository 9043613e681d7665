"""Benchmark results as pictures: from a run (`python -m benchmarks --plot FILE.png`) or
from a saved JSON:

    python -m benchmarks.plot --json full.json --out full.png

Panels, as the result holds them: step time and MFU per config and implementation;
decode tokens/s, cached against recompute; decode ms per token early and late in the
window (the position axis); and for `--suite scaling`, step time and the memory XLA
plans for the step against context length and against width.
"""

from __future__ import annotations

import argparse
import json
import sys

from minitx_fn.plot import require_matplotlib


def _bars(ax, groups: list[str], series: dict[str, list[float | None]], ylabel: str, log: bool = False) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar([x for x, v in zip(xs, values) if v], [v for v in values if v], width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def draw(result: dict, path: str) -> str:
    """Every panel the result has data for, in one figure written to path."""
    figure = require_matplotlib()
    panels = []
    if result.get("train"):
        panels += ["step", "mfu"]
    if result.get("decode"):
        panels += ["decode", "position"]
    if result.get("scaling"):
        panels += ["scaling-context", "scaling-width"]
    if not panels:
        raise ValueError("the result holds no rows to draw")
    cols = 2
    rows = (len(panels) + 1) // 2
    fig = figure(figsize=(6.2 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    device = result.get("device", {})
    fig.suptitle(f"{device.get('kind', '?')} ({device.get('platform', '?')}), jax {result.get('versions', {}).get('jax')},"
                 f" {result.get('date', '')}, dtype {result.get('options', {}).get('dtype', 'float32')}")
    for ax, panel in zip(axes.ravel(), panels):
        if panel in ("step", "mfu"):
            configs = list(dict.fromkeys(r["config"] for r in result["train"]))
            impls = list(dict.fromkeys(r["impl"] for r in result["train"]))
            field, label = ("step_ms_median", "train step, ms (median)") if panel == "step" else ("mfu", "MFU")
            values = {impl: [next((r[field] * (100 if panel == "mfu" else 1) for r in result["train"]
                                   if r["config"] == c and r["impl"] == impl), None) for c in configs]
                      for impl in impls}
            _bars(ax, configs, values, label if panel == "step" else "MFU, % of measured peak", log=panel == "step")
            ax.set_title("train step" if panel == "step" else "model FLOPs utilisation")
        elif panel == "decode":
            keys = list(dict.fromkeys((r["config"], r["batch"]) for r in result["decode"]))
            values = {mode: [next((r["tokens_per_s"] for r in result["decode"] if (r["config"], r["batch"]) == k
                                   and r["mode"] == mode), None) for k in keys] for mode in ("cached", "recompute")}
            _bars(ax, [f"{c}\nbatch {b}" for c, b in keys], values, "tokens/s", log=True)
            ax.set_title("generation: KV cache against recompute")
        elif panel == "position":
            for r in (r for r in result["decode"] if r["mode"] == "cached"):
                points = [(x, r[f]) for x, f in ((0, "ms_per_token_early"), (1, "ms_per_token_late")) if r[f]]
                if points:
                    ax.plot(*zip(*points), "o-", label=f"{r['config']}, batch {r['batch']}")
            ax.set_xticks([0, 1], ["early (position ~1)", "late (window nearly full)"])
            ax.set_ylabel("ms per token (cached)")
            ax.set_yscale("log")
            ax.legend(frameon=False, fontsize=8)
            ax.set_title("cached decode: cost per token against position")
        else:
            axis = panel.split("-")[1]
            points = [r for r in result["scaling"] if r["axis"] == axis]
            xs = [r[axis] for r in points]
            ax.plot(xs, [r["step_ms"] for r in points], "o-", color="tab:blue", label="step ms")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context T (width 128)" if axis == "context" else "width D (context 256)")
            ax.set_ylabel("train step, ms", color="tab:blue")
            memory = [(x, r["planned_memory_mb"]) for x, r in zip(xs, points) if r["planned_memory_mb"]]
            if memory:
                twin = ax.twinx()
                twin.plot(*zip(*memory), "s--", color="tab:orange")
                twin.set_yscale("log")
                twin.set_ylabel("planned memory, MB", color="tab:orange")
            ax.set_title(f"scaling with {axis}")
            ax.grid(alpha=0.3, which="both")
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="a result written by python -m benchmarks --json")
    p.add_argument("--out", required=True, metavar="FILE.png")
    args = p.parse_args(argv)
    try:
        with open(args.json) as f:
            result = json.load(f)
        draw(result, args.out)
    except (OSError, ValueError) as e:
        p.error(str(e))
    except (KeyError, TypeError, AttributeError, IndexError) as e:     # valid JSON of another shape
        p.error(f"{args.json!r} is not a result of python -m benchmarks ({type(e).__name__}: {e})")
    print(f"Pictures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
