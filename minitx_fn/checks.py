"""Checks that values run on themselves when built: each names the field it refuses.

A config value (`specs.py`, `config.py`) calls these in its `__post_init__`, so a
wrong setting is one `ConfigError` naming the field and its value, raised where the
value is made, never a traceback from deep in a jitted function. No JAX is imported
here (`x64_enabled` imports it when called).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from minitx_fn.defaults import FLOAT32_MAX, INT32_MAX
from minitx_fn.errors import ConfigError


def x64_enabled() -> bool:
    """Whether JAX makes 64-bit arrays now (`jax_enable_x64`, globally or in a `jax.enable_x64` block).

    Example:
        >>> x64_enabled()
        False
    """
    import jax
    import jax.numpy as jnp
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64


def plain_numbers(config) -> None:
    """NumPy scalars (np.int64(5), np.float32(1e-3)) as the Python numbers they stand
    for: a config is hashed, compared and written to JSON, which numpy scalars spoil.

    Example:
        >>> import numpy as np
        >>> from minitx_fn.config import LoraConfig
        >>> type(LoraConfig(rank=np.int64(2)).rank)          # its __post_init__ calls plain_numbers
        <class 'int'>
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
            object.__setattr__(config, field.name, int(value))
        elif isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
            object.__setattr__(config, field.name, float(value))


def require(ok: bool, field: str, value: Any, fix: str, **mentions: tuple[str, Any]) -> None:
    """ConfigError "{field}={value} is invalid: {fix}" unless ok; `fix` may mention other fields.

    Example:
        >>> require(False, "steps", 0, "it must be at least {least}", least=("min_steps", 1))
        Traceback (most recent call last):
        minitx_fn.errors.ConfigError: steps=0 is invalid: it must be at least min_steps=1
    """
    if not ok:
        raise ConfigError("{field} is invalid: " + fix, field=(field, value), **mentions)


def whole(value: Any) -> bool:
    """A Python int that is not a bool (True is an int to Python, never a size here).

    Example:
        >>> whole(3), whole(3.0), whole(True)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)


def number(value: Any) -> bool:
    """A finite int or float that float32 can hold: these settings reach the device as float32.

    Example:
        >>> number(1e-3), number(float("nan")), number(1e39), number(False)
        (True, False, False, False)
    """
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= FLOAT32_MAX)


def positive_int(field: str, value: Any, limit: int = INT32_MAX) -> None:
    """ConfigError naming `field` unless value is a whole number in [1, limit].

    Example:
        >>> positive_int("n_layers", 0)
        Traceback (most recent call last):
        minitx_fn.errors.ConfigError: n_layers=0 is invalid: it must be a whole number in [1, 2,147,483,647]
    """
    require(whole(value) and 1 <= value <= limit, field, value, f"it must be a whole number in [1, {limit:,}]")


def replace_fields(value, changes: dict):
    """dataclasses.replace, with ConfigError naming a field the value does not have.

    Example:
        >>> from minitx_fn.config import LoraConfig
        >>> replace_fields(LoraConfig(rank=2), {"rnak": 4})
        Traceback (most recent call last):
        minitx_fn.errors.ConfigError: LoraConfig has no fields ['rnak']; its fields are ['rank', 'alpha', 'targets']
    """
    names = [f.name for f in dataclasses.fields(value)]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise ConfigError(f"{type(value).__name__} has no fields {unknown}; its fields are {names}")
    return dataclasses.replace(value, **changes)


def key_value_heads(config) -> None:
    """Fill in and check a config's n_kv_heads (None: n_heads), which must divide n_heads.

    Example:
        >>> from minitx_fn.specs import AttentionSpec
        >>> AttentionSpec(n_heads=4).n_kv_heads                   # its __post_init__ calls key_value_heads
        4
    """
    if config.n_kv_heads is None:
        object.__setattr__(config, "n_kv_heads", config.n_heads)
    positive_int("n_kv_heads", config.n_kv_heads)
    require(config.n_heads % config.n_kv_heads == 0, "n_kv_heads", config.n_kv_heads,
             "it must divide {heads} (each key/value head serves a group of query heads)",
             heads=("n_heads", config.n_heads))
