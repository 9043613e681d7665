"""Shared test helpers."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np


def user_env() -> dict:
    """The environment of a process started the way a user starts one: without the XLA
    flags tests/conftest.py adds to make compiling fast."""
    added = set(os.environ.get("MINITX_TEST_ADDED_XLA_FLAGS", "").split())
    return dict(os.environ, XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f not in added))


def _max_abs(a) -> float:
    return float(np.abs(np.asarray(a, np.float64)).max(initial=0.0))


def assert_close_scaled(actual, expected, tol: float, *, floor: float = 1e-3) -> None:
    """Every leaf: max |actual - expected| <= tol * scale, the scale being the leaf's own
    max |expected|, floored at `floor` times the largest value in the whole tree.

    The floor matters for leaves whose value is (near) zero, where a relative error
    means nothing: biases that start at zero and have moved by one step, or the
    entries of a gradient that cancel. floor=1 measures every leaf on the tree's scale.
    """
    chex.assert_trees_all_equal_shapes(actual, expected)
    floor = floor * max([_max_abs(e) for e in jax.tree.leaves(expected)] + [1e-30])
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(_max_abs(e64), floor)
        err = float(np.abs(a64 - e64).max(initial=0.0))
        assert err <= tol * scale, (
            f"{jax.tree_util.keystr(path)}: max abs error {err:.3e} > {tol:.0e} x scale {scale:.3e}")


def assert_param_shapes(params, expected_shapes: dict, dtype) -> None:
    """The parameter tree has exactly these leaf shapes, all of `dtype`."""
    chex.assert_trees_all_equal_structs(jax.tree.map(lambda a: a.shape, params), expected_shapes)
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a.shape, params), expected_shapes)
    chex.assert_type(jax.tree.leaves(params), [dtype] * len(jax.tree.leaves(params)))


def check_layer(init_fn, apply_fn, *, expected_shapes: dict, x, out_shape, dtype=jnp.float32, out_dtype=None):
    """The one layer-contract check: init's parameters have the expected shapes and
    dtype, apply accepts exactly them (eval_shape, no FLOPs), returns out_shape, and
    the jitted apply equals the plain one. Returns (params, y)."""
    params = init_fn()
    assert_param_shapes(params, expected_shapes, dtype)
    abstract = jax.eval_shape(apply_fn, params, x)
    chex.assert_shape(abstract, out_shape)
    y = apply_fn(params, x)
    chex.assert_shape(y, out_shape)
    chex.assert_type(y, out_dtype or dtype)
    chex.assert_tree_all_finite(y)
    chex.assert_trees_all_close(jax.jit(apply_fn)(params, x), y, rtol=1e-6, atol=1e-6)
    return params, y


def enable_x64():
    """jax.enable_x64 (jax >= 0.7) or jax.experimental.enable_x64 (older)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as legacy  # pragma: no cover
    return legacy()



def standard_promotion():
    """Standard dtype promotion for a block of code that runs optax or Flax.

    The suite runs with strict promotion to catch implicit casts in our library, but
    the third-party code we compare against is not written for it: optax (0.2.x)
    computes Adam's bias correction as `decay ** count` with an int32 count, and
    Flax's LayerNorm and attention mix float32 constants into float64 inputs.
    """
    return jax.numpy_dtype_promotion("standard")


# One small model for every command-line test: the same configs everywhere, so the
# jitted step, evaluation and decode compile once per session (and the persistent
# compilation cache serves them to subprocesses).
TINY = ["--width", "32", "--layers", "1", "--heads", "2", "--context", "16", "--batch-size", "8"]


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
