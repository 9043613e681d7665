"""The docs run: the walkthrough, the docstring examples, and the pictures."""

from __future__ import annotations

import ast
import doctest
import glob
import importlib
import importlib.util
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
    # Commands: exercised end to end by tests/test_cli.py (each command and each class of error) and test_job.py.
    "minitx_fn.cli": {"build_parser", "cmd_train", "cmd_generate", "cmd_eval", "cmd_attention", "cmd_plot", "cmd_data",
                      "cmd_prepare", "cmd_import_hf", "cmd_export_hf", "cmd_upgrade", "main", "message", "to_job"},
    # Read or write Hugging Face folders (safetensors, tokenizers): tests/test_hf_gpt2.py and test_hf_llama.py.
    "minitx_fn.hf.folder": {"read_config", "read_tensors", "read_tokenizer", "import_dir", "export_files", "write_dir",
                            "import_run", "export_run"},
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
    # Reading what jit compiles: the residuals remat keeps are the weight matmuls' outputs (qkv, out, up),
    # "none" keeps more; dropout draws bits; XLA counts the scanned layers once, the formula L times.
    kept = ast.literal_eval(re.search(r'remat="matmuls": residuals (\[.*\])', text).group(1))
    assert kept == ["float32[4,16,96]", "float32[4,16,32]", "float32[4,16,128]"]
    assert number('remat="none":') > len(kept) and "body ['remat2']" in text
    assert ast.literal_eval(re.search(r"dropout adds: (\{.*\})", text).group(1))["random_bits"] > 0
    (xla1, formula1), (xla2, formula2) = [map(float, m) for m in re.findall(
        r"L = \d: XLA counts ([0-9.]+) MFLOP, the formula ([0-9.]+)", text)]
    assert abs(formula2 / formula1 - 2) < 0.1 and xla2 / xla1 < 1.2
    explorer = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert explorer and "IntSlider" in explorer[0]["data"]["text/plain"], "the explorer should show its sliders"
    # interact draws into an Output widget: its first map is in the saved widget state.
    state = json.dumps(notebook.metadata.get("widgets", {}))
    assert "image/png" in state, "the explorer should draw a first map"


# ----------------------------------------------------------------------------- the pages' code blocks
#
# README.md and docs/*.md: every fenced block is one of
# - python, run as written: the README's "Use it from Python" blocks (tests/test_readme.py)
#   and the checkpoint page's NumPy snippet (below);
# - bash, each command of it (lines joined at a trailing backslash, split at && and ;)
#   either parsed by the very parser that would run it (`minitx ...`: the CLI's;
#   `python -m benchmarks...`, `python docs/figures.py`: the script's own), run (the
#   cheap ones, in RUN), or listed in NOT_RUN with the reason. Parsing runs nothing:
#   the benchmarks take minutes to hours, and `minitx` lines name files of the reader's
#   (input.txt, runs/gpt2); what those commands do is tested in test_cli.py,
#   test_job.py, test_hf_gpt2.py, test_hf_llama.py and test_benchmarks.py;
# - text (pictures, trees, the layout), which is no code: the parameter tree is held
#   against the model below.

PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)

# Commands no test runs, by how they start, and why.
NOT_RUN = {
    "python3 -m venv .venv": "makes a fresh environment: the tests already run in one",
    ". .venv/bin/activate": "the shell's, not ours",
    "pip install": "installs packages (the extras are what the tests run with; torch is optional)",
    "python -m pytest": "it is this suite",
    "hf download": "downloads GPT-2 from the Hugging Face Hub; tests/test_hf_gpt2.py imports a folder "
                   "transformers saved, as the import would this one",
    "jupytext": "writes the notebook for jupyter lab, a browser UI; test_walkthrough_runs_as_a_notebook... "
                "converts and executes the same notebook",
    "jupyter lab": "a browser UI (see jupytext)",
    "for i in 0 1; do": "two training processes on one machine, one of them killed: "
                        "tests/test_distributed.py starts, preempts and kills them the same way",
    "kill": "signals the processes of the loop above (tests/test_distributed.py)",
}
RUN = {"python -m minitx_fn --help"}


def code_blocks(page: str):
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    for m in FENCE.finditer(text):
        yield m.group(1), m.group(2), text[:m.start()]


def commands(block: str):
    """The commands of a shell block: continuation lines joined, comments dropped, split at && and ;."""
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("for ") or line.startswith("kill "):
            yield line
            continue
        yield from (part.strip() for part in re.split(r"&&|;", line) if part.strip())


