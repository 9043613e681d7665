"""Faults, injected: every bad input, damaged file, storage failure, signal and kill ends
cleanly, and nothing saved is lost.

Each case of the catalogue asserts the exit status, exactly one `minitx: error: ...`
line on stderr and no traceback, and that the run saved before the fault still loads
with the same step and bit-identical parameters. Then: processes killed with SIGKILL
at random moments, a real full disk (a small tmpfs, when this process may mount
one), and hypothesis fuzzing of the command line.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitx_fn import checkpoint, cli, data, generate, job, plot, runs
from tests.helpers import TINY, assert_one_error_line, legacy_meta, run_main, standard_promotion

RUN = [*TINY, "--log-every", "10", "--save-every", "20", "--max-new-tokens", "5"]


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """Two runs trained once for the module: `builtin` (the built-in corpus) and
    `text` (on text.txt, with validation), each saved at step 20."""
    root = tmp_path_factory.mktemp("saved")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rng = np.random.default_rng(0)
        open("text.txt", "w").write(" ".join(rng.choice(["to", "be", "or", "not", "that", "is"], 600)))
        with standard_promotion():
            assert cli.main(["train", *RUN, "--steps", "20", "--out", "builtin"]) == 0
            assert cli.main(["train", *RUN, "--steps", "20", "--data", "text.txt", "--out", "text"]) == 0
    finally:
        os.chdir(cwd)
    return root


class Snapshot:
    """What a run's checkpoint holds, to prove later that a fault changed nothing."""

    def __init__(self, run_dir):
        self.run_dir = str(run_dir)
        self.step, self.params = self._read()

    def _read(self):
        ck = checkpoint.load(self.run_dir)
        return int(ck.meta["step"]), jax.tree.map(np.asarray, ck.state.params)

    def assert_unchanged(self):
        step, params = self._read()
        assert step == self.step
        jax.tree.map(np.testing.assert_array_equal, params, self.params)


@pytest.fixture
def work(saved_runs, tmp_path, monkeypatch):
    """A fresh copy of the saved runs in tmp_path, which becomes the working directory."""
    for name in ("builtin", "text"):
        shutil.copytree(saved_runs / name, tmp_path / name)
    shutil.copy(saved_runs / "text.txt", tmp_path / "text.txt")
    monkeypatch.chdir(tmp_path)
    _edit_meta("text", lambda m: m["job"]["data"].update(path=str(tmp_path / "text.txt")))   # the copy trains on its copy
    return tmp_path


def _flip_byte(path, at=0.5):
    blob = bytearray(open(path, "rb").read())
    blob[int(len(blob) * at)] ^= 0x01
    open(path, "wb").write(bytes(blob))


def _edit_meta(run, change):
    path = os.path.join(run, "checkpoint", "meta.json")
    meta = json.load(open(path))
    change(meta)
    open(path, "w").write(json.dumps(meta))


