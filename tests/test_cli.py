"""The `minitx` command as a user meets it: the main job, resume, and every bad input.

Each fault must print one line `minitx: error: ...` (no traceback), exit non-zero
and leave what was saved intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from minitx_fn import data
from minitx_fn.cli import main
from tests.helpers import standard_promotion

# A tiny model on the built-in corpus: a few seconds per run.
TINY = ["--width", "32", "--layers", "1", "--heads", "2", "--context", "16", "--batch-size", "8"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with standard_promotion():
        yield


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, *fragments, status=2):
    assert code == status
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minitx: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_main_job_on_the_builtin_corpus(capsys):
    """`minitx train` with no arguments: the README's first command."""
    code, out, err = run(capsys, "train")
    assert code == 0, err
    assert "Starting training..." in out
    steps = [line for line in out.splitlines() if line.startswith("Step ")]
    assert [s.split(",")[0] for s in steps] == [f"Step {n}" for n in range(100, 501, 100)]
    assert all(len(s.split("Loss: ")[1]) == 6 for s in steps)                  # X.XXXX
    generated = out.split("Generated text:\n")[1].splitlines()[0]
    assert generated.startswith("hello") and len(generated) == len("hello") + 100
    # Seed plus continuation is a piece of the corpus cycle.
    assert generated in data.BUILTIN_CORPUS * 5
    assert os.path.isfile("runs/hello-001/checkpoint/meta.json")
    records = [json.loads(line) for line in open("runs/hello-001/metrics.jsonl")]
    assert [r["step"] for r in records] == [100, 200, 300, 400, 500] and records[-1]["loss"] < 0.2


def test_resumed_run_logs_the_same_losses_bit_for_bit(capsys):
    common = [*TINY, "--decay-steps", "200", "--log-every", "50", "--save-every", "100"]
    assert run(capsys, "train", *common, "--steps", "200", "--out", "a")[0] == 0
    assert run(capsys, "train", *common, "--steps", "100", "--out", "b")[0] == 0
    code, out, err = run(capsys, "train", "--resume", "b", "--steps", "200")
    assert code == 0, err
    assert "Resuming b from step 100" in out
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, open(f"{d}/metrics.jsonl"))] for d in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_generate_command(capsys):
    assert run(capsys, "train", *TINY, "--steps", "300", "--out", "r")[0] == 0
    code, out, _ = run(capsys, "generate", "--checkpoint", "r", "--prompt", "hello", "--max-new-tokens", "20")
    assert code == 0 and out.startswith("hello") and len(out.strip()) == 25
    code, out, _ = run(capsys, "generate", "--checkpoint", "r", "--prompt", "hel", "--temperature", "0.8",
                       "--top-k", "3", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "30", "--stop", "!")
    assert code == 0 and out.strip().endswith("!") and out.count("!") == 1
    # Unknown characters are named.
    code, _, err = run(capsys, "generate", "--checkpoint", "r", "--prompt", "hello Zebra")
    assert_clean_error(code, err, "'Zb'", "not in the vocabulary")


@pytest.mark.parametrize("make, fragment", [
    (lambda: None, "does not exist"),
    (lambda: os.mkdir("in.txt"), "is a directory"),
    (lambda: open("in.txt", "w").close(), "is empty"),
    (lambda: open("in.txt", "wb").write(b"caf\xe9 au lait"), "not UTF-8"),
    (lambda: open("in.txt", "w").write("short"), "fewer than the context plus one"),
])
def test_bad_data_files(capsys, make, fragment):
    make()
    code, _, err = run(capsys, "train", "--data", "in.txt", "--steps", "1")
    assert_clean_error(code, err, fragment)
    assert not os.path.exists("runs") or not os.listdir("runs") or not any(
        os.path.exists(f"runs/{d}/checkpoint") for d in os.listdir("runs"))


def test_unreadable_data_file(capsys, monkeypatch):
    """As root, chmod cannot make a file unreadable, so the OS error is simulated."""
    open("in.txt", "w").write("x" * 1000)
    real_open = open

    def deny(path, *args, **kwargs):
        if str(path).endswith("in.txt"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    code, _, err = run(capsys, "train", "--data", "in.txt")
    assert_clean_error(code, err, "cannot read", "Permission denied")


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--steps", "0"], "--steps: 0 must be >= 1"),
    (["train", "--width", "30", "--heads", "4"], "--width=30"),
    (["train", "--lr", "abc"], "'abc' is not a number"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate", "--checkpoint", "x", "--prompt", "a", "--temperature", "-1"], "--temperature=-1.0"),
    (["generate", "--checkpoint", "x", "--prompt", "a", "--top-k", "0"], "--top-k: 0 must be >= 1"),
    (["generate", "--checkpoint", "x", "--prompt", "a", "--top-p", "1.5"], "--top-p=1.5"),
    (["generate", "--checkpoint", "x", "--prompt", "a", "--top-p", "0"], "--top-p=0.0"),
    (["generate", "--checkpoint", "nowhere", "--prompt", "a"], "no run directory"),
])
def test_bad_options(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert_clean_error(code, err, fragment)


def test_corrupt_checkpoint_and_contradicting_resume(capsys):
    assert run(capsys, "train", *TINY, "--steps", "20", "--out", "r")[0] == 0
    before = open("r/checkpoint/params.npz", "rb").read()
    code, _, err = run(capsys, "train", "--resume", "r", "--steps", "40", "--width", "64")
    assert_clean_error(code, err, "--width 64 (saved: 32)")
    code, _, err = run(capsys, "train", *TINY, "--out", "r")
    assert_clean_error(code, err, "already holds a run", "--resume r")
    open("r/checkpoint/params.npz", "wb").write(before[: len(before) // 2])
    code, _, err = run(capsys, "generate", "--checkpoint", "r", "--prompt", "hello")
    assert_clean_error(code, err, "corrupt or truncated")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(capsys):
    code, out, err = run(capsys, "train", *TINY, "--steps", "300", "--save-every", "1", "--log-every", "1",
                         "--eval-every", "1000", "--lr", "1e30", "--warmup", "0", "--out", "r")
    assert_clean_error(code, err, "the loss became", "at step", "last good checkpoint", "--lr", status=1)
    bad_step = int(err.split("at step ")[1].split(";")[0])
    saved = json.load(open("r/checkpoint/meta.json"))["step"]
    assert saved == bad_step - 1


def test_ctrl_c_saves_and_the_run_resumes(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "minitx_fn", "train", *TINY, "--steps", "100000",
                             "--log-every", "50", "--out", "r"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if line.startswith("Step 50,") or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Interrupted at step" in out and "Traceback" not in err
    assert os.path.isfile(tmp_path / "r/checkpoint/meta.json"), (out, err, os.listdir(tmp_path))
    step = json.load(open(tmp_path / "r/checkpoint/meta.json"))["step"]
    assert step >= 50
    resumed = subprocess.run([sys.executable, "-m", "minitx_fn", "train", "--resume", "r", "--steps", str(step + 10)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming r from step {step}" in resumed.stdout