class _Parsed(Exception):
    pass


def _parses(main, args) -> None:
    """Call a script's main(args) with argparse stopped right after a successful parse."""
    import argparse
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):
        original(self, *a, **k)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        main(args)
    except _Parsed:
        return
    except SystemExit as e:                       # argparse's error (2), or --help (0)
        assert e.code == 0, f"{args} does not parse"
        return
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{args}: the script returned without parsing its arguments")


def check_command(command: str, capsys) -> str:
    """Check one shell command as described above; returns how ('listed', 'ran', 'parsed')."""
    import shlex
    for start in NOT_RUN:
        if command.startswith(start):
            return "listed"
    if command in RUN:
        from minitx_fn import cli
        with pytest.raises(SystemExit) as e:
            cli.main(shlex.split(command)[3:])
        assert e.value.code == 0 and "usage: minitx" in capsys.readouterr().out
        return "ran"
    argv = shlex.split(command)
    if argv[0] == "minitx":
        from minitx_fn import cli
        try:
            cli.build_parser().parse_args(argv[1:])
        except SystemExit as e:
            raise AssertionError(f"{command!r} does not parse: {capsys.readouterr().err}") from e
        return "parsed"
    if argv[:2] == ["python", "-m"] and argv[2].split(".")[0] == "benchmarks":
        name = argv[2] if "." in argv[2] else "benchmarks.run"
        _parses(importlib.import_module(name).main, argv[3:])
        return "parsed"
    if argv[:2] == ["python", "docs/figures.py"]:
        _parses(_figures().main, argv[2:])
        return "parsed"
    raise AssertionError(f"{command!r}: no test runs or parses it, and NOT_RUN does not list it")


def test_every_code_block_of_the_readme_and_the_docs_is_run_parsed_or_listed(capsys):
    seen = {"python": 0, "parsed": 0, "ran": 0, "listed": set()}
    for page in PAGES:
        for lang, body, before in code_blocks(page):
            where = f"{page}, the block before {body[:40]!r}"
            assert lang in ("python", "bash", "text"), f"{where}: say what it is (python, bash or text)"
            if lang == "python":
                section = before.rfind("\n## ")
                in_readme_python = page == "README.md" and before.startswith("\n## Use it from Python\n", section)
                snippet = page == "docs/checkpoints.md" and before.endswith("<!-- numpy-snippet -->\n")
                assert in_readme_python or snippet, f"{where}: a Python block no test runs"
                seen["python"] += 1
            elif lang == "bash":
                for command in commands(body):
                    how = check_command(command, capsys)
                    if how == "listed":
                        seen["listed"].add(next(s for s in NOT_RUN if command.startswith(s)))
                    else:
                        seen[how] += 1
    assert seen["python"] == 5 and seen["parsed"] > 40 and seen["ran"] == 1
    assert seen["listed"] == set(NOT_RUN), f"NOT_RUN lists what no page holds: {set(NOT_RUN) - seen['listed']}"
    # The README opens with the two commands a newcomer types: install and run, install and test.
    lang, first, _ = next(code_blocks("README.md"))
    assert first.splitlines() == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && minitx train",
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest -q']