def _resign_params(run, change):
    """Edit params.npz and write a matching checksum into meta.json (a hostile edit)."""
    path = os.path.join(run, "checkpoint", "params.npz")
    arrays = dict(np.load(path))
    change(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    blob = buffer.getvalue()
    open(path, "wb").write(blob)
    _edit_meta(run, lambda m: m["files"].update({"params.npz": {"bytes": len(blob),
                                                                "sha256": hashlib.sha256(blob).hexdigest()}}))


def _live_lock(run):
    """A lock held by a live process: this test's own parent (pytest's runner)."""
    open(os.path.join(run, runs.LOCK), "w").write(f"{os.getppid()} {socket.gethostname()}\n")


def _nothing(work):
    pass


# (id, setup(work) -> None, argv, fragments of the one error line, the run that must stay intact, exit status)
CASES = [
    # --- a new run never overwrites another run's files
    ("out is a file", lambda w: open("f", "w").close(), ["train", *RUN, "--out", "f"], ["is a file"], None, 2),
    ("out holds a run", _nothing, ["train", *RUN, "--out", "builtin"], ["already holds a run", "checkpoint"],
     "builtin", 2),
    ("out holds only checkpoint.old", lambda w: os.rename("builtin/checkpoint", "builtin/checkpoint.old"),
     ["train", *RUN, "--out", "builtin"], ["checkpoint.old"], "builtin", 2),
    ("out holds a killed save's temporary", lambda w: os.makedirs("o/.checkpoint.tmp-x"),
     ["train", *RUN, "--out", "o"], [".checkpoint.tmp-x"], None, 2),
    ("out holds another run's metrics", lambda w: (os.mkdir("o"), open("o/metrics.jsonl", "w").write("{}")),
     ["train", *RUN, "--out", "o"], ["metrics.jsonl"], None, 2),
    ("out holds a loss picture", lambda w: (os.mkdir("o"), open("o/loss.png", "w").close()),
     ["train", *RUN, "--out", "o"], ["loss.png"], None, 2),
    ("out is under a file", lambda w: open("f", "w").close(), ["train", *RUN, "--out", "f/run"], ["is a file"],
     None, 2),
    ("out is locked by a live process", lambda w: (os.mkdir("o"), _live_lock("o")), ["train", *RUN, "--out", "o"],
     ["in use by another process", f"PID {os.getppid()}"], None, 2),
    # --- resume
    ("resume with out", _nothing, ["train", "--resume", "builtin", "--out", "x"], ["drop --out"], "builtin", 2),
    ("resume a missing run", _nothing, ["train", "--resume", "nowhere"], ["no run directory"], None, 2),
    ("resume a directory without a checkpoint", lambda w: os.mkdir("empty"), ["train", "--resume", "empty"],
     ["holds no checkpoint"], None, 2),
    ("resume with another width", _nothing, ["train", "--resume", "builtin", "--width", "64"],
     ["--width 64 (saved: --width 32)"], "builtin", 2),
    ("resume with a preset", _nothing, ["train", "--resume", "builtin", "--preset", "hello"], ["--preset hello"],
     "builtin", 2),
    ("resume a finished run", _nothing, ["train", "--resume", "builtin", "--steps", "20"], ["already at step 20"],
     "builtin", 2),
    ("resume when the data file is gone", lambda w: os.rename("text.txt", "moved.txt"),
     ["train", "--resume", "text", "--steps", "30"], ["is gone", "if it moved, pass --data NEW_PATH"], "text", 2),
    ("resume when the data file was edited", lambda w: open("text.txt", "a").write(" more"),
     ["train", "--resume", "text", "--steps", "30"], ["changed since the run trained on it"], "text", 2),
    ("resume with other data", lambda w: open("other.txt", "w").write("to be " * 200),
     ["train", "--resume", "text", "--steps", "30", "--data", "other.txt"], ["is not the text this run trained on"],
     "text", 2),
    ("resume a built-in run with data", _nothing, ["train", "--resume", "builtin", "--steps", "30", "--data",
                                                    "text.txt"], ["drop --data"], "builtin", 2),
    ("resume a locked run", lambda w: _live_lock("builtin"), ["train", "--resume", "builtin", "--steps", "30"],
     ["in use by another process"], "builtin", 2),
    ("resume with a damaged metrics line", lambda w: open("builtin/metrics.jsonl", "w").write('{"step": 10}\n{x\n{"step": 20}\n'),
     ["train", "--resume", "builtin", "--steps", "30"], ["line 2 is not a metrics record"], "builtin", 2),
    # --- damaged or hostile checkpoints
    ("a flipped bit in the parameters", lambda w: _flip_byte("builtin/checkpoint/params.npz"),
     ["generate", "--checkpoint", "builtin", "--prompt", "hello"], ["params.npz", "is damaged"], None, 2),
    ("a truncated optimiser state", lambda w: open("builtin/checkpoint/opt_state.npz", "r+b").truncate(100),
     ["train", "--resume", "builtin", "--steps", "30"], ["opt_state.npz", "is damaged"], None, 2),
    ("a missing array file", lambda w: os.remove("builtin/checkpoint/params.npz"),
     ["generate", "--checkpoint", "builtin", "--prompt", "hello"], ["is missing"], None, 2),
    ("meta.json is not JSON", lambda w: open("builtin/checkpoint/meta.json", "w").write("{not json"),
     ["generate", "--checkpoint", "builtin", "--prompt", "hello"], ["is corrupt"], None, 2),
    ("meta.json is a list", lambda w: open("builtin/checkpoint/meta.json", "w").write("[1, 2]"),
     ["generate", "--checkpoint", "builtin", "--prompt", "hello"], ["holds list, not an object"], None, 2),
    ("meta.json has a field of the wrong type", lambda w: _edit_meta("builtin", lambda m: m["job"]["model"]["config"].update(
        n_layers="1")), ["generate", "--checkpoint", "builtin", "--prompt", "hello"], ["n_layers = '1'"], None, 2),
    ("meta.json says max_len 1e9", lambda w: _edit_meta("builtin", lambda m: m["job"]["model"]["config"].update(
        max_len=10**9)), ["generate", "--checkpoint", "builtin", "--prompt", "hello"],
     ["the probe recorded is", "its config in meta.json, or the probe, was edited"], None, 2),
    ("meta.json claims a file of a petabyte", lambda w: _edit_meta("builtin", lambda m: m["files"]["params.npz"].update(
        bytes=10**15)), ["generate", "--checkpoint", "builtin", "--prompt", "hello"], ["params.npz", "is damaged"],
     None, 2),
    ("a lock naming an impossible PID", lambda w: open("builtin/.lock", "w").write(f"{10**20} {socket.gethostname()}"),
     ["train", "--resume", "builtin", "--steps", "30"], ["exists but is unreadable"], "builtin", 2),
    ("parameters with NaN and a matching checksum", lambda w: _resign_params(
        "builtin", lambda a: a["head/b"].__setitem__(0, np.nan)),
     ["generate", "--checkpoint", "builtin", "--prompt", "hello"], ["'head/b' holds non-finite values"], None, 2),
    # --- absurd numbers and bad values in flags
    ("seed 1e29", _nothing, ["train", "--seed", "1e29"], ["--seed", "'1e29' is not a whole number"], None, 2),
    ("seed beyond 32 bits", _nothing, ["train", "--seed", str(2**40)], ["--seed", "must lie in"], None, 2),
    ("steps beyond int32", _nothing, ["train", "--steps", str(2**31)], ["--steps", "must lie in"], None, 2),
    ("max-new-tokens 1e12", _nothing, ["generate", "--checkpoint", "builtin", "--prompt", "h", "--max-new-tokens",
                                        "1000000000000"], ["--max-new-tokens", "must lie in"], None, 2),
    ("width not divisible by heads", _nothing, ["train", "--width", "30", "--heads", "4"],
     ["--width 30 is invalid", "divisible by --heads 4", "try --width 32"], None, 2),
    ("a model too large for memory", _nothing, ["train", "--width", "65536", "--layers", "64"],
     ["needs at least", "GB of memory", "--width 65536"], None, 2),
    ("lr 1e300", _nothing, ["train", "--lr", "1e300"], ["--lr 1e+300 is invalid"], None, 2),
    ("min-lr above lr", _nothing, ["train", "--min-lr", "1"], ["--min-lr 1.0 is invalid", "[0, --lr 0.003]"], None, 2),
    ("warm-up as long as the run", _nothing, ["train", "--steps", "10", "--warmup", "10"],
     ["--warmup 10 is invalid", "--decay-steps 10"], None, 2),
    ("an unknown flag", _nothing, ["train", "--bogus"], ["unrecognized arguments: --bogus"], None, 2),
    ("a prompt the model cannot encode, before training", _nothing, ["train", *RUN, "--prompt", "Zebra", "--out", "z"],
     ["'Zb'", "not in the vocabulary"], None, 2),
    ("a prompt that is not UTF-8", _nothing, ["generate", "--checkpoint", "builtin", "--prompt", "h\udcff"],
     ["'\\udcff'", "not in the vocabulary"], "builtin", 2),
    ("a prompt that is not UTF-8, before training", _nothing, ["train", *RUN, "--prompt", "h\udcff", "--out", "u"],
     ["not in the vocabulary"], None, 2),
    ("an empty prompt", _nothing, ["generate", "--checkpoint", "builtin", "--prompt", ""], ["the prompt is empty"],
     "builtin", 2),
    ("a stop string the model cannot encode", _nothing, ["generate", "--checkpoint", "builtin", "--prompt", "hello",
                                                         "--stop", "?"], ["'?'", "not in the vocabulary"], "builtin", 2),
    ("top-p above one", _nothing, ["generate", "--checkpoint", "builtin", "--prompt", "h", "--top-p", "1.5"],
     ["--top-p 1.5 is invalid"], None, 2),
    ("a negative temperature", _nothing, ["generate", "--checkpoint", "builtin", "--prompt", "h", "--temperature",
                                          "-1"], ["--temperature -1.0 is invalid"], None, 2),
    ("a picture in a missing folder", _nothing, ["attention", "--checkpoint", "builtin", "--prompt", "hello", "--out",
                                                 "nowhere/a.png"], ["folder", "does not exist"], None, 2),
    ("a picture of an unknown kind", _nothing, ["attention", "--checkpoint", "builtin", "--prompt", "hello", "--out",
                                                "a.bogus"], ["give a file name ending in .png"], None, 2),
    ("a picture that is a directory", lambda w: os.mkdir("d.png"), ["plot", "builtin", "--out", "d.png"],
     ["it is a directory"], None, 2),
    ("an attention prompt longer than the context", _nothing, ["attention", "--checkpoint", "builtin", "--prompt",
                                                              "hello " * 5, "--out", "a.png"],
     ["the model's context is 16"], None, 2),
    ("a plot of a directory without metrics", lambda w: os.mkdir("e"), ["plot", "e"], ["does not exist"], None, 2),
    ("half the multi-process flags", _nothing, ["train", "--coordinator", "127.0.0.1:1"],
     ["needs all of --coordinator, --num-processes and --process-id"], None, 2),
    ("a process id beyond the processes", _nothing, ["train", "--coordinator", "127.0.0.1:1", "--num-processes", "2",
                                                     "--process-id", "2"], ["--process-id 2 must lie in [0, 2)"], None, 2),
    ("a heartbeat timeout without processes", _nothing, ["train", "--heartbeat-timeout", "5"],
     ["--heartbeat-timeout is for multi-process runs"], None, 2),
    ("a coordinator without a port", _nothing, ["train", "--coordinator", "garbage", "--num-processes", "2",
                                                "--process-id", "0"], ["--coordinator", "HOST:PORT"], None, 2),
    ("a coordinator port beyond 65535", _nothing, ["train", "--coordinator", "127.0.0.1:99999"],
     ["--coordinator", "a port in [1, 65535]"], None, 2),
    # --- downloads
    ("a download without a network", _nothing, ["data", "shakespeare", "--url", "http://127.0.0.1:1/input.txt",
                                                "--out", "ts.txt"], ["cannot download", "put it at ts.txt"], None, 1),
    ("a download with the wrong checksum", lambda w: open("wrong.txt", "w").write("not shakespeare"),
     ["data", "shakespeare", "--url", "file://{work}/wrong.txt", "--out", "ts.txt"],
     ["not the expected", "nothing was written to ts.txt"], None, 1),
    ("a download onto another file", lambda w: open("ts.txt", "w").write("mine"),
     ["data", "shakespeare", "--out", "ts.txt"], ["exists and is not the expected file"], None, 2),
    ("a download onto a directory", lambda w: os.mkdir("d"), ["data", "shakespeare", "--out", "d"],
     ["is a directory"], None, 2),
    ("a download through a file", lambda w: open("f", "w").close(), ["data", "shakespeare", "--out", "f/ts.txt"],
     ["cannot write into"], None, 2),
    ("a download to an empty path", _nothing, ["data", "shakespeare", "--out", ""], ["the output path is empty"],
     None, 2),
    # --- data files
    ("a missing data file", _nothing, ["train", "--data", "in.txt"], ["does not exist"], None, 2),
    ("a data directory", lambda w: os.mkdir("in.txt"), ["train", "--data", "in.txt"], ["is a directory"], None, 2),
    ("an empty data file", lambda w: open("in.txt", "w").close(), ["train", "--data", "in.txt"], ["is empty"],
     None, 2),
    ("a data file that is not UTF-8", lambda w: open("in.txt", "wb").write(b"caf\xe9 au lait"),
     ["train", "--data", "in.txt"], ["not UTF-8", "offset 3"], None, 2),
    ("a data file shorter than the context", lambda w: open("in.txt", "w").write("short"),
     ["train", "--data", "in.txt"], ["fewer than the context plus one", "--context 64"], None, 2),
    ("a loop of symbolic links as data", lambda w: os.symlink("loop.txt", "loop.txt"),
     ["train", "--data", "loop.txt"], ["cannot be opened", "symbolic links"], None, 2),
    ("a validation setting without data", _nothing, ["train", *RUN, "--eval-every", "5", "--out", "e"],
     ["--eval-every 5 needs data with a held-out part"], None, 2),
    ("a validation sample without data", _nothing, ["train", *RUN, "--eval-tokens", "all", "--out", "e"],
     ["--eval-tokens all needs data"], None, 2),
    ("out that cannot be created", _nothing, ["train", *RUN, "--out", "/proc/minitx-test/r"],
     ["cannot create '/proc/minitx-test/r'"], None, 2),
    ("more devices than there are", _nothing, ["train", *RUN, "--devices", "3", "--out", "d"],
     ["--devices 3 is not available"], None, 2),
    ("micro-batches that do not divide the batch", _nothing, ["train", *RUN, "--grad-accum", "3", "--out", "g"],
     ["--grad-accum 3 is invalid", "divide --batch-size 8"], None, 2),
    ("an empty out", _nothing, ["train", *RUN, "--out", ""], ["--out", "is empty"], None, 2),
    ("a metrics log without a number to draw", lambda w: (os.mkdir("m"), open("m/metrics.jsonl", "w").write(
        '{"step": 1, "loss": "x"}\n')), ["plot", "m"], ["1 record(s) but no numeric loss"], None, 2),
]


@pytest.mark.parametrize("name, setup, argv, fragments, keep, status", CASES, ids=[c[0] for c in CASES])
def test_fault(work, capsys, name, setup, argv, fragments, keep, status):
    intact = Snapshot(keep) if keep else None
    setup(work)
    argv = [a.replace("{work}", str(work)) for a in argv]
    code, out, err = run_main(capsys, *argv)
    assert_one_error_line(code, err, *fragments, status=status)
    if intact:
        intact.assert_unchanged()
    if argv[0] == "train" and "--out" in argv and keep is None:      # a refused new run wrote nothing
        target = argv[argv.index("--out") + 1]
        assert not os.path.exists(os.path.join(target, "checkpoint")) or target in ("builtin", "text")
        assert not os.path.exists("runs")                            # nor took a default run directory


def test_multi_process_variables_are_read_only_by_a_multi_process_run(work, capsys, monkeypatch):
    """MINITX_HEARTBEAT_TIMEOUT exported for a cluster does not stop a one-process run,
    a malformed variable breaks no other command, and one a run would use is named."""
    monkeypatch.setenv("MINITX_HEARTBEAT_TIMEOUT", "60")
    monkeypatch.setenv("MINITX_NUM_PROCESSES", "abc")
    assert run_main(capsys, "train", "--resume", "builtin", "--steps", "21")[0] == 0
    assert run_main(capsys, "generate", "--checkpoint", "builtin", "--prompt", "h", "--max-new-tokens", "2")[0] == 0
    monkeypatch.setenv("MINITX_COORDINATOR", "127.0.0.1:1")
    code, _, err = run_main(capsys, "train", "--resume", "builtin", "--steps", "22")
    assert_one_error_line(code, err, "MINITX_NUM_PROCESSES", "'abc' is not a valid --num-processes", status=2)


# ----------------------------------------------------------------------------- faults during training


def test_a_full_disk_during_a_save_keeps_the_last_good_checkpoint(work, capsys, monkeypatch):
    """Simulated here (this test must run anywhere); test_a_real_full_disk fills a tmpfs."""
    intact = Snapshot("builtin")
    real = checkpoint._write

    def full(path, blob):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write", full)
    code, _, err = run_main(capsys, "train", "--resume", "builtin", "--steps", "40")
    assert_one_error_line(code, err, "No space left on device", "last good checkpoint (step 20)",
                          "continue with --resume builtin", status=1)
    monkeypatch.setattr(checkpoint, "_write", real)
    intact.assert_unchanged()
    assert not [n for n in os.listdir("builtin") if n.startswith(runs.TEMPORARY_PREFIX)]
    assert run_main(capsys, "train", "--resume", "builtin", "--steps", "40")[0] == 0   # and it continues


def test_a_read_only_metrics_log_stops_the_run_cleanly(work, capsys, monkeypatch):
    intact = Snapshot("builtin")

    def read_only(path, record):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runs, "append_record", read_only)
    code, _, err = run_main(capsys, "train", "--resume", "builtin", "--steps", "40")
    assert_one_error_line(code, err, "metrics.jsonl", "Read-only file system", status=1)
    intact.assert_unchanged()


