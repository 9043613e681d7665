"""Data-parallel training with JAX's own sharding, on one host or several.

A `jax.sharding.Mesh` with one axis, "data", spans the devices. The global batch
(B, T) is split along B across that axis; parameters and optimiser state are
replicated (or, with fsdp=True, each array is split along its first axis that the
device count divides, FSDP style). The train step stays one jitted function: the
sharding constraints below tell XLA's SPMD partitioner the layout, and it inserts
the gradient all-reduce (or the all-gathers and reduce-scatters of FSDP) itself.

`data_parallel(step, ...)` is the whole of it for training: the plain step
`(state, batch) -> (state, metrics)` jitted with these layouts for its inputs and
outputs. The step itself knows nothing of devices.

Several processes (hosts, or several processes on one host): call `initialize`
first in every process; `jax.devices()` then lists the devices of all processes,
and the same mesh spans them. Every process runs the same program on the same
global arrays; each device computes only its rows of every global batch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from minitx_fn.defaults import HEARTBEAT_TIMEOUT_MAX, HEARTBEAT_TIMEOUT_S, INT32_MAX, START_TIMEOUT_S
from minitx_fn import signals
from minitx_fn.errors import ConfigError

DATA_AXIS = "data"

# The environment variables that stand in for `join`'s arguments (a scheduler sets
# these per process), and the range of each. Read only once a coordinator is known,
# so a stray variable never makes a one-process run multi-process or breaks it.
ENVIRONMENT = {"coordinator": "MINITX_COORDINATOR", "num_processes": "MINITX_NUM_PROCESSES",
               "process_id": "MINITX_PROCESS_ID", "heartbeat_timeout": "MINITX_HEARTBEAT_TIMEOUT",
               "start_timeout": "MINITX_START_TIMEOUT"}
_RANGES = {"num_processes": (1, INT32_MAX), "process_id": (0, INT32_MAX), "heartbeat_timeout": (1, HEARTBEAT_TIMEOUT_MAX),
           "start_timeout": (1, HEARTBEAT_TIMEOUT_MAX)}
# How a message mentions the settings a multi-process run needs together (the CLI renders them as flags).
NEEDED = {"c": ("coordinator", "HOST:PORT"), "n": ("num_processes", "N"), "p": ("process_id", "I")}


class ProcessesError(ConfigError):
    """Multi-process settings that do not make a run: the message names the settings."""


def check_address(text: str) -> str:
    """HOST:PORT with a port in [1, 65535], else ProcessesError.

    Example:
        >>> check_address("10.0.0.1:1234")
        '10.0.0.1:1234'
        >>> check_address("10.0.0.1")
        Traceback (most recent call last):
        minitx_fn.distributed.ProcessesError: coordinator='10.0.0.1' is not HOST:PORT with a port in [1, 65535]
    """
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProcessesError("{coordinator} is not HOST:PORT with a port in [1, 65535]",
                             coordinator=("coordinator", text))
    return text


def _from_environment(name: str, environ) -> int | str | None:
    text = environ.get(ENVIRONMENT[name])
    if text is None:
        return None
    try:
        if name == "coordinator":
            return check_address(text)
        value, (low, high) = int(text), _RANGES[name]
        if not low <= value <= high:
            raise ValueError
        return value
    except (ValueError, ProcessesError):
        raise ProcessesError(f"environment variable {ENVIRONMENT[name]}: {text!r} is not "
                             + ("HOST:PORT with a port in [1, 65535]" if name == "coordinator" else
                                f"a whole number in {list(_RANGES[name])}")) from None


def join(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
         heartbeat_timeout: int | None = None, start_timeout: int | None = None, *, environ=None, log=None) -> bool:
    """Join a multi-process run (`initialize`) when these settings, or the environment
    variables standing in for those not given (`ENVIRONMENT`, read only once a
    coordinator is known), say so; True if it did. ProcessesError for a partial or
    inconsistent set.

    Example:
        >>> join(environ={})                          # no coordinator: one process
        False
        >>> join(heartbeat_timeout=5, environ={})
        Traceback (most recent call last):
        minitx_fn.distributed.ProcessesError: heartbeat_timeout=5 is for multi-process runs; give coordinator='HOST:PORT', num_processes='N' and process_id='I' too
    """
    environ = os.environ if environ is None else environ
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id,
             "heartbeat_timeout": heartbeat_timeout, "start_timeout": start_timeout}
    if given["coordinator"] is None:
        given["coordinator"] = _from_environment("coordinator", environ)
    else:
        check_address(given["coordinator"])
    if given["coordinator"] is not None:
        given = {name: value if value is not None else _from_environment(name, environ)
                 for name, value in given.items()}
    for name in ("heartbeat_timeout", "start_timeout"):
        if given[name] is not None and given["coordinator"] is None:
            raise ProcessesError("{setting} is for multi-process runs; give {c}, {n} and {p} too",
                                 setting=(name, given[name]), **NEEDED)
    needed = [given["coordinator"], given["num_processes"], given["process_id"]]
    if all(v is None for v in needed):
        return False
    if any(v is None for v in needed):
        raise ProcessesError("a multi-process run needs all of {c}, {n} and {p}", **NEEDED)
    if not 0 <= given["process_id"] < given["num_processes"]:
        raise ProcessesError("{p} must lie in [0, {n})", p=("process_id", given["process_id"]),
                             n=("num_processes", given["num_processes"]))
    initialize(given["coordinator"], given["num_processes"], given["process_id"],
               heartbeat_timeout=given["heartbeat_timeout"] or HEARTBEAT_TIMEOUT_S,
               start_timeout=given["start_timeout"] or START_TIMEOUT_S, log=log)
    return True


def initialize(coordinator: str, num_processes: int, process_id: int, *,
               heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S, start_timeout: int = START_TIMEOUT_S, log=None) -> None:
    """Join a multi-process run (`jax.distributed.initialize`). On CPUs the
    collectives go through gloo, which needs no extra setup.

    start_timeout (seconds): how long to wait for every process to join. Process 0
    says once that it is waiting (on log), and first checks that the coordinator's
    port is free (ProcessesError otherwise). A run whose processes have not all joined
    by then ends, in every process that waits, with one line on stderr and exit status
    1 (JAX's own time-out would abort with a C++ stack trace).

    heartbeat_timeout (seconds): when a process dies (kill -9, a lost machine), the
    others are stopped by JAX's runtime within about this long. That stop is a
    fatal abort inside JAX (a C++ check failure, exit status 134); Python cannot
    catch it, which is why every file a run writes is written whole or not at all.
    Heartbeats come from a background thread, so a long step does not need a long
    timeout. The shutdown barrier at exit waits at most as long.

    Preemption: JAX's coordination service takes SIGTERM in every process (see
    `reached_preemption_sync_point`), so all processes agree on one step to save.

    Example (in each of two processes, with process_id 0 and 1):
        initialize("10.0.0.1:1234", num_processes=2, process_id=0)
    """
    signals.check()                       # one that came before the wait: act on it now
    if process_id == 0:
        _check_port_free(coordinator)
        print(f"Waiting for {num_processes} processes at {coordinator} (up to {start_timeout} s)", file=log or sys.stdout,
              flush=True)

    # The main thread waits inside JAX's C++ start, where Python runs no signal handler and
    # JAX's own time-out aborts: a watchdog thread ends the wait, on the time-out or on a
    # stop signal (the C-level handler writes its number to the wakeup socket).
    wake_read, wake_write = socket.socketpair()
    wake_read.setblocking(False)
    wake_write.setblocking(False)
    done = threading.Event()
    started = time.monotonic()

    def watch():
        while not done.is_set():
            left = start_timeout - (time.monotonic() - started)
            if left <= 0:
                _leave(1, f"minitx: error: gave up after {start_timeout} s: not all {num_processes} processes joined "
                          f"the run at {coordinator}; start the missing ones, or give them longer (start_timeout, "
                          f"or {ENVIRONMENT['start_timeout']})")
            ready, _, _ = select.select([wake_read], [], [], min(left, 1.0))
            stops = [b for b in (wake_read.recv(64) if ready else b"") if b in signals.STOP_SIGNALS]
            if stops and not done.is_set():
                _leave(128 + stops[0], f"minitx: interrupted by {signal.Signals(stops[0]).name} while waiting for "
                                       f"the other processes; nothing was written")

    main_thread = threading.current_thread() is threading.main_thread()      # only it may set the wakeup socket
    previous = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False) if main_thread else None
    watchdog = threading.Thread(target=watch, daemon=True, name="minitx-start-watchdog")
    # Only the CPU client reads this setting; GPU runs use NCCL whatever it says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout,
                                   shutdown_timeout_seconds=heartbeat_timeout,
                                   initialization_timeout=start_timeout + 60)     # ours fires first
    finally:
        done.set()
        if main_thread:
            signal.set_wakeup_fd(previous)
        wake_write.close()
        watchdog.join()
        wake_read.close()


def _leave(status: int, line: str) -> None:
    """One line on stderr, then the process ends at once (the main thread is in C++)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(status)


