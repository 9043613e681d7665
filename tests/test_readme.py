"""The README's code, run as written: the "Use it from Python" blocks and the NumPy snippet."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from minitx_fn import model
from minitx_fn.config import ModelConfig
from tests.helpers import standard_promotion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section(title: str) -> str:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end]


@pytest.mark.heavy
def test_the_python_blocks_run_as_they_stand_in_an_empty_folder(tmp_path, monkeypatch, capsys):
    """The three blocks, in order, in one empty folder, as a user pastes them (the
    third loads the run the first wrote). What they print is checked against what they
    made: the run directory the CLI reads, its metrics, the texts they generate."""
    from minitx_fn import checkpoint, runs
    blocks = re.findall(r"```python\n(.*?)```", _section("Use it from Python"), re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespaces = []
    with standard_promotion():                    # the suite's strict promotion is not the user's
        for block in blocks:
            namespace = {"__name__": "__readme__"}
            exec(compile(block, "README.md", "exec"), namespace)
            namespaces.append(namespace)
    out = capsys.readouterr().out
    whole, own, loaded = namespaces
    # 1. The whole job: a run the CLI reads, resumed to step 400, metrics of both parts.
    assert int(checkpoint.load("runs/poem").meta["step"]) == 400 == int(whole["more"].state.step)
    records = runs.read_records("runs/poem/metrics.jsonl").records
    assert [r["step"] for r in records] == [100, 200, 300, 400] and all("val_loss" in r for r in records)
    assert whole["result"].records[-1] == records[2] and str(records[2]) in out
    assert records[-1]["loss"] < 0.5                    # a one-sentence text is learned
    # Fine-tuned with LoRA (adapters on the frozen weights), evaluated; the same job in Llama's layers.
    assert whole["tuned"].base is not None and set(whole["tuned"].state.params) == {"blocks"}
    assert "Evaluation(loss=" in out
    assert (whole["llama"].config.positions, whole["llama"].config.n_kv_heads) == ("rotary", 2)
    # 2. Its own model and loop: the loss it printed is the evaluation of the saved and loaded parameters.
    assert "loss on the whole text:" in out and "lr" not in own["fitted"].last_record    # no schedule given
    # 3. Three lines: the text continues the sentence the model learned; with the Llama run as a
    # draft, greedy speculative decoding prints the same text.
    printed, drafted = out.rstrip("\n").splitlines()[-2:]
    assert printed in "the quick brown fox jumps over the lazy dog. " * 3 and drafted == printed
    assert loaded["m"].config == whole["result"].config


def test_the_readme_snippet_reads_a_run_with_numpy_alone(tmp_path, monkeypatch, capsys, key):
    """The README's checkpoint snippet, run as written, on a saved run: its logits equal
    model.apply's, so its printed next character is the model's greedy choice."""
    from minitx_fn import checkpoint, data, train
    from minitx_fn.config import TrainConfig
    from minitx_fn.tokenizer import CharTokenizer

    root = ROOT
    readme = open(os.path.join(root, "README.md")).read()
    snippet = re.search(r"<!-- numpy-snippet -->\n```python\n(.*?)```", readme, re.S).group(1)
    tok = CharTokenizer.from_text(data.builtin_text())
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=2, max_len=16, init_std=0.5)
    with standard_promotion():
        state = train.init_state(key, cfg, TrainConfig().optimizer)
    checkpoint.save(str(tmp_path / "runs" / "hello-001"), state, model_config=cfg, train_config=TrainConfig(),
                    tokenizer=tok, data=checkpoint.BUILTIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(root)
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    ids = np.asarray(tok.encode("hello"))[None]
    expected = tok.chars[int(np.argmax(np.asarray(model.apply(state.params, ids, config=cfg))[0, -1]))]
    assert printed.strip() == f"after 'hello' comes {expected!r}"
