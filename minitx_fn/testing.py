"""Helpers for testing layers and models, the ones this project's own tests use:
import them in hypothesis tests of layers of one's own (needs the test extra: chex).

    from minitx_fn.testing import check_layer, assert_close_scaled
    params, y = check_layer(lambda: my_layer.init(key, d=8), my_layer.apply, expected_shapes={"w": (8, 8)},
                            x=jnp.ones((2, 8)), out_shape=(2, 8))

- `check_layer`: the layer contract in one call (init's shapes and dtype, apply's
  output shape and dtype, finite, `jit(apply) == apply`).
- `assert_close_scaled`: trees equal within a tolerance relative to each leaf's scale.
- `assert_param_shapes`: a parameter tree has exactly these shapes and one dtype.
- `enable_x64`, `standard_promotion`: float64 in a block; standard dtype promotion
  for code (optax, Flax) not written for strict promotion.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np


def _max_abs(a) -> float:
    return float(np.abs(np.asarray(a, np.float64)).max(initial=0.0))


def assert_close_scaled(actual, expected, tol: float, *, floor: float = 1e-3) -> None:
    """Every leaf: max |actual - expected| <= tol * scale, the scale being the leaf's own
    max |expected|, floored at `floor` times the largest value in the whole tree.

    The floor matters for leaves whose value is (near) zero, where a relative error
    means nothing: biases that start at zero and have moved by one step, or the
    entries of a gradient that cancel. floor=1 measures every leaf on the tree's scale.

    Example:
        >>> assert_close_scaled({"w": np.array([100.0, 1.0])}, {"w": np.array([100.001, 1.0])}, 1e-5)
        >>> assert_close_scaled({"w": np.array([1.0])}, {"w": np.array([1.1])}, 1e-5)
        Traceback (most recent call last):
        AssertionError: ['w']: max abs error 1.000e-01 > 1e-05 x scale 1.100e+00
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
    """The parameter tree has exactly these leaf shapes, all of `dtype`.

    Example:
        >>> assert_param_shapes({"w": jnp.zeros((2, 3))}, {"w": (2, 3)}, jnp.float32)
    """
    chex.assert_trees_all_equal_structs(jax.tree.map(lambda a: a.shape, params), expected_shapes)
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a.shape, params), expected_shapes)
    chex.assert_type(jax.tree.leaves(params), [dtype] * len(jax.tree.leaves(params)))


def check_layer(init_fn, apply_fn, *, expected_shapes: dict, x, out_shape, dtype=jnp.float32, out_dtype=None):
    """The one layer-contract check (init_fn takes no arguments: close over the key and
    sizes, `lambda: my_layer.init(key, d=8)`): init's parameters have the expected shapes and
    dtype, apply accepts exactly them (eval_shape, no FLOPs), returns out_shape, and
    the jitted apply equals the plain one. Returns (params, y).

    Example:
        >>> from minitx_fn.layers import linear
        >>> params, y = check_layer(lambda: linear.init(jax.random.key(0), d_in=4, d_out=3), linear.apply,
        ...                         expected_shapes={"w": (4, 3), "b": (3,)}, x=jnp.ones((2, 4)), out_shape=(2, 3))
    """
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
    """jax.enable_x64 (jax >= 0.7) or jax.experimental.enable_x64 (older): float64 in a `with` block.

    Example:
        >>> with enable_x64():
        ...     jnp.ones(1, jnp.float64).dtype
        dtype('float64')
    """
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

    Example:
        >>> with standard_promotion():
        ...     (jnp.ones(1, jnp.float32) + jnp.ones(1, jnp.int32)).dtype
        dtype('float32')
    """
    return jax.numpy_dtype_promotion("standard")
