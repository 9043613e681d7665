"""Pictures: loss curves of a run and attention maps of a model.

matplotlib is optional (the `plot` extra); without it these functions raise
MissingMatplotlibError, whose message says how to install it.
"""

from __future__ import annotations

import json

import numpy as np

INSTALL_HINT = "matplotlib is not installed; install the plot extra: pip install -e '.[plot]' (or pip install matplotlib)"


class MissingMatplotlibError(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlibError(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_metrics(metrics_path: str) -> list[dict]:
    """The records of a run's metrics.jsonl, one dict per logged step.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), 'metrics.jsonl')
        >>> _ = open(path, 'w').write(json.dumps({"step": 100, "loss": 2.5}) + chr(10))
        >>> read_metrics(path)
        [{'step': 100, 'loss': 2.5}]
    """
    with open(metrics_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str, png_path: str) -> str | None:
    """Train loss (and validation loss where recorded) against step, written to png_path.

    Returns png_path, or None when the run has no records yet.

    Example:
        >>> import os, tempfile
        >>> run = tempfile.mkdtemp()
        >>> with open(os.path.join(run, 'metrics.jsonl'), 'w') as f:
        ...     _ = f.write(json.dumps({'step': 100, 'loss': 2.5, 'val_loss': 2.6}) + chr(10))
        >>> png = plot_losses(os.path.join(run, 'metrics.jsonl'), os.path.join(run, 'loss.png'))
        >>> os.path.getsize(png) > 0
        True
    """
    plt = _pyplot()
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


def plot_attention(maps: np.ndarray, labels: str, png_path: str) -> list[np.ndarray]:
    """maps (L, H, T, T), one row of panels per layer and one column per head, each
    labelled with the prompt's characters; written to png_path.

    Returns the arrays as drawn, read back from the figure (for tests).

    Example:
        >>> import os, tempfile
        >>> maps = np.tril(np.ones((1, 2, 3, 3))) / np.arange(1, 4)[:, None]     # uniform over the past
        >>> drawn = plot_attention(maps, 'abc', os.path.join(tempfile.mkdtemp(), 'att.png'))
        >>> len(drawn), drawn[0][2].tolist()
        (2, [0.3333333333333333, 0.3333333333333333, 0.3333333333333333])
    """
    plt = _pyplot()
    n_layers, n_heads, t, _ = maps.shape
    size = 0.25 * t + 1.5
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(size * n_heads, size * n_layers), squeeze=False)
    ticks = [repr(c)[1:-1] or " " for c in labels]          # show "\n" as \n
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer, head]
            ax.imshow(maps[layer, head], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks(range(t), ticks, fontsize=6)
            ax.set_yticks(range(t), ticks, fontsize=6)
            ax.set_xlabel("key", fontsize=7)
            ax.set_ylabel("query", fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    drawn = [np.asarray(axes[layer, head].images[0].get_array()) for layer in range(n_layers)
             for head in range(n_heads)]
    plt.close(fig)
    return drawn
