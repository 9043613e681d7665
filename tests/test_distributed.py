"""Data-parallel training: 4 CPU devices in one process, and 2 processes with 2
devices each, equal to one device on the same global batch; multi-process runs that
are preempted (SIGTERM) or lose a process (kill -9); and the multi-process settings
(`join`), checked before any process waits for another.

Each run of several devices or processes is a subprocess of its own, because the
device count is fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import socket
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from minitx_fn import distributed
from minitx_fn.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--width", "32", "--layers", "2", "--heads", "2", "--context", "16"]
OPTIMISER = ["--batch-size", "8", "--warmup", "0", "--lr", "1e-3"]
TINY = [*MODEL, *OPTIMISER, "--log-every", "1", "--save-every", "3", "--decay-steps", "100"]


def _env(devices: int) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=ROOT)
    env.pop("JAX_PLATFORMS", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
def test_four_devices_equal_one_device_after_three_steps():
    """Data parallel equals one device: AdamW replicated, with FSDP and with gradient
    accumulation; LoRA replicated and with FSDP; Muon replicated and with FSDP."""
    script = textwrap.dedent("""
        import functools
        import jax, jax.numpy as jnp, numpy as np
        from minitx_fn import data, distributed, model, train
        from minitx_fn.config import LoraConfig, ModelConfig, TrainConfig
        assert jax.device_count() == 4
        mc = ModelConfig(vocab_size=13, d_model=32, n_heads=2, n_layers=2, max_len=16)
        tc = TrainConfig(steps=3, batch_size=8, optimizer={"warmup": 0, "lr": 1e-3})
        ids = jnp.asarray(np.arange(300, dtype=np.int32) % 13)
        init_key, data_key, _ = train.keys(0)

        base = model.init(jax.random.key(7), mc)           # a LoRA run's frozen base
        adapters = LoraConfig(rank=2, targets="all")

        def run(mesh, fsdp, accumulate=1, lora=None, oc=tc.optimizer):
            if lora is None:
                state, args = train.init_state(init_key, mc, oc), ()
            else:
                state, args = train.lora_state(init_key, mc, base, oc, lora), (base,)
            d, sample = ids, train.batch_at
            step = functools.partial(train.train_step, model=mc, optimizer_config=oc, lora=lora)
            if mesh is not None:
                shardings = distributed.state_shardings(state, mesh, fsdp)
                state = distributed.put_global(jax.device_get(state), shardings)
                d = distributed.put_global(np.asarray(ids), distributed.replicated(mesh))
                frozen = None if lora is None else distributed.state_shardings(base, mesh, fsdp)
                args = () if lora is None else (distributed.put_global(base, frozen),)
                step = distributed.data_parallel(train.step_fn(mc, oc, accumulate=accumulate, lora=lora),
                                                 mesh, shardings, frozen)
                sample = distributed.sharded_batch_at(mesh)
            for _ in range(3):
                state, _ = step(state, sample(d, data_key, state.step, batch_size=8, context=16), *args)
            if mesh is not None:
                shards = {len(a.sharding.device_set) for a in jax.tree.leaves(state.params)}
                assert shards == {4}, shards
            return jax.device_get(state.params)

        # LoRA: the adapters trained on 4 devices (the base split too with FSDP) equal one device's
        lora_one = run(None, False, lora=adapters)
        for fsdp in (False, True):
            four = run(distributed.make_mesh(4), fsdp, lora=adapters)
            err = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(lora_one), jax.tree.leaves(four)))
            scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(lora_one))
            print("lora fsdp" if fsdp else "lora replicated", err, scale)
            assert 0 < scale and err <= 1e-6 * scale, (err, scale)

        one = run(None, False)
        # Measured on the scale of the parameters (max |p| is about 2): the all-reduce sums
        # gradients in another order, and Adam's first steps, g / (|g| + eps), magnify the
        # last-bit differences of near-zero gradient entries.
        scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(one))
        mesh = distributed.make_mesh(4)
        for fsdp, accumulate in ((False, 1), (True, 1), (False, 2)):    # gradient accumulation: the same update
            four = run(mesh, fsdp, accumulate)
            err = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)))
            print("fsdp" if fsdp else "replicated", "accumulate", accumulate, err, scale)
            assert err <= 1e-6 * scale, (err, scale)

        # Muon: each matrix orthogonalised from the all-reduced gradient (its layers split with FSDP)
        muon = tc.optimizer.replace(method="muon")
        one = run(None, False, oc=muon)
        for fsdp in (False, True):
            four = run(mesh, fsdp, oc=muon)
            err = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)))
            print("muon fsdp" if fsdp else "muon replicated", err, scale)
            assert err <= 1e-5 * scale, (err, scale)
    """)
    done = subprocess.run([sys.executable, "-c", script], env=_env(4), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for case in ("replicated accumulate 1", "fsdp accumulate 1", "accumulate 2", "lora replicated", "lora fsdp",
                 "muon replicated", "muon fsdp"):
        assert case in done.stdout, done.stdout


def _train(tmp_path, *args, devices=1, process_id=None, port=None, nproc=2):
    argv = [sys.executable, "-m", "minitx_fn", "train", *args]
    if process_id is not None:
        argv += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(nproc), "--process-id", str(process_id)]
    return subprocess.Popen(argv, env=_env(devices), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(procs, timeout=240):
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def _losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(path))]


@pytest.mark.parametrize("settings, said", [
    ({"coordinator": "127.0.0.1:1"}, "needs all of coordinator=.*num_processes=.*process_id="),
    ({"coordinator": "127.0.0.1:1", "num_processes": 2, "process_id": 2}, r"process_id=2 must lie in \[0, "),
    ({"heartbeat_timeout": 5}, "heartbeat_timeout=5 is for multi-process runs"),
    ({"start_timeout": 5}, "start_timeout=5 is for multi-process runs"),
    ({"coordinator": "garbage", "num_processes": 2, "process_id": 0}, "coordinator='garbage' is not HOST:PORT"),
    ({"coordinator": "127.0.0.1:99999"}, r"a port in \[1, 65535\]"),
])
def test_a_partial_or_inconsistent_set_of_multi_process_settings_is_refused(settings, said):
    with pytest.raises(distributed.ProcessesError, match=said):
        distributed.join(**settings, environ={})


def test_the_environment_is_read_only_by_a_multi_process_run(monkeypatch):
    """Variables exported for a cluster (MINITX_HEARTBEAT_TIMEOUT, a malformed
    MINITX_NUM_PROCESSES) neither make a one-process run multi-process nor break it;
    once a coordinator is known, one it would use that is malformed is named."""
    monkeypatch.setenv("MINITX_HEARTBEAT_TIMEOUT", "60")
    monkeypatch.setenv("MINITX_NUM_PROCESSES", "abc")
    assert distributed.join() is False
    monkeypatch.setenv("MINITX_COORDINATOR", "127.0.0.1:1")
    with pytest.raises(distributed.ProcessesError, match="MINITX_NUM_PROCESSES: 'abc' is not"):
        distributed.join()


def test_devices_that_are_not_there_are_named():
    n = len(__import__("jax").devices())
    with pytest.raises(ConfigError, match=f"devices={n + 1} is not available: this run has {n} device"):
        distributed.make_mesh(n + 1)


def test_devices_must_divide_the_batch(tmp_path):
    done = subprocess.run([sys.executable, "-m", "minitx_fn", "train", *MODEL, "--batch-size", "6", "--devices", "4",
                           "--steps", "2"], env=_env(4), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "must be divisible by the 4 devices" in done.stderr


RUN_LONG = [*MODEL, *OPTIMISER, "--log-every", "1", "--save-every", "1000", "--decay-steps", "1000"]
PREEMPTIBLE = [*RUN_LONG, "--steps", "100000", "--heartbeat-timeout", "5"]


def _start_pair(tmp_path, out: str):
    """Two processes with two devices each; returns them once process 0 has reported
    step 3, with the lines it printed until then."""
    port = _free_port()
    procs = [_train(tmp_path, *PREEMPTIBLE, "--out", out, devices=2, process_id=i, port=port) for i in range(2)]
    deadline = time.monotonic() + 180
    seen = []
    for line in procs[0].stdout:                          # process 0 reports; wait until it has trained a few steps
        seen.append(line)
        if line.startswith("Step 3,") or time.monotonic() > deadline:
            break
    return procs, "".join(seen)


def _wait(procs, timeout):
    try:
        return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            p.kill()


@pytest.mark.heavy
def test_two_processes_equal_one_and_sigterm_to_one_preempts_both_at_one_step(tmp_path):
    """Two processes with two devices each train on one global batch; SIGTERM to
    process 1 alone: JAX's preemption service makes both save one checkpoint at the
    same step and exit 143. The losses before it equal a one-process run's, and the
    checkpoint resumed in one process logs what the uninterrupted run logs after it."""
    procs, printed = _start_pair(tmp_path, "pre")
    assert "Data-parallel over 4 devices in 2 process(es)" in printed
    procs[1].send_signal(signal.SIGTERM)
    results = _wait(procs, timeout=120)
    assert [code for code, _ in results] == [143, 143], [err[-2000:] for _, err in results]
    assert all("Traceback" not in err for _, err in results)
    assert "Step" not in procs[1].stdout.read()           # only process 0 reports
    step = json.load(open(tmp_path / "pre/checkpoint/meta.json"))["step"]
    assert step >= 3
    _finish([_train(tmp_path, *RUN_LONG, "--steps", str(step + 3), "--out", "ref")])
    out, _ = _finish([_train(tmp_path, "--resume", "pre", "--steps", str(step + 3))])[0]
    assert f"Resuming pre from step {step}" in out
    both, one = _losses(tmp_path / "pre/metrics.jsonl"), _losses(tmp_path / "ref/metrics.jsonl")
    assert [s for s, _ in both] == [s for s, _ in one] == list(range(1, step + 4))
    np.testing.assert_allclose([l for _, l in both], [l for _, l in one], rtol=1e-5)


@pytest.mark.heavy
def test_a_dead_process_stops_the_other_in_bounded_time_and_the_run_resumes(tmp_path):
    """kill -9 of process 1: process 0 stops on its own (within the heartbeat timeout, 5 s
    here; a survivor still running when _wait's limit ends fails the test), with its
    last checkpoint whole; one process resumes it."""
    argv = [a if a != "1000" else "2" for a in PREEMPTIBLE]                  # save every 2 steps
    port = _free_port()
    procs = [_train(tmp_path, *argv, "--out", "dead", devices=2, process_id=i, port=port) for i in range(2)]
    for line in procs[0].stdout:
        if line.startswith("Step 4,"):
            break
    procs[1].kill()
    code, err = _wait(procs[:1], timeout=120)[0]           # subprocess.TimeoutExpired if it never stops
    assert code != 0
    step = json.load(open(tmp_path / "dead/checkpoint/meta.json"))["step"]
    out, _ = _finish([_train(tmp_path, "--resume", "dead", "--steps", str(step + 2))])[0]   # loads: checksums hold
    assert f"Resuming dead from step {step}" in out


@pytest.mark.heavy
def test_processes_that_disagree_a_peer_that_never_comes_and_a_taken_port_are_one_line_each(tmp_path):
    """Two processes with different seeds (once silently wrong) or widths (once a C++
    abort in gloo): both refuse before any step, naming what differs, exit 2. A peer
    that never starts: process 0 says it waits, then gives up after --start-timeout with
    one line (JAX's own time-out aborts). The coordinator's port already taken (once a
    segmentation fault): one line, exit 2."""
    short = [*MODEL, *OPTIMISER, "--steps", "3", "--start-timeout", "60"]
    port = _free_port()
    pair = [_train(tmp_path, *short, "--seed", str(i), "--width", str(32 + 16 * i), "--out", "split",
                   process_id=i, port=port) for i in range(2)]
    alone_port = _free_port()
    alone = _train(tmp_path, *MODEL, "--start-timeout", "3", "--out", "alone", process_id=0, port=alone_port)
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        busy = _train(tmp_path, *MODEL, "--out", "busy", process_id=0, port=taken.getsockname()[1])
        results = _wait([*pair, alone, busy], timeout=180)
    for code, err in results[:2]:
        assert code == 2, err[-2000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("minitx: error: the 2 processes disagree on model.d_ff, model.d_model, training.seed; "), line    # by name
    code, err = results[2]
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(
        f"minitx: error: gave up after 3 s: not all 2 processes joined the run at 127.0.0.1:{alone_port}"
        "; start the missing ones, or give them longer (") and "start" in lines[0].split("longer")[1], err[-2000:]
    assert "Waiting for 2 processes at 127.0.0.1:" in alone.stdout.read()
    code, err = results[3]
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is already in use" in err, err[-2000:]
    # A port whose last run left it in TIME-WAIT (no listener) is free to use again.
    again = _train(tmp_path, *MODEL, "--start-timeout", "2", "--out", "again", process_id=0, port=alone_port)
    code, err = _wait([again], timeout=120)[0]
    assert code == 1 and "gave up after 2 s" in err, err[-2000:]
    assert not os.path.exists(tmp_path / "split") and not os.path.exists(tmp_path / "alone")


def test_a_signal_while_waiting_for_the_other_processes_is_one_line_at_once(tmp_path):
    """The wait is inside JAX's C++ start, where Python runs no handler: a watchdog sees the
    signal through the wakeup socket and ends the process with one line, 128 + N (it
    waited out the whole start time-out, then said it had given up)."""
    proc = _train(tmp_path, *MODEL, "--start-timeout", "100", "--out", "w", process_id=1, port=_free_port())
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    code, err = _wait([proc], timeout=60)[0]
    assert code == 143 and err.strip().splitlines()[-1].startswith("minitx: interrupted by SIGTERM"), err[-2000:]
    assert not os.path.exists(tmp_path / "w")
