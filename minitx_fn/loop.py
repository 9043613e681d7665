"""The training loop around the jitted step: batches in, losses checked and logged,
validation, checkpoints, and signals that stop a run cleanly.

    while step < steps:
        state, metrics = train_step(state, next_batch(step))            asynchronous
        every few steps: fetch the losses, stop on NaN, log, evaluate, save
        on SIGINT, SIGTERM or SIGHUP: save at this step, and leave

The loop asks nothing of the step but (state, batch) -> (state, metrics), so one
device, several devices (`distributed.data_parallel`) and any batch source run
through the same code.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from minitx_fn import distributed, runs, train
from minitx_fn.config import ModelConfig, TrainConfig  # noqa: F401  (the doctests)
from minitx_fn.errors import StorageError
from minitx_fn.signals import StopSignals, active


class NonFiniteError(RuntimeError):
    """The loss, or the parameters after an update, stopped being finite."""

    def __init__(self, step: int, what: str):
        super().__init__(f"the {what} became non-finite at step {step}")
        self.step, self.what = step, what


class FitResult(NamedTuple):
    state: train.TrainState
    stopped_by: int | None      # the signal that stopped the run (it saved first), or None
    last_record: dict | None    # the last record logged


def fit(state: train.TrainState, *, step: Callable, next_batch: Callable, steps: int, log_every: int = 100,
        eval_every: int | None = None, save_every: int | None = None, tokens_per_step: int | None = None,
        evaluate: Callable | None = None, metrics_path: str | None = None,
        save: Callable[[train.TrainState], None] | None = None, out=None, signals: StopSignals | None = None,
        max_in_flight: int | None = None) -> FitResult:
    """Run step(state, next_batch(t)) for t = state.step .. steps - 1 (t a Python int,
    so a host-side batch source needs no device sync to know it). step is any
    (state, batch) -> (state, metrics) with a "loss" metric (`train.train_step`,
    `jax.jit(train.make_step(...))`); a TrainConfig's fields give the cadence.

    Losses stay on the device until a check point, where they are fetched together
    (one host sync per interval, not per step): a NaN or infinite loss raises
    NonFiniteError naming the first bad step. Every log_every steps a record
    {step, loss (mean since the last record), lr (the step's own "lr" metric, when it
    reports one), tokens_per_s (with tokens_per_step)} is printed and appended to
    metrics_path; every eval_every steps (default: log_every) `evaluate(params)` adds
    val_loss to that step's record (so every evaluation is logged). Every save_every
    steps (default: none), at the end, and when a stop signal arrives (SIGINT, SIGTERM
    or SIGHUP, through `signals`: by default the StopSignals block the caller is in,
    else one of this call's own; in a multi-process run, the step every process agrees
    on after a SIGTERM to any of them, `distributed.reached_preemption_sync_point`),
    the state is checked finite
    (NonFiniteError "parameters" otherwise: nothing non-finite reaches disk) and
    `save(state)` runs as a critical section. A failed write of the metrics log
    raises StorageError (an OSError); `save` should raise it too. On a terminal a progress line is
    refreshed. max_in_flight bounds the steps queued on the device (None: no bound; `job.run`
    gives 2 on several CPU devices, where a deep queue of multi-device steps can deadlock).

    Example:
        >>> import io, jax.numpy as jnp
        >>> from functools import partial
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> tc = TrainConfig(steps=20, batch_size=4, log_every=10, optimizer={"lr": 1e-2, "warmup": 0})
        >>> init_key, data_key, _ = train.keys(0)
        >>> out = io.StringIO()
        >>> result = fit(train.init_state(init_key, cfg, tc.optimizer), step=partial(train.train_step,
        ...              model=cfg, optimizer_config=tc.optimizer), next_batch=lambda s: train.batch_at(
        ...              jnp.arange(40) % 5, data_key, s, batch_size=4, context=4), steps=tc.steps,
        ...              log_every=tc.log_every, out=out)
        >>> [line.split(',')[0] for line in out.getvalue().splitlines()]
        ['Step 10', 'Step 20']
        >>> int(result.state.step), result.stopped_by
        (20, None)
    """
    out = out or sys.stdout
    with contextlib.ExitStack() as stack:
        if signals is None:               # nobody installed handlers (a loop of one's own): this call does
            signals = active() or stack.enter_context(StopSignals())
        return _fit(state, step, next_batch, steps, log_every, eval_every, save_every, tokens_per_step, evaluate,
                    metrics_path, save, out, signals, max_in_flight)


def _fit(state, step, next_batch, steps, log_every, eval_every, save_every, tokens_per_step, evaluate, metrics_path,
         save, out, signals, max_in_flight) -> FitResult:
    eval_every = eval_every or log_every
    save_every = save_every or steps
    at = int(distributed.scalar(state.step))
    tty = hasattr(out, "isatty") and out.isatty()
    check_every = min(10, log_every) if tty else log_every
    pending: list[tuple[int, jax.Array, jax.Array | None]] = []   # (step, loss, grad_norm) not yet fetched
    losses_since_record: list[float] = []
    lr = None                                           # the latest step's own "lr" metric, if it reports one
    window_start, window_step = time.perf_counter(), at
    record = None

    def checked_save(state):
        if not bool(distributed.scalar(train.is_finite((state.params, state.opt_state)))):
            raise NonFiniteError(at, "parameters")
        with signals.critical():
            save(state)

    with signals.graceful():
        while at < steps:
            state, metrics = step(state, next_batch(at))
            at += 1
            pending.append((at, metrics["loss"], metrics.get("grad_norm")))
            lr = metrics.get("lr")
            if max_in_flight is not None and len(pending) > max_in_flight:
                pending[-max_in_flight - 1][1].block_until_ready()
            # Read once: a signal that lands after this line is seen at the next step, so
            # the loop never leaves without the save this decides.
            if distributed.reached_preemption_sync_point(at):
                signals.requested = signal.SIGTERM       # every process, at this same step
            signalled = signals.requested is not None
            due = {"log": at % log_every == 0, "eval": evaluate is not None and at % eval_every == 0,
                   "save": save is not None and at % save_every == 0}
            if signalled or at == steps:
                due = {"log": True, "eval": evaluate is not None and at == steps, "save": save is not None}
            if not (any(due.values()) or at % check_every == 0):
                continue
            losses = np.array([distributed.scalar(loss) for _, loss, _ in pending], np.float64)
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                raise NonFiniteError(pending[bad[0]][0], "loss")
            # An overflowing gradient norm makes clipping scale every gradient by 0: the
            # step would quietly change nothing (a finite loss, finite parameters).
            bad = [at_step for at_step, _, norm in pending
                   if norm is not None and not math.isfinite(distributed.scalar(norm))]
            if bad:
                raise NonFiniteError(bad[0], "gradient norm")
            losses_since_record += losses.tolist()
            pending.clear()
            now = time.perf_counter()
            tokens_per_s = (None if tokens_per_step is None
                            else (at - window_step) * tokens_per_step / max(now - window_start, 1e-9))
            if tty:
                _progress(out, at, steps, float(losses[-1]), tokens_per_s)
            if due["log"] or due["eval"]:
                record = {"step": at, "loss": float(np.mean(losses_since_record))}
                if lr is not None:
                    record["lr"] = distributed.scalar(lr)
                if tokens_per_s is not None:
                    record["tokens_per_s"] = round(tokens_per_s, 1)
                losses_since_record = []
                if due["eval"]:
                    record["val_loss"] = float(evaluate(state.params))
                line = f"Step {at}, Loss: {record['loss']:.4f}"
                if "val_loss" in record:
                    line += f", Val loss: {record['val_loss']:.4f}"
                print(("\r\033[K" if tty else "") + line, file=out, flush=True)
                if metrics_path:
                    with signals.critical():
                        try:
                            runs.append_record(metrics_path, record)
                        except OSError as e:
                            raise StorageError(metrics_path, e) from None
            if due["save"]:
                checked_save(state)
            if signalled:
                break
            window_start, window_step = time.perf_counter(), at
    return FitResult(state, signals.requested, record)


def _progress(out, step: int, steps: int, loss: float, tokens_per_s: float | None) -> None:
    width = 30
    filled = int(width * step / steps)
    bar = "#" * filled + "-" * (width - filled)
    speed = "" if tokens_per_s is None else f" {tokens_per_s:,.0f} tok/s"
    out.write(f"\r\033[K[{bar}] {step}/{steps} loss {loss:.4f}{speed}")
    out.flush()
