"""Stop signals (`minitx_fn.signals`): SIGINT, SIGTERM and SIGHUP are recorded, never
raised from wherever the interpreter happens to be, and acted on at safe points: a
request in the training loop's graceful section, an `Interrupted` at once for a
second one, after the write for one inside a critical section, and at the next
`check()` outside the loop. The handlers that were there come back afterwards. (The
loop's use of them: test_loop.py; the command line's: test_cli.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from minitx_fn import signals
from minitx_fn.signals import Interrupted, StopSignals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _send(signum: int) -> None:
    """A signal to this process; Python runs its handler before the next bytecode."""
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize("signum", signals.STOP_SIGNALS)
def test_outside_the_loop_a_signal_is_raised_at_the_next_safe_point(signum):
    before = signal.getsignal(signum)
    with StopSignals() as stops:
        assert signals.active() is stops
        _send(signum)                                   # recorded: nothing is raised here
        assert stops.requested == signum
        with pytest.raises(Interrupted) as info:
            signals.check()
        assert info.value.signum == signum and str(info.value) == f"interrupted by {signal.Signals(signum).name}"
        signals.check()                                  # acted on once
    assert signal.getsignal(signum) is before and signals.active() is None


def test_in_the_loop_the_first_signal_is_a_request_and_a_second_stops_at_once():
    with StopSignals() as stops:
        with stops.graceful():
            _send(signal.SIGTERM)
            assert stops.requested == signal.SIGTERM      # the loop saves and leaves at the next step
            with pytest.raises(Interrupted) as info:
                _send(signal.SIGINT)
        assert info.value.signum == signal.SIGINT


def test_a_second_signal_during_a_write_waits_for_it_to_finish():
    written = []
    with StopSignals() as stops:
        with stops.graceful():
            _send(signal.SIGTERM)
            with pytest.raises(Interrupted) as info:
                with stops.critical():
                    _send(signal.SIGHUP)                   # held until the write is done
                    written.append("checkpoint")
        assert info.value.signum == signal.SIGHUP and written == ["checkpoint"]


def test_a_signal_just_before_the_loop_is_its_request():
    with StopSignals() as stops:
        _send(signal.SIGHUP)
        with stops.graceful():
            signals.check()                                # not raised: the loop takes it as its request
            assert stops.requested == signal.SIGHUP


def test_blocks_nest_and_the_innermost_is_active():
    with StopSignals() as outer:
        with StopSignals() as inner:
            assert signals.active() is inner
        assert signals.active() is outer


def test_in_another_thread_the_handlers_are_left_alone():
    """Python installs handlers only from the main thread: a job started in a thread of
    one's own keeps the process's handlers."""
    before, seen = signal.getsignal(signal.SIGTERM), []

    def job():
        with StopSignals():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    assert seen == [before]


def test_a_multi_process_run_leaves_sigterm_to_jax():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(forward_to_sigterm=True):
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is not before


def _program(body: str) -> subprocess.CompletedProcess:
    """A Python process of its own running body, which imports nothing but signals."""
    script = "import os, signal, sys\nfrom minitx_fn import signals\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_a_program_that_keeps_its_handlers_records_a_late_signal_and_keeps_its_status():
    """restore=False (a program's entry point): after the block a signal is recorded and
    nothing more, so a finished program's exit status stays its own."""
    done = _program("""
        with signals.StopSignals(restore=False):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        print("still here")
        sys.exit(3)
    """)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (3, "still here", "")


def test_exit_at_once_ends_a_program_with_one_line_and_its_status():
    """A section that writes nothing (a long generation): the signal ends the program at
    once, 128 + N, with one line; a library's own block (restore=True) never does."""
    done = _program("""
        with signals.StopSignals(restore=False) as stops:
            with stops.exit_at_once():
                os.kill(os.getpid(), signal.SIGTERM)
                print("not reached")
    """)
    assert done.returncode == 128 + signal.SIGTERM and done.stdout == ""
    assert done.stderr == "minitx: interrupted by SIGTERM; nothing saved was lost\n"
    with StopSignals() as stops:
        with stops.exit_at_once():
            _send(signal.SIGTERM)                          # recorded, raised at the next safe point
        with pytest.raises(Interrupted):
            signals.check()