def test_a_picture_that_cannot_be_written_after_training(work, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plot, "plot_losses", full)
    code, _, err = run_main(capsys, "train", "--resume", "builtin", "--steps", "30")
    assert_one_error_line(code, err, "loss.png", "No space left", "the checkpoint is saved", status=1)
    assert checkpoint.load("builtin").meta["step"] == 30


def test_a_nan_loss_keeps_a_finite_checkpoint(work, capsys):
    code, _, err = run_main(capsys, "train", *RUN, "--steps", "300", "--save-every", "1", "--log-every", "1",
                            "--lr", "1e30", "--warmup", "0", "--out", "nan")
    line = assert_one_error_line(code, err, "became non-finite at step", "--lr", status=1)
    bad = int(line.split("at step ")[1].split(";")[0])
    if "no checkpoint had been saved" not in line:
        assert f"(step {bad - 1})" in line
        assert checkpoint.load("nan").meta["step"] == bad - 1        # loads: finite, whole


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_saves_the_step_and_exits_with_its_status(work, capsys, monkeypatch, signum):
    """The signal is sent from inside the run (at its first metrics record), in-process."""
    real = runs.append_record

    def signal_once(path, record):
        real(path, record)
        if record["step"] == 30:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(runs, "append_record", signal_once)
    code, out, err = run_main(capsys, "train", "--resume", "builtin", "--steps", "1000")
    assert code == 128 + signum and err == ""
    saved = checkpoint.load("builtin").meta["step"]
    assert saved in (30, 31) and f"Stopped by {signal.Signals(signum).name} at step {saved}" in out
    assert not os.path.exists("builtin/.lock")


