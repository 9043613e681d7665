"""The docs run: the walkthrough, the docstring examples, and the pictures."""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minitx_fn
from minitx_fn import model, plot
from minitx_fn.cli import main
from tests.helpers import standard_promotion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(m.name for m in pkgutil.walk_packages(minitx_fn.__path__, "minitx_fn.")
                 if not m.name.endswith("__main__"))


def _public_functions(module):
    for name, obj in vars(module).items():
        if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)) \
                and obj.__module__ == module.__name__:
            yield name, obj


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    with standard_promotion():
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


@pytest.mark.parametrize("name", MODULES)
def test_every_public_function_has_a_docstring(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no module docstring"
    missing = [f for f, obj in _public_functions(module) if not inspect.getdoc(obj)]
    assert not missing, f"{name}: no docstring on {missing}"


# Public functions whose docstring carries no runnable example, and why.
NO_EXAMPLE = {
    # Commands: exercised end to end by tests/test_cli.py.
    "minitx_fn.cli": {"build_parser", "cmd_train", "cmd_generate", "cmd_attention", "cmd_plot", "main"},
    # Need several devices or processes: tests/test_distributed.py.
    "minitx_fn.distributed": {"initialize", "batch_sharding", "replicated", "state_shardings", "check_batch",
                              "put_global", "to_host", "scalar"},
}


@pytest.mark.parametrize("name", MODULES)
def test_every_public_function_has_an_example(name):
    module = importlib.import_module(name)
    missing = {f for f, obj in _public_functions(module)
               if inspect.isfunction(obj) and ">>>" not in (inspect.getdoc(obj) or "")} - NO_EXAMPLE.get(name, set())
    assert not missing, f"{name}: no example in {sorted(missing)}"


def test_walkthrough_runs_as_a_script_in_under_a_minute():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "walkthrough.py")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert "head 0 by hand vs library" in done.stdout and "max |ours - flax|" in done.stdout
    assert elapsed < 60, f"walkthrough took {elapsed:.0f} s"


@pytest.fixture
def trained_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with standard_promotion():
        assert main(["train", "--width", "32", "--layers", "2", "--heads", "2", "--context", "16", "--steps", "200",
                     "--out", "r"]) == 0
    capsys.readouterr()
    return tmp_path / "r"


def test_attention_picture_shows_the_models_own_weights(trained_run, monkeypatch, capsys):
    drawn = {}
    real = plot.plot_attention

    def spy(maps, labels, png):
        drawn["arrays"] = real(maps, labels, png)
        return drawn["arrays"]

    monkeypatch.setattr(plot, "plot_attention", spy)
    assert main(["attention", "--checkpoint", str(trained_run), "--prompt", "hello jax", "--out", "att.png"]) == 0
    assert os.path.getsize("att.png") > 1000
    from minitx_fn import checkpoint
    ck = checkpoint.load(str(trained_run))
    ids = jnp.asarray(ck.tokenizer.encode("hello jax"))[None]
    maps = np.asarray(model.attention_maps(ck.state.params, ids, config=ck.model_config))[:, 0]   # (L, H, T, T)
    assert len(drawn["arrays"]) == 2 * 2
    for i, array in enumerate(drawn["arrays"]):
        np.testing.assert_array_equal(array, maps[i // 2, i % 2])              # the model's own weights
        np.testing.assert_allclose(array.sum(-1), 1.0, atol=1e-5)               # rows are distributions
        assert np.all(array[np.triu_indices(9, 1)] == 0.0)                      # nothing above the diagonal


def test_plot_command_draws_the_loss_curves(trained_run, capsys):
    os.remove(trained_run / "loss.png")
    assert main(["plot", str(trained_run)]) == 0
    assert os.path.getsize(trained_run / "loss.png") > 1000


def test_without_matplotlib_the_picture_commands_say_how_to_install(trained_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib now fails
    assert main(["plot", str(trained_run)]) == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "plot" in err and "Traceback" not in err
    assert main(["attention", "--checkpoint", str(trained_run), "--prompt", "hello", "--out", "a.png"]) == 2
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_attention_maps_match_the_attention_layer(key):
    """The maps are the weights the forward pass uses: layer 0 checked by hand."""
    from minitx_fn.config import ModelConfig
    from minitx_fn.layers import attention, embedding, norm, positional
    cfg = ModelConfig(vocab_size=7, d_model=8, n_heads=2, n_layers=2, init_std=0.3)
    params = model.init(key, cfg)
    tokens = jax.random.randint(key, (1, 5), 0, 7)
    x = embedding.apply(params["embed"], tokens) + positional.table(5, 8)[None]
    layer0 = jax.tree.map(lambda a: a[0], params["blocks"])
    q, k, _ = attention.project_qkv(layer0["attn"], norm.apply(layer0["ln1"], x), 2, jnp.float32)
    expected = attention.attention_weights(q, k, attention.causal_mask(5)[None, None])
    np.testing.assert_allclose(model.attention_maps(params, tokens, config=cfg)[0], expected, rtol=1e-6)
