"""Loss curves from a run's metrics.jsonl, when matplotlib (the `plot` extra) is installed."""

from __future__ import annotations

import json


def read_metrics(metrics_path: str) -> list[dict]:
    with open(metrics_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str, png_path: str) -> str | None:
    """Write train and validation loss against step to png_path; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