def test_a_second_signal_during_the_save_leaves_a_whole_checkpoint(work, capsys, monkeypatch):
    real_save = checkpoint.save
    calls = []

    def save_under_fire(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)        # first: a request to stop
        os.kill(os.getpid(), signal.SIGINT)             # second, in the middle of the write
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save_under_fire)
    code, _, err = run_main(capsys, "train", "--resume", "builtin", "--steps", "1000", "--save-every", "25")
    assert code == 128 + signal.SIGINT and "interrupted by SIGINT" in err and len(err.strip().splitlines()) == 1
    assert checkpoint.load("builtin").meta["step"] == 25


def test_resume_removes_what_a_killed_save_left_and_drops_a_torn_line(work, capsys):
    os.mkdir("builtin/.checkpoint.tmp-killed")
    open("builtin/metrics.jsonl", "a").write('{"step": 25, "lo')
    code, out, err = run_main(capsys, "train", "--resume", "builtin", "--steps", "30")
    assert code == 0, err
    assert "Removed 1 unfinished checkpoint" in out and "half-written line" in out
    assert [r["step"] for r in runs.read_records("builtin/metrics.jsonl").records] == [10, 20, 30]
    assert sorted(n for n in os.listdir("builtin") if not n.endswith(".png")) == ["checkpoint", "metrics.jsonl"]


