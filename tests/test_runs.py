"""Run directories: what counts as a run, the lock, the metrics log and its torn lines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import runs
from minitx_fn.errors import RunDirError


@pytest.mark.parametrize("name", ["checkpoint", "checkpoint.old", ".checkpoint.tmp-abc", "metrics.jsonl", "loss.png"])
def test_a_new_run_refuses_any_trace_of_another_run(tmp_path, name):
    (tmp_path / name).mkdir() if "checkpoint" in name else (tmp_path / name).write_text("x")
    with pytest.raises(RunDirError, match=f"already holds a run.*{name}"):
        runs.check_new_run_dir(str(tmp_path))


def test_a_new_run_refuses_a_file_and_a_path_through_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        runs.check_new_run_dir(str(tmp_path / "f"))
    with pytest.raises(RunDirError, match="is a file"):
        runs.check_new_run_dir(str(tmp_path / "f" / "run"))


def test_a_new_run_refuses_an_unwritable_parent(tmp_path, monkeypatch):
    """As root, chmod cannot make a directory unwritable, so os.access is simulated."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(RunDirError, match="is not writable"):
        runs.check_new_run_dir(str(tmp_path / "run"))


def test_an_empty_directory_and_a_stale_lock_alone_are_fine(tmp_path):
    runs.check_new_run_dir(str(tmp_path))
    (tmp_path / runs.LOCK).write_text("999999999 " + socket.gethostname())
    runs.check_new_run_dir(str(tmp_path))


def test_the_lock_refuses_a_live_process_and_takes_over_a_dead_one(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / runs.LOCK).write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        with pytest.raises(RunDirError, match=f"in use by another process \\(PID {sleeper.pid}\\)"):
            runs.Lock(str(tmp_path)).__enter__()
    finally:
        sleeper.kill()
        sleeper.wait()
    with runs.Lock(str(tmp_path)) as lock:                     # its process is gone now
        assert lock.took_over == sleeper.pid
        assert (tmp_path / runs.LOCK).read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / runs.LOCK).exists()


def test_a_lock_of_another_host_or_garbage_is_refused(tmp_path):
    (tmp_path / runs.LOCK).write_text("1 some-other-host\n")
    with pytest.raises(RunDirError, match="on some-other-host"):
        runs.Lock(str(tmp_path)).__enter__()
    for garbage in ("not a lock", f"{10**20} {socket.gethostname()}"):          # a PID no process can have
        (tmp_path / runs.LOCK).write_text(garbage)
        with pytest.raises(RunDirError, match="exists but is unreadable; if no process"):
            runs.Lock(str(tmp_path)).__enter__()


def test_records_survive_a_torn_last_line_and_refuse_a_damaged_middle(tmp_path):
    path = str(tmp_path / runs.METRICS)
    for step in (1, 2, 3):
        runs.append_record(path, {"step": step, "loss": 1.0 / step})
    whole = open(path, "rb").read()
    for cut in range(len(whole) - 1, len(whole) - 20, -1):       # every cut inside the last line
        open(path, "wb").write(whole[:cut])
        records = runs.read_records(path)
        assert [r["step"] for r in records.records] in ([1, 2], [1, 2, 3])
        assert records.torn == (records.records[-1]["step"] == 2 and not whole[:cut].endswith(b"\n"))
    lines = whole.split(b"\n")
    open(path, "wb").write(b"\n".join([lines[0], b"{garbage", lines[2], b""]))
    with pytest.raises(RunDirError, match="line 2 is not a metrics record"):
        runs.read_records(path)


@given(records=st.lists(st.fixed_dictionaries({"step": st.integers(0, 10**6), "loss": st.floats(0, 10)}),
                        max_size=5), last=st.integers(0, 10**6))
def test_truncate_keeps_exactly_the_records_up_to_a_step(tmp_path_factory, records, last):
    path = str(tmp_path_factory.mktemp("m") / runs.METRICS)
    open(path, "w").close()
    for r in records:
        runs.append_record(path, r)
    runs.truncate_records(path, last)
    assert runs.read_records(path).records == [json.loads(json.dumps(r)) for r in records if r["step"] <= last]


def test_leftover_temporaries_are_removed(tmp_path):
    (tmp_path / (runs.TEMPORARY_PREFIX + "a")).mkdir()
    (tmp_path / (runs.TEMPORARY_PREFIX + "b")).mkdir()
    (tmp_path / "checkpoint").mkdir()
    assert runs.remove_temporaries(str(tmp_path)) == [runs.TEMPORARY_PREFIX + "a", runs.TEMPORARY_PREFIX + "b"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_new_run_names_count_up(tmp_path):
    first = runs.new_run_name(str(tmp_path), "x")
    os.mkdir(first)
    assert os.path.basename(runs.new_run_name(str(tmp_path), "x")) == "x-002"


def test_a_pipe_or_a_device_in_place_of_a_runs_file_is_refused_not_waited_on(tmp_path):
    """A FIFO blocks whoever opens it until a writer comes (no signal ends the wait) and
    /dev/zero never ends: as a run's metrics log, lock or checkpoint file each is one
    error, at once (an alarm turns a hang into a failure)."""
    import signal

    from minitx_fn import checkpoint
    from minitx_fn.errors import CheckpointError, RunDirError

    def hung(signum, frame):
        raise TimeoutError("a run's file that is no regular file was waited on")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        for path in (fifo, "/dev/zero"):
            with pytest.raises(RunDirError, match="is not a regular file"):
                runs.read_records(str(path))
            with pytest.raises(RunDirError, match="is not a regular file"):
                runs.append_record(str(path), {"step": 1})
        run = tmp_path / "run"
        run.mkdir()
        os.mkfifo(run / runs.LOCK)
        assert runs.Lock(str(run)).live_holder() is None                 # unreadable, not waited on
        (run / runs.CHECKPOINT).mkdir()
        os.mkfifo(run / runs.CHECKPOINT / "meta.json")
        with pytest.raises(CheckpointError, match="meta.json' is not a regular file"):
            checkpoint.load_model(str(run))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_runs_own_files_and_folders_are_its_own_by_any_route(tmp_path):
    """What a run writes or replaces (its checkpoints, a save's temporary folder, its
    metrics and lock) belongs to it, through links too; nothing else does (its picture
    may be drawn again), and a folder without a checkpoint is no run."""
    run = tmp_path / "run"
    (run / runs.CHECKPOINT).mkdir(parents=True)
    os.symlink(run, tmp_path / "link")
    owner = os.path.realpath(run)
    for name in (runs.CHECKPOINT, runs.CHECKPOINT + ".old", runs.METRICS, runs.LOCK, runs.TEMPORARY_PREFIX + "x"):
        for where in (run / name, run / name / "inside", tmp_path / "link" / name):
            assert runs.managing_run(str(where)) == owner, where
    for where in (run, run / "notes.txt", run / runs.LOSS_PNG, tmp_path / "other" / runs.LOCK):
        assert runs.managing_run(str(where)) is None, where
