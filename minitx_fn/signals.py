"""Signals that stop a run: SIGINT (Ctrl-C), SIGTERM (what schedulers and `docker stop`
send before they kill) and SIGHUP (a closed terminal) all mean "save and leave".

No JAX here: the command line catches `Interrupted` before it imports JAX.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal arrived where the run cannot stop cleanly (a second signal while
    a step runs, or one before training starts). A BaseException, like KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP as requests to stop, for the `with` block.

    Inside `graceful()`, the first signal only sets `requested` (its number), and the
    loop saves and leaves at the next step boundary; a second one raises
    `Interrupted` at once, except inside `critical()` (a checkpoint being written),
    where it waits until the write is done. Outside `graceful()`, a signal raises
    `Interrupted` at once. The previous handlers come back at the end.
    """

    def __init__(self, *, forward_to_sigterm: bool = False):
        """forward_to_sigterm: a multi-process run, whose SIGTERM belongs to JAX's
        coordination service (it makes every process stop at one agreed step). Then
        SIGTERM is left alone, and SIGINT or SIGHUP are passed on to it as SIGTERM."""
        self.requested: int | None = None
        self._forward = forward_to_sigterm
        self._graceful = False
        self._critical = 0
        self._pending: int | None = None

    def _handle(self, signum, frame):
        if self._forward and self._graceful:
            os.kill(os.getpid(), signal.SIGTERM)          # to JAX's handler: every process will stop
        elif self._graceful and self.requested is None:
            self.requested = signum
        elif self._critical:
            self._pending = signum
        else:
            raise Interrupted(signum)

    def __enter__(self) -> "StopSignals":
        handled = [s for s in STOP_SIGNALS if not (self._forward and s == signal.SIGTERM)]
        # Python runs handlers only in the main thread, and installs them only from it: in
        # another thread (a job started in a thread of one's own) signals keep their handlers.
        if threading.current_thread() is not threading.main_thread():
            handled = []
        self._previous = {s: signal.signal(s, self._handle) for s in handled}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @contextlib.contextmanager
    def graceful(self):
        """The training loop's section: the first signal is a request, not an exception."""
        self._graceful = True
        try:
            yield
        finally:
            self._graceful = False

    @contextlib.contextmanager
    def critical(self):
        """A section no signal interrupts (writing a checkpoint); one that arrives is raised after it."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self._pending is not None:
            signum, self._pending = self._pending, None
            raise Interrupted(signum)