def test_moved_data_with_the_same_text_resumes(work, capsys):
    os.rename("text.txt", "moved.txt")
    code, out, err = run_main(capsys, "train", "--resume", "text", "--steps", "30", "--data", "moved.txt")
    assert code == 0, err
    assert checkpoint.load("text").data["path"] == os.path.abspath("moved.txt")


def test_a_stale_lock_is_taken_over(work, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    open("builtin/.lock", "w").write(f"{dead.pid} {socket.gethostname()}\n")
    code, out, err = run_main(capsys, "train", "--resume", "builtin", "--steps", "30")
    assert code == 0, err
    assert f"Took over the lock of process {dead.pid}" in out


# ----------------------------------------------------------------------------- killed processes, a real full disk


@pytest.mark.heavy
def test_sigkill_at_random_moments_never_leaves_a_damaged_checkpoint(tmp_path):
    """Three times: a training process saving every step is killed with SIGKILL at a random
    moment (often mid-save); whatever checkpoint is left loads, and the next process
    resumes it. A final resume finishes with no temporary folder left."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "minitx_fn", "train"]
    first = [*TINY, "--save-every", "1", "--log-every", "5", "--steps", "100000", "--out", "k"]
    rng = random.Random(1234)
    steps = []
    for i in range(3):
        proc = subprocess.Popen(argv + (first if i == 0 else ["--resume", "k", "--save-every", "1"]),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
        try:
            for line in proc.stdout:
                if line.startswith("Step "):                  # training, and saving every step
                    break
            time.sleep(rng.uniform(0.0, 0.3))
            proc.kill()
            proc.wait(timeout=60)
        finally:
            proc.kill()
        with standard_promotion():
            steps.append(int(checkpoint.load(str(tmp_path / "k")).meta["step"]))
    assert steps == sorted(steps) and steps[-1] > 0
    done = subprocess.run(argv + ["--resume", "k", "--steps", str(steps[-1] + 3)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not [n for n in os.listdir(tmp_path / "k") if n.startswith(runs.TEMPORARY_PREFIX) or n == runs.LOCK]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["train", "generate", "prepare", "upgrade"]), offset=st.floats(0.25, 4.0),
       signum=st.sampled_from([signal.SIGTERM, signal.SIGINT, signal.SIGHUP]))
@pytest.mark.heavy
def test_a_signal_at_any_moment_of_a_command_is_a_clean_finish_or_one_line(saved_runs, tmp_path_factory, command,
                                                                           offset, signum):
    """`minitx train`, `generate`, `prepare` or `upgrade` signalled at any offset from its
    start (importing JAX, preparing, compiling, training, saving, generating): exit 0 after a
    clean finish, or exit 128 + N with one line on stderr; never a lost signal, a
    traceback or a crash; and whatever it left (a run, a cache) loads and has no
    half-written files. (From 0.25 s: before that the interpreter is still starting, and
    a signal there ends it as the default action does, with no word; the README says so.)"""
    tmp = tmp_path_factory.mktemp("signal")
    text = tmp / "big.txt"
    text.write_text("".join(chr(0x4e00 + i % 5000) for i in range(300_000)), encoding="utf-8")   # 900 KB, 5000 ids
    argv = {"train": ["train", *TINY, "--steps", "60", "--log-every", "20", "--save-every", "20",
                      "--max-new-tokens", "5", "--out", "r"],
            "generate": ["generate", "--checkpoint", str(saved_runs / "builtin"), "--prompt", "hello",
                         "--max-new-tokens", "200"],
            "prepare": ["prepare", "--data", str(text), "--cache-dir", "cache"], "upgrade": ["upgrade", "r"]}[command]
    if command == "upgrade":                                  # a run of format 8, rewritten as 9
        shutil.copytree(saved_runs / "builtin", tmp / "r")
        meta = json.load(open(tmp / "r" / "checkpoint" / "meta.json"))
        json.dump(legacy_meta(meta, 8), open(tmp / "r" / "checkpoint" / "meta.json", "w"))
    proc = subprocess.Popen([sys.executable, "-m", "minitx_fn", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp)
    try:
        time.sleep(offset)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode in (0, 128 + signum), (command, offset, proc.returncode, err[-2000:])
    assert "Traceback" not in err and "Exception ignored" not in err, err
    run = tmp / "r"
    if proc.returncode and err:                               # before training: one line, nothing written
        assert len(err.strip().splitlines()) == 1 and err.startswith("minitx: interrupted by "), err
    elif proc.returncode and command == "train":              # in training: a checkpoint at this step
        assert f"Stopped by {signal.Signals(signum).name} at step" in out and (run / "checkpoint").exists(), out
    if (run / "checkpoint").exists():
        with standard_promotion():
            checkpoint.load(str(run))                         # whole: sizes and checksums hold
    if run.exists():
        assert not [n for n in os.listdir(run) if n.startswith(runs.TEMPORARY_PREFIX) or n == runs.LOCK]
    for folder, names, files in os.walk(tmp / "cache"):
        assert not [n for n in names if n.startswith(".prepare-")], names      # no unfinished preparation left
        assert "tokens.bin" not in files or "manifest.json" in files           # a cache is whole or absent


def test_a_signal_during_a_download_leaves_no_partial_file(tmp_path, monkeypatch):
    """The bytes arrive in pieces; SIGTERM after the first: Interrupted at the next piece,
    and neither the target nor the temporary .download-* file is left."""
    from minitx_fn.signals import Interrupted, StopSignals

    class Slow:
        def __init__(self):
            self.sent = 0

        def read(self, n):
            self.sent += 1
            if self.sent == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return b"x" * 10 if self.sent < 5 else b""

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: Slow())
    with StopSignals(), pytest.raises(Interrupted):
        data.download("http://example.invalid/x", str(tmp_path / "d" / "ts.txt"), "0" * 64)
    assert os.listdir(tmp_path) == []                              # the folder it made, removed too


def _mount_tmpfs(path, size: str) -> bool:
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_real_full_disk(tmp_path, capsys, monkeypatch):
    """A 1 MB tmpfs: the first checkpoints fit, later ones cannot. Needs mount (root);
    without it, test_a_full_disk_during_a_save_keeps_the_last_good_checkpoint covers
    the same path with a simulated ENOSPC."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount); the simulated full disk covers this")
    try:
        monkeypatch.chdir(disk)
        # The checkpoint of this model is about 100 KB: a few fit, then the padding fills the disk.
        code, out, err = run_main(capsys, "train", *TINY, "--steps", "40", "--save-every", "10", "--out", "r")
        assert code == 0, err
        intact = Snapshot("r")
        with open("padding", "wb", buffering=0) as f:        # fill what is left ...
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        with open("padding", "r+b") as f:                    # ... but for room for the lock and a few records
            f.truncate(os.path.getsize("padding") - 16384)
        code, out, err = run_main(capsys, "train", "--resume", "r", "--steps", "80")
        assert_one_error_line(code, err, "No space left on device", "last good checkpoint (step 40)", status=1)
        intact.assert_unchanged()
        assert not [n for n in os.listdir("r") if n.startswith(runs.TEMPORARY_PREFIX)]
    finally:
        os.chdir(tmp_path)
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=10)