def _check_port_free(coordinator: str) -> None:
    """ProcessesError if the coordinator's port is already taken on this machine (JAX's
    service would crash on it with a segmentation fault)."""
    host, _, port = coordinator.rpartition(":")
    with contextlib.closing(socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET)) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # a port in TIME-WAIT is free to listen on
        try:
            probe.bind(("", int(port)))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ProcessesError(f"{{coordinator}}: port {port} is already in use on this machine; choose a free "
                                     f"one", coordinator=("coordinator", coordinator)) from None


def agree(settings: dict) -> None:
    """Every process of a multi-process run holds the same settings (any JSON values,
    by name), checked with one small collective before any step: ProcessesError in
    every process, naming the settings that differ. A no-op in one process.

    Example:
        >>> agree({"seed": 0})                   # one process: nothing to compare
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils
    names = sorted(settings)
    digests = np.array([np.frombuffer(hashlib.sha256(json.dumps(settings[n], sort_keys=True, default=str).encode())
                                      .digest()[:8], np.uint8) for n in names])                  # (F, 8)
    every = np.asarray(multihost_utils.process_allgather(digests))                               # (P, F, 8)
    differ = [n for i, n in enumerate(names) if not (every[:, i] == every[0, i]).all()]
    if differ:
        raise ProcessesError(f"the {jax.process_count()} processes disagree on {', '.join(differ)}; start every "
                             f"process with the same settings and data (only the process id differs)")


def reached_preemption_sync_point(step: int) -> bool:
    """True, in every process at the same step, once any process of a multi-process run
    was sent SIGTERM: the step at which all of them save and leave. Call it at every
    step, from the same starting step in every process. Always False in one process.

    Example:
        >>> reached_preemption_sync_point(3)         # no multi-process run here
        False
    """
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(step)


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first n_devices devices (all by default), axis "data".

    Example:
        >>> make_mesh(1).axis_names
        ('data',)
    """
    devices = jax.devices()
    n = len(devices) if n_devices is None else n_devices
    if not 1 <= n <= len(devices):
        raise ConfigError(f"{{devices}} is not available: this run has {len(devices)} device(s)", devices=("devices", n))
    return Mesh(np.array(devices[:n]), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(B, T) arrays split along B."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def _fsdp_spec(shape: tuple[int, ...], n: int) -> PartitionSpec:
    """Split the first axis that n divides; replicate arrays no axis of which it divides."""
    for axis, size in enumerate(shape):
        if size % n == 0 and size >= n:
            return PartitionSpec(*([None] * axis), DATA_AXIS)
    return PartitionSpec()


def state_shardings(tree, mesh: Mesh, fsdp: bool):
    """A sharding per leaf of a parameter or state tree: replicated, or FSDP-split."""
    n = mesh.devices.size
    return jax.tree.map(lambda a: NamedSharding(mesh, _fsdp_spec(a.shape, n) if fsdp else PartitionSpec()), tree)


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """ConfigError unless the batch splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise ConfigError(f"{{batch}} must be divisible by the {n} devices it is split over; try {{suggestion}} or "
                          f"fewer devices", batch=("batch_size", batch_size),
                          suggestion=("batch_size", n * max(1, round(batch_size / n))))


def sharded_batch_at(mesh: Mesh) -> Callable:
    """`train.batch_at`, jitted to return the batch already split along B over the mesh:
    each device (each process) computes only its own rows."""
    from minitx_fn import train
    return jax.jit(train.batch_at.__wrapped__, static_argnames=("batch_size", "context"),
                   out_shardings=batch_sharding(mesh))


def data_parallel(step: Callable, mesh: Mesh, state_shardings, frozen_shardings=None) -> Callable:
    """The plain step (state, batch) -> (state, metrics), jitted for the mesh: the batch
    (x, y) split along B, the state laid out by state_shardings (replicated or FSDP)
    in and out, the old state donated. XLA inserts the gradient all-reduce. With
    `frozen_shardings`, the step is (state, batch, frozen) -> ..., the frozen tree (a
    LoRA run's base) laid out by them and neither donated nor returned.
    """
    batch = batch_sharding(mesh)
    ins = (state_shardings, (batch, batch)) + (() if frozen_shardings is None else (frozen_shardings,))
    return jax.jit(step, in_shardings=ins, out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def put_global(tree, shardings):
    """Host arrays (the same full value in every process) -> global arrays with these shardings."""
    def put(x, sharding):
        x = np.asarray(x)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        index = sharding.addressable_devices_indices_map(x.shape)
        return jax.make_array_from_single_device_arrays(
            x.shape, sharding, [jax.device_put(x[i], d) for d, i in index.items()])
    return jax.tree.map(put, tree, shardings)


def to_host(tree):
    """Global arrays -> full numpy arrays, in every process (a collective when arrays
    span processes: every process must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def scalar(x) -> float:
    """A replicated scalar as a Python float, without a collective."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return float(np.asarray(x))
