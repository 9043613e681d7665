"""Shared test helpers."""

from __future__ import annotations

import os

from minitx_fn.testing import (assert_close_scaled, assert_param_shapes, check_layer, enable_x64,  # noqa: F401
                                standard_promotion)


def user_env() -> dict:
    """The environment of a process started the way a user starts one: without the XLA
    flags tests/conftest.py adds to make compiling fast."""
    added = set(os.environ.get("MINITX_TEST_ADDED_XLA_FLAGS", "").split())
    return dict(os.environ, XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f not in added))


def count_calls(monkeypatch, module, name: str) -> list:
    """Replace module.name with a wrapper that records each call: for a function a
    jitted one calls in its body, the calls are its traces (compilations), counted by
    us rather than read from JAX's private cache."""
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


# One small model for every command-line test: the same configs everywhere, so the
# jitted step, evaluation and decode compile once per session (and the persistent
# compilation cache serves them to subprocesses).
TINY_MODEL = ["--width", "32", "--layers", "1", "--heads", "2", "--context", "16"]
TINY = [*TINY_MODEL, "--batch-size", "8"]


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """`minitx ARGV` in this process: (exit status, stdout, stderr)."""
    from minitx_fn.cli import main
    with standard_promotion():
        code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *fragments: str, status: int = 2) -> str:
    """Exit status, exactly one line `minitx: error: ...` on stderr, no traceback, and each fragment in it."""
    assert code == status, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minitx: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