# ----------------------------------------------------------------------------- fuzzing the command line


FLAG_VALUES = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True).map(repr),
                        st.sampled_from(["", "0", "-1", "1e29", "inf", "nan", "abc", "3.5", "1e-300"]),
                        st.text(max_size=6))
TRAIN_FLAGS = ["--steps", "--batch-size", "--context", "--layers", "--heads", "--width", "--lr", "--min-lr",
               "--warmup", "--decay-steps", "--weight-decay", "--seed", "--eval-every", "--save-every",
               "--log-every", "--prompt", "--max-new-tokens", "--devices", "--preset", "--data"]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None,
          max_examples=60)
@given(flags=st.lists(st.tuples(st.sampled_from(TRAIN_FLAGS), FLAG_VALUES), max_size=4))
def test_fuzzed_train_flags_exit_zero_or_two_never_a_traceback(tmp_path, capsys, monkeypatch, flags):
    """Random values for random flags of `minitx train`: every check runs; where all pass,
    the run itself is replaced by a stub (exit 0), so the fuzzing trains nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(job, "run", lambda *args, **kwargs: types.SimpleNamespace(stopped_by=None, sample=None))
    argv = ["train"] + [part for flag, value in flags for part in (flag, value)]
    code, _, err = run_main(capsys, *argv)
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("minitx: error: "), (argv, err)
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None,
          max_examples=30)
@given(flags=st.lists(st.tuples(st.sampled_from(["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                                                 "--stop", "--prompt"]), FLAG_VALUES), max_size=4))
def test_fuzzed_generate_flags_exit_zero_or_two_never_a_traceback(saved_runs, capsys, monkeypatch, flags):
    monkeypatch.setattr(generate, "generate", lambda *args, **kwargs: [np.zeros(0, np.int32)])
    argv = ["generate", "--checkpoint", str(saved_runs / "builtin"), "--prompt", "hello"]
    argv += [part for flag, value in flags for part in (flag, value)]
    code, _, err = run_main(capsys, *argv)
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("minitx: error: "), (argv, err)
