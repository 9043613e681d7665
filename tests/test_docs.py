"""The docs run: the walkthrough, the docstring examples, and the pictures."""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import json
import os
import pkgutil
import re

import pytest

import minitx_fn
import minitx_fn.data
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
    # Commands: exercised end to end by tests/test_cli.py, test_faults.py and test_job.py (eval).
    "minitx_fn.cli": {"build_parser", "cmd_train", "cmd_generate", "cmd_eval", "cmd_attention", "cmd_plot", "cmd_data",
                      "cmd_prepare", "cmd_import_hf", "cmd_export_hf", "cmd_upgrade", "main", "message", "to_job"},
    # Read or write files with the optional safetensors and tokenizers: tests/test_gpt2.py.
    "minitx_fn.gpt2": {"require_safetensors", "read_config", "read_tensors", "read_tokenizer", "import_dir", "byte_tokenizer_json",
                       "export_files", "write_dir", "import_run", "export_run"},
    # Its parts of `train`, whose example runs both: tests/test_job.py calls them apart.
    "minitx_fn.job": {"plan", "run"},
    # Need several devices or processes: tests/test_distributed.py.
    "minitx_fn.distributed": {"initialize", "batch_sharding", "replicated", "state_shardings", "check_batch",
                              "put_global", "to_host", "scalar", "data_parallel", "sharded_batch_at"},
}


@pytest.mark.parametrize("name", MODULES)
def test_every_public_function_has_an_example(name):
    module = importlib.import_module(name)
    missing = {f for f, obj in _public_functions(module)
               if inspect.isfunction(obj) and ">>>" not in (inspect.getdoc(obj) or "")} - NO_EXAMPLE.get(name, set())
    assert not missing, f"{name}: no example in {sorted(missing)}"


@pytest.mark.heavy
def test_walkthrough_runs_as_a_notebook_with_its_attention_explorer():
    """jupytext turns the script into a notebook and nbclient executes it in a kernel,
    as `jupyter lab` would; the last cell builds the ipywidgets explorer. The script is
    the notebook's code cell for cell, so this is also the script's test (`python
    docs/walkthrough.py` runs the same lines, but for its last branch: one call of
    show_attention with the defaults the explorer draws first, instead of the explorer)."""
    jupytext = pytest.importorskip("jupytext", reason="the notebook test needs the test extra's jupytext")
    nbclient = pytest.importorskip("nbclient", reason="the notebook test needs the test extra's nbclient")
    pytest.importorskip("ipykernel", reason="the notebook test needs the test extra's ipykernel")
    pytest.importorskip("ipywidgets", reason="the notebook test needs the test extra's ipywidgets")
    # Each cell takes seconds. Once in about eight suite runs on the 2-core machine the
    # client never saw a finished cell's reply (the kernel idle, nbclient waiting on
    # its socket): a cell that is not answered in 120 s is tried once more in a fresh
    # kernel, so a lost message costs two minutes, not the run, and a notebook that
    # really hangs still fails.
    for attempt in range(2):
        notebook = jupytext.read(os.path.join(ROOT, "docs", "walkthrough.py"))
        try:
            nbclient.NotebookClient(notebook, timeout=120, startup_timeout=120, kernel_name="python3",
                                    resources={"metadata": {"path": os.path.join(ROOT, "docs")}}).execute()
            break
        except TimeoutError:                           # nbclient's CellTimeoutError is one
            if attempt:
                raise
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)

    def number(label: str) -> float:                  # the value the walkthrough printed after label
        return float(re.search(re.escape(label) + r"\s*([-+0-9.e]+)", text).group(1))

    # The values it prints, checked against what they must be, not just their labels.
    assert number("head 0 by hand vs library, max difference:") < 1e-5
    assert number("max |ours - flax| =") < 1e-4
    initial, log_v = map(float, re.search(r"^loss ([0-9.]+) vs log V = ([0-9.]+)", text, re.M).groups())
    assert abs(initial - log_v) < 0.5                                          # near-uniform at initialisation
    assert number("after 300 steps: loss") < 0.5                               # the cycle is learned
    assert "vmap equals the batched call: True" in text and "grad tree has the same shapes: True" in text
    record = ast.literal_eval(re.search(r"job\.train: (\{.*\})", text).group(1))
    assert record["step"] == 300 and record["loss"] < 0.5
    for label in ("loaded from disk: ", "\n"):                # both samples are made of the corpus's words
        sample = ast.literal_eval(re.search(re.escape(label) + r"('hello[^\n]*')", text).group(1))
        words = sample.split()
        assert set(words[:-1]) <= set(minitx_fn.data.BUILTIN_CORPUS.split()) and len(words) > 4, sample
    explorer = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert explorer and "IntSlider" in explorer[0]["data"]["text/plain"], "the explorer should show its sliders"
    # interact draws into an Output widget: its first map is in the saved widget state.
    state = json.dumps(notebook.metadata.get("widgets", {}))
    assert "image/png" in state, "the explorer should draw a first map"
