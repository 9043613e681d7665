"""The README's Python, run as written: the "Use it from Python" blocks.

The README's other blocks (shell commands) and every block of docs/*.md are checked
by tests/test_docs.py, which lists the few that no test can run and why."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import standard_promotion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section(title: str) -> str:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end]


@pytest.mark.heavy
def test_the_python_blocks_run_as_they_stand_in_an_empty_folder(tmp_path, monkeypatch, capsys):
    """The blocks, in order, in one empty folder, as a user pastes them: the one that
    starts `# alibi.py` saved as that file, the others run (the third imports it, the
    fourth loads a run the first wrote). What they print is checked against what they
    made: the run directories the CLI reads, their metrics, the texts they generate."""
    from minitx_fn import checkpoint, runs
    blocks = re.findall(r"```python\n(.*?)```", _section("Use it from Python"), re.S)
    assert len(blocks) == 4 and blocks[1].startswith("# alibi.py\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "alibi.py").write_text(blocks[1])
    namespaces = []
    with standard_promotion():                    # the suite's strict promotion is not the user's
        for block in blocks[:1] + blocks[2:]:
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
    assert (whole["llama"].model.positions, whole["llama"].model.n_kv_heads) == ("rotary", 2)
    # 2. A model of one's own: trained, resumed, its run naming its code, decoded (with a draft: the
    # same greedy text), fine-tuned with LoRA, and trained in a loop of one's own.
    meta = checkpoint.load("runs/poem-alibi", trust_code=True).meta
    assert meta["step"] == 250 and meta["job"]["model"]["code"] == "alibi:ALiBi"
    lines, sentence = out.splitlines(), "the quick brown fox jumps over the lazy dog. " * 3
    assert any(a == b and a and a in sentence for a, b in zip(lines, lines[1:]))   # alibi, then with a draft
    assert type(own["lora"].model).__name__ == "ALiBi" and own["lora"].base is not None
    assert "validation loss:" in out and os.path.exists("alibi.npz")
    # 3. Three lines: the text continues the sentence the model learned.
    assert lines[-1] in "the quick brown fox jumps over the lazy dog. " * 3
    assert loaded["m"].model == whole["result"].model
    # 4. The command line, from the folder that holds alibi.py (a process of its own: the
    # console script's path is the point), decodes the run with --trust-code.
    minitx = os.path.join(os.path.dirname(sys.executable), "minitx")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([minitx, "generate", "--checkpoint", "runs/poem-alibi", "--prompt", "the lazy",
                           "--max-new-tokens", "8", "--trust-code"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in sentence

