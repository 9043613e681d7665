"""The checks values run on themselves (`minitx_fn/checks.py`), as laws over their
whole domain: what each accepts and that a refusal is one ConfigError naming the field."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import checks
from minitx_fn.config import LoraConfig
from minitx_fn.defaults import FLOAT32_MAX
from minitx_fn.errors import ConfigError


@given(st.one_of(st.integers(-10, 10**12), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=2)))
def test_positive_int_accepts_exactly_the_whole_numbers_in_range(value):
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10**9
    try:
        checks.positive_int("steps", value, limit=10**9)
        assert ok
    except ConfigError as e:
        assert not ok and str(e).startswith(f"steps={value!r} is invalid")


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**40, 10**40), st.booleans()))
def test_number_is_a_finite_value_float32_can_hold(value):
    expected = not isinstance(value, bool) and math.isfinite(value) and abs(value) <= FLOAT32_MAX
    assert checks.number(value) == expected


def test_numpy_scalars_become_the_python_numbers_they_stand_for():
    lora = LoraConfig(rank=np.int64(2), alpha=np.float32(4.0))
    assert type(lora.rank) is int and type(lora.alpha) is float and lora == LoraConfig(rank=2, alpha=4.0)


def test_replace_fields_names_a_field_the_value_lacks():
    with pytest.raises(ConfigError, match=r"LoraConfig has no fields \['rnak'\]"):
        checks.replace_fields(LoraConfig(rank=2), {"rnak": 4})
    assert checks.replace_fields(LoraConfig(rank=2), {"rank": 4}).rank == 4
