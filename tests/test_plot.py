"""Pictures (`minitx_fn.plot`): sized for the prompt, legible, drawn from the numbers
they claim; and where a picture cannot go, or there is nothing to draw, said before
anything is drawn."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from minitx_fn import checkpoint, generate, plot
from minitx_fn.config import ModelConfig
from minitx_fn.errors import Error
from minitx_fn.tokenizer import CharTokenizer

pytest.importorskip("matplotlib", reason="matplotlib draws the pictures; it is in the test extra")
from matplotlib import image  # noqa: E402


def _uniform_maps(layers: int, heads: int, t: int) -> np.ndarray:
    return np.broadcast_to(np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None], (layers, heads, t, t))


@pytest.mark.parametrize("t", [5, 30])
def test_attention_picture_is_sized_for_the_prompt(tmp_path, t):
    """At least ~24 px per token on each axis (legible labels), panels never shrunk
    below ~170 px, and a 2 x 4 grid of a 30-token prompt fits a laptop screen."""
    png = tmp_path / "a.png"
    drawn = plot.plot_attention(_uniform_maps(2, 4, t), "ab cd" * (t // 5 + 1), str(png))
    height, width = image.imread(png).shape[:2]
    panel = max(1.6, 0.22 * t + 0.6) * 110                                 # inches x dpi
    assert width >= 4 * panel and height >= 2 * panel
    if t <= 30:
        assert width <= 4000 and height <= 2200
    assert len(drawn) == 8 and all(np.allclose(d.sum(-1), 1.0) for d in drawn)


def test_loss_picture_with_validation_and_a_log_axis(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 100, "loss": 2.5}, {"step": 150, "loss": 2.2, "val_loss": 2.3}, {"step": 200, "loss": 1.9},
        {"step": 300, "loss": 1.7, "val_loss": 1.9}]) + '{"step": 400, "lo')        # and a torn last line
    for log in (False, True):
        png = tmp_path / f"loss-{log}.png"
        assert plot.plot_losses(str(metrics), str(png), log=log) == str(png)
        assert image.imread(png).shape[1] >= 700


def test_no_records_no_picture(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot.plot_losses(str(tmp_path / "metrics.jsonl"), str(tmp_path / "l.png")) is None


def test_a_picture_goes_only_where_a_picture_can_be_written(tmp_path):
    (tmp_path / "d.png").mkdir()
    for path, said in (("a.bogus", "give a file name ending in .png"), (tmp_path / "d.png", "it is a directory"),
                       (tmp_path / "nowhere" / "a.png", "folder .* does not exist")):
        with pytest.raises(plot.PicturePathError, match=said):
            plot.check_picture_path(str(path))
    plot.check_picture_path(str(tmp_path / "a.svg"))


def test_a_run_without_records_to_draw_is_named(tmp_path):
    with pytest.raises(Error, match="metrics.jsonl' does not exist; give the directory of a training run"):
        plot.plot_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": "x"}\n')
    with pytest.raises(Error, match="has 1 record.s. but no numeric loss"):
        plot.plot_run(str(tmp_path))
    assert not os.path.exists(tmp_path / "loss.png")


def test_an_attention_prompt_longer_than_the_context_is_refused(tmp_path, key):
    cfg = ModelConfig(vocab_size=3, d_model=8, n_heads=2, n_layers=1, max_len=4)
    m = checkpoint.Model(cfg.init(key), cfg, CharTokenizer("abc"), {})
    with pytest.raises(generate.PromptError, match="the prompt has 5 tokens; the model's context is 4"):
        plot.plot_model_attention(m, "abcab", str(tmp_path / "a.png"))
    assert not os.path.exists(tmp_path / "a.png")


def test_a_run_that_is_not_there_is_named_as_such(tmp_path):
    """Not "cannot write the picture" into its folder: there is no run to draw."""
    from minitx_fn.errors import Error
    with pytest.raises(Error, match="no run directory .*nope'; give the directory of a training run"):
        plot.plot_run(str(tmp_path / "nope"))


def test_a_picture_is_never_written_inside_a_runs_checkpoint(tmp_path):
    """A run's next save replaces its checkpoint folder whole: a picture put there,
    directly or through a link, would vanish without a word."""
    from minitx_fn.plot import PicturePathError, check_picture_path
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "run" / "checkpoint")
    for path in (tmp_path / "run" / "checkpoint" / "a.png", tmp_path / "link" / "a.png"):
        with pytest.raises(PicturePathError, match="inside the files of the run"):
            check_picture_path(str(path))
    check_picture_path(str(tmp_path / "run" / "a.png"))                  # beside the checkpoint: fine
