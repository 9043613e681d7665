"""Pictures: loss curves of a run and attention maps of a model.

matplotlib is optional (the `plot` extra); without it these functions raise
MissingMatplotlibError, whose message says how to install it.
"""

from __future__ import annotations

import math
import os

import numpy as np

from minitx_fn import runs
from minitx_fn.errors import Error

INSTALL_HINT = ("matplotlib is not installed; install the plot extra: pip install -e '.[plot]' "
                "(or pip install matplotlib)")


class MissingMatplotlibError(Error):
    """The picture needs matplotlib, which is not installed."""


class PicturePathError(Error):
    """A picture cannot be written where asked (a bad extension, a missing folder, a directory)."""


PICTURE_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_picture_path(path: str) -> None:
    """PicturePathError unless a picture can be written at path: a known extension, an
    existing writable folder, not a directory.

    Example:
        >>> check_picture_path("a.bogus")
        Traceback (most recent call last):
        minitx_fn.plot.PicturePathError: cannot write picture 'a.bogus': give a file name ending in .png, .pdf, .svg, .jpg, .jpeg
    """
    if not path.lower().endswith(PICTURE_EXTENSIONS):
        raise PicturePathError(f"cannot write picture {path!r}: give a file name ending in "
                               f"{', '.join(PICTURE_EXTENSIONS)}")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise PicturePathError(f"cannot write picture {path!r}: it is a directory")
    if not os.path.isdir(folder):
        raise PicturePathError(f"cannot write picture {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise PicturePathError(f"cannot write picture {path!r}: folder {folder!r} is not writable")
    if runs.managing_run(path) is not None:               # the run's next save would delete it without a word
        raise PicturePathError(f"cannot write picture {path!r}: it {runs.held_by(runs.managing_run(path))}")


def plot_run(run_dir: str, png_path: str | None = None, *, log: bool = False, out=None) -> str:
    """The loss curves of a run (RUN/metrics.jsonl) to png_path (default RUN/loss.png),
    checked before anything is drawn; a torn last line is said on out and left out.
    Error for a path that cannot take a picture, a run without metrics or records.

    Example:
        >>> import json, tempfile
        >>> run = tempfile.mkdtemp()
        >>> _ = open(os.path.join(run, 'metrics.jsonl'), 'w').write(json.dumps({'step': 1, 'loss': 2.0}) + chr(10))
        >>> os.path.basename(plot_run(run))
        'loss.png'
    """
    if not os.path.isdir(run_dir):                        # the run first: its picture's folder is the run
        raise Error(f"no run directory {run_dir!r}; give the directory of a training run")
    png_path = png_path or os.path.join(run_dir, runs.LOSS_PNG)
    check_picture_path(png_path)
    metrics = os.path.join(run_dir, runs.METRICS)
    if runs.not_regular(metrics):
        raise Error(f"{metrics!r} is not a regular file (a pipe or a device); move it away")
    if not os.path.isfile(metrics):
        raise Error(f"{metrics!r} does not exist; give the directory of a training run")
    require_matplotlib()
    if runs.read_records(metrics).torn and out is not None:
        print(f"{metrics} ends in a half-written line (a process killed mid-write); it is left out", file=out)
    drawn = plot_losses(metrics, png_path, log=log)
    if drawn is None:
        records = runs.read_records(metrics).records
        if records:                                       # records, but no number to draw: an edited log
            raise Error(f"{metrics!r} has {len(records)} record(s) but no numeric loss or val_loss in any; "
                        f"repair the file or train again")
        raise Error(f"{metrics!r} has no records yet; train for at least {{log_every}} steps",
                    log_every=("log_every", "N"))
    return drawn


def require_matplotlib():
    """matplotlib's `Figure` class, or MissingMatplotlibError. A Figure made directly
    (not through pyplot) draws to a file with no window and leaves pyplot's state and
    backend alone, so drawing from a notebook does not change how it shows its own plots.

    Example:
        >>> require_matplotlib().__name__
        'Figure'
    """
    try:
        import matplotlib  # noqa: F401  (first: it fails when matplotlib is absent, even if a submodule was cached)
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlibError(INSTALL_HINT) from None
    return Figure


def plot_losses(metrics_path: str, png_path: str, *, log: bool = False) -> str | None:
    """Train loss (and validation loss where recorded) against step, written to png_path.

    A torn last line of the log is left out (`runs.read_records`). Returns png_path,
    or None when the run has no records yet.

    Example:
        >>> import json, os, tempfile
        >>> run = tempfile.mkdtemp()
        >>> with open(os.path.join(run, 'metrics.jsonl'), 'w') as f:
        ...     _ = f.write(json.dumps({'step': 100, 'loss': 2.5, 'val_loss': 2.6}) + chr(10))
        >>> png = plot_losses(os.path.join(run, 'metrics.jsonl'), os.path.join(run, 'loss.png'))
        >>> os.path.getsize(png) > 0
        True
    """
    figure = require_matplotlib()
    records = runs.read_records(metrics_path).records
    train = [r for r in records if isinstance(r.get("loss"), (int, float))]
    val = [r for r in records if isinstance(r.get("val_loss"), (int, float))]
    if not train and not val:
        return None
    fig = figure(figsize=(7, 4.2))
    ax = fig.subplots()
    if train:
        # Markers while there are few records: one record is a point, which a bare line never draws.
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], "o-" if len(train) < 30 else "-",
                color="tab:blue", lw=1.6, ms=3, label="train (mean since the previous record)")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:orange", lw=1.6, ms=4,
                label="validation")
        best = min(val, key=lambda r: r["val_loss"])
        ax.annotate(f"{best['val_loss']:.3f}", (best["step"], best["val_loss"]), textcoords="offset points",
                    xytext=(0, -14), ha="center", fontsize=9, color="tab:orange")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(f"{len(records)} records, last at step {records[-1]['step']:,}", fontsize=10)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    return png_path


