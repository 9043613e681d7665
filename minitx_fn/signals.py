"""Signals that stop a run: SIGINT (Ctrl-C), SIGTERM (what schedulers and `docker stop`
send before they kill) and SIGHUP (a closed terminal) all mean "save and leave".

No JAX here: the command line installs these handlers before it imports JAX, so a
signal in the first second of a command is one line and an exit status, like any other.
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


_ACTIVE: list["StopSignals"] = []       # the StopSignals blocks entered, innermost last


def active() -> "StopSignals | None":
    """The innermost StopSignals block this process is in, or None.

    Example:
        >>> active() is None
        True
    """
    return _ACTIVE[-1] if _ACTIVE else None


def check() -> None:
    """A safe point: raise `Interrupted` if a stop signal arrived outside a training
    loop's graceful section and no one has acted on it yet. Long work outside the loop
    (preparing data, reading or writing files) calls this between its pieces.

    Example:
        >>> check()            # no signal: nothing happens
    """
    for stops in _ACTIVE:
        stops.check()


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP as requests to stop, for the `with` block.

    A handler never raises from wherever the interpreter happens to be (a garbage
    collector's callback, JAX's import, a compiler callback: an exception there is lost,
    or leaves half-built state behind): it records the signal, and the code acts on it
    at a safe point. Inside `graceful()` (the training loop), the first signal sets
    `requested` and the loop saves and leaves at the next step boundary; a second one
    raises `Interrupted` at once, except inside `critical()` (a checkpoint being
    written), where it waits until the write is done. Outside `graceful()`, the signal
    raises `Interrupted` at the next `check()`. The previous handlers come back at the end.
    """

    def __init__(self, *, forward_to_sigterm: bool = False, restore: bool = True):
        """forward_to_sigterm: a multi-process run, whose SIGTERM belongs to JAX's
        coordination service (it makes every process stop at one agreed step). Then
        SIGTERM is left alone, and SIGINT or SIGHUP are passed on to it as SIGTERM.
        restore=False leaves the handlers installed after the block (a program's
        entry point: a signal while the interpreter shuts down, the work done, is
        recorded and the exit status stays the work's)."""
        self.requested: int | None = None
        self._forward = forward_to_sigterm
        self._restore = restore
        self._exit_at_once = False
        self._graceful = False
        self._critical = 0
        self._pending: int | None = None         # arrived inside critical(): raised after it
        self._unhandled: int | None = None       # arrived outside graceful(): raised at the next check()
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self._exit_at_once:                            # nothing is being written (see exit_at_once)
            os.write(2, f"minitx: interrupted by {signal.Signals(signum).name}; nothing saved was lost\n".encode())
            os._exit(128 + signum)
        if self._forward and self._graceful:
            os.kill(os.getpid(), signal.SIGTERM)          # to JAX's handler: every process will stop
        elif self._graceful and self.requested is None:
            self.requested = signum
        elif self._critical:
            self._pending = signum
        elif self._graceful:                              # a second signal in the loop: stop now
            raise Interrupted(signum)
        else:
            self.requested = self.requested or signum
            self._unhandled = self._unhandled or signum

    def check(self) -> None:
        """Raise `Interrupted` for a signal that arrived outside graceful() (see `check`)."""
        if self._unhandled is not None and not self._critical:
            signum, self._unhandled = self._unhandled, None
            raise Interrupted(signum)

    def forward_sigterm(self) -> None:
        """From now on the run is multi-process: SIGTERM is JAX's coordination
        service's (installed by `jax.distributed.initialize`, after this block began),
        and SIGINT or SIGHUP in the loop are passed on to it."""
        self._forward = True
        self._previous.pop(signal.SIGTERM, None)          # never put back over JAX's own handler

    def __enter__(self) -> "StopSignals":
        handled = [s for s in STOP_SIGNALS if not (self._forward and s == signal.SIGTERM)]
        # Python runs handlers only in the main thread, and installs them only from it: in
        # another thread (a job started in a thread of one's own) signals keep their handlers.
        if threading.current_thread() is not threading.main_thread():
            handled = []
        self._previous = {s: signal.signal(s, self._handle) for s in handled}
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        if self._restore:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
        else:
            self._graceful, self._exit_at_once, self._unhandled = False, False, None     # record, and that is all

    @contextlib.contextmanager
    def exit_at_once(self, allowed: bool = True):
        """A section that writes nothing and that no safe point interrupts (a long
        generation, one compiled loop): inside it a signal ends the process at once,
        with one line and 128 + its number. Only for a program's own handlers (the
        command line's): a library must not end its caller's process. allowed=False
        makes it a plain section."""
        self._exit_at_once = allowed and not self._restore
        try:
            check()
            yield
        finally:
            self._exit_at_once = False

    @contextlib.contextmanager
    def graceful(self):
        """The training loop's section: the first signal is a request, not an exception.
        One that arrived just before (after the last check) is that request."""
        self._graceful, self._unhandled = True, None
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