def test_the_checkpoint_page_reads_a_run_with_numpy_alone(tmp_path, monkeypatch, capsys, key):
    """docs/checkpoints.md's snippet, run as written, on a saved run: its logits equal
    model.apply's, so its printed next character is the model's greedy choice."""
    import numpy as np

    from minitx_fn import checkpoint, data, model, train
    from minitx_fn.config import ModelConfig, TrainConfig
    from minitx_fn.tokenizer import CharTokenizer

    page = open(os.path.join(ROOT, "docs", "checkpoints.md"), encoding="utf-8").read()
    snippet = re.search(r"<!-- numpy-snippet -->\n```python\n(.*?)```", page, re.S).group(1)
    tok = CharTokenizer.from_text(data.builtin_text())
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=2, max_len=16, init_std=0.5)
    with standard_promotion():
        state = train.init_state(key, cfg, TrainConfig().optimizer)
    checkpoint.save(str(tmp_path / "runs" / "hello-001"), state, model=cfg, train_config=TrainConfig(),
                    tokenizer=tok, data=checkpoint.BUILTIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(ROOT)
    exec(compile(snippet, "docs/checkpoints.md", "exec"), {})
    printed = capsys.readouterr().out
    ids = np.asarray(tok.encode("hello"))[None]
    expected = tok.chars[int(np.argmax(np.asarray(model.apply(state.params, ids, config=cfg))[0, -1]))]
    assert printed.strip() == f"after 'hello' comes {expected!r}"


def test_the_parameter_tree_on_the_architecture_page_is_the_default_models(key):
    """The shapes the page lists are the leaves of the default (`hello`) model on the
    built-in corpus, and so is the parameter count it names."""
    import jax

    from minitx_fn import data, defaults, model
    from minitx_fn.config import ModelConfig
    from minitx_fn.tokenizer import CharTokenizer

    page = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
    tree = re.search(r"<!-- parameter-tree -->\n```text\n(.*?)```\n<!-- /parameter-tree -->", page, re.S).group(1)
    count = int(re.search(r"([\d,]+) parameters:\n\n<!-- parameter-tree -->", page).group(1).replace(",", ""))
    cfg = ModelConfig(vocab_size=CharTokenizer.from_text(data.builtin_text()).vocab_size,
                      **defaults.preset(None, has_data=False)["model"])
    shapes = jax.eval_shape(lambda k: model.init(k, cfg), key)
    listed = sorted(tuple(int(d) for d in s.split(",") if d.strip()) for s in re.findall(r"\((\d[\d, ]*)\)", tree))
    assert listed == sorted(leaf.shape for leaf in jax.tree.leaves(shapes))
    assert count == sum(leaf.size for leaf in jax.tree.leaves(shapes))


# ----------------------------------------------------------------------------- the figures


def _figures():
    spec = importlib.util.spec_from_file_location("docs_figures", os.path.join(ROOT, "docs", "figures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_figure_table_is_what_its_json_gives(capsys):
    """`python docs/figures.py --check`: each block between <!-- figures:NAME --> and
    <!-- /figures --> in README.md and docs/*.md is what NAME's function renders from
    its JSON today, so a table cannot drift from the run that made it."""
    figures = _figures()
    assert figures.main(["--check"]) == 0, capsys.readouterr().err
    used = {m.group(2) for page in PAGES
            for m in figures.BLOCK.finditer(open(os.path.join(ROOT, page), encoding="utf-8").read())}
    assert used == set(figures.RENDER), f"rendered but shown nowhere: {set(figures.RENDER) - used}"
    assert "<!-- figures:headline -->" in open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


# A measurement: a number with a unit of time, rate, size or share, or a ratio (1.87x).
MEASURE = re.compile(r"(?<![\w.-])\d[\d,]*(?:\.\d+)?\s?(?:ms|s|tokens/s|GB/s|MB/s|GFLOP/s|GFLOP|MFLOP|MB|GB|GiB|KB|%|x"
                     r"|times (?:faster|smaller|less|as))(?![\w/])")
# Numbers with those units outside the rendered blocks that are settings or limits, not measurements.
SETTINGS = {
    "16 MB", "256 MB", "64 MB", "64 KB", "1 MB", "1 GiB", "1 GB", "90%", "10%", "70%", "0.25 s",
}


def test_the_tests_the_pages_name_exist():
    """A page that names `tests/test_x.py::test_y` (or a test by its name alone) names one
    that is there: renaming a test or a file shows in this test, not in a reader's search."""
    sources = {os.path.basename(p): open(p, encoding="utf-8").read()
               for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))}
    missing = []
    for page in PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for m in re.finditer(r"(test_\w+\.py)(?:::(test_\w+))?", text):
            if m.group(1) not in sources or (m.group(2) and f"def {m.group(2)}(" not in sources[m.group(1)]):
                missing.append(f"{page}: {m.group(0)}")
        for name in re.findall(r"`(test_[a-z0-9_]+)(?:\[[^`]*)?`", text):
            if not any(f"def {name}(" in source for source in sources.values()):
                missing.append(f"{page}: {name}")
    assert not missing, missing


def test_no_measured_figure_stands_outside_the_rendered_blocks():
    """Outside the figures blocks (and code), the pages quote no measurement: a time, a
    rate, a size or a ratio is either rendered from JSON or not quoted (dated history
    lives in benchmarks/NOTES.md). The numbers that remain are settings (SETTINGS)."""
    figures = _figures()
    found = []
    for page in PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        text = figures.BLOCK.sub("", text)
        text = FENCE.sub("", text)
        text = re.sub(r"`[^`\n]*`", "", text)                      # flags and code in the prose
        found += [f"{page}: {m.group(0)!r} in ...{text[max(0, m.start() - 50):m.end() + 20]!r}"
                  for m in MEASURE.finditer(text) if m.group(0) not in SETTINGS]
    assert not found, "\n".join(found)