def plot_attention(maps: np.ndarray, labels: str, png_path: str) -> list[np.ndarray]:
    """maps (L, H, T, T), one row of panels per layer and one column per head, each
    titled with its layer and head and labelled with the prompt's characters on both
    axes (query down, key across), one shared colour bar; written to png_path.

    Panels are sized for the prompt: about 0.22 inch per character, so labels stay
    legible, and at least 1.6 inches, so short prompts do not shrink to nothing.
    Returns the arrays as drawn, read back from the figure (for tests).

    Example:
        >>> import os, tempfile
        >>> maps = np.tril(np.ones((1, 2, 3, 3))) / np.arange(1, 4)[:, None]     # uniform over the past
        >>> drawn = plot_attention(maps, 'abc', os.path.join(tempfile.mkdtemp(), 'att.png'))
        >>> len(drawn), drawn[0][2].tolist()
        (2, [0.3333333333333333, 0.3333333333333333, 0.3333333333333333])
    """
    figure = require_matplotlib()
    n_layers, n_heads, t, _ = maps.shape
    panel = max(1.6, 0.22 * t + 0.6)
    fontsize = 9 if t <= 24 else 7
    fig = figure(figsize=(panel * n_heads + 1.2, panel * n_layers + 0.6), layout="constrained")
    axes = fig.subplots(n_layers, n_heads, squeeze=False)
    ticks = ["\u2423" if c == " " else repr(c)[1:-1] for c in labels]     # a space as ␣, "\n" as \n
    shown = range(0, t, max(1, math.ceil(t / 48)))          # at most 48 labels an axis
    image = None
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer, head]
            image = ax.imshow(maps[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer}, head {head}", fontsize=fontsize + 1)
            ax.set_xticks(list(shown), [ticks[i] for i in shown], fontsize=fontsize, family="monospace")
            ax.set_yticks(list(shown), [ticks[i] for i in shown], fontsize=fontsize, family="monospace")
            ax.tick_params(length=0)
            if layer == n_layers - 1:
                ax.set_xlabel("key (attended to)", fontsize=fontsize)
            if head == 0:
                ax.set_ylabel("query", fontsize=fontsize)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    fig.savefig(png_path, dpi=110)
    drawn = [np.asarray(axes[layer, head].images[0].get_array()) for layer in range(n_layers)
             for head in range(n_heads)]
    return drawn


def plot_model_attention(run_model, prompt: str, png_path: str) -> list[np.ndarray]:
    """The attention maps of every layer and head of a model (anything with .params,
    .model and .tokenizer: `checkpoint.load_model`) for a prompt of at most its
    context, drawn by `plot_attention`. PromptError for a prompt it cannot take.

    Example:
        >>> import os, tempfile, jax
        >>> from minitx_fn import checkpoint, model
        >>> from minitx_fn.config import ModelConfig
        >>> from minitx_fn.tokenizer import CharTokenizer
        >>> cfg = ModelConfig(vocab_size=3, d_model=8, n_heads=2, n_layers=1)
        >>> m = checkpoint.Model(cfg.init(jax.random.key(0)), cfg, CharTokenizer("abc"), {})
        >>> len(plot_model_attention(m, "abc", os.path.join(tempfile.mkdtemp(), "a.png")))    # 1 layer x 2 heads
        2
    """
    import jax.numpy as jnp

    from minitx_fn import generate, model
    check_picture_path(png_path)
    require_matplotlib()
    ids = generate.encode_prompt(run_model.tokenizer, prompt)
    if len(ids) > run_model.model.max_len:
        raise generate.PromptError(f"the prompt has {len(ids)} tokens; the model's context is "
                                   f"{run_model.model.max_len}")
    maps = np.asarray(model.attention_maps(run_model.params, jnp.asarray(ids)[None, :], config=run_model.model))
    return plot_attention(maps[:, 0], [run_model.tokenizer.decode([i]) for i in ids], png_path)
