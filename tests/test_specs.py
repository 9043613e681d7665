"""The layers' option values (`minitx_fn/specs.py`): each checks itself when built,
names the field it refuses, and is a value (equal specs are one static argument)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn.errors import ConfigError
from minitx_fn.specs import AttentionSpec, BlockSpec, RopeScaling


@pytest.mark.parametrize("changes, field", [
    ({"n_heads": 0}, "n_heads=0"), ({"n_kv_heads": 3}, "n_kv_heads=3.*must divide n_heads=4"),
    ({"impl": "flash"}, "attention='flash'"),
])
def test_a_layer_spec_checks_itself(changes, field):
    with pytest.raises(ValueError, match=field):
        AttentionSpec(**{"n_heads": 4, **changes})
    with pytest.raises(ValueError, match="norm='batch'"):
        BlockSpec(attention=AttentionSpec(n_heads=2), norm="batch")


@given(heads=st.sampled_from([1, 2, 3, 4, 6, 8, 12]), groups=st.sampled_from([1, 2, 3, 4]))
def test_grouped_query_heads_divide_or_are_refused(heads, groups):
    """G key/value heads serve H / G query heads each: accepted exactly when G divides
    H (then `groups` is H / G), else one ConfigError naming both fields."""
    if heads % groups == 0:
        spec = AttentionSpec(n_heads=heads, n_kv_heads=groups)
        assert spec.groups * spec.n_kv_heads == heads
        assert spec == AttentionSpec(n_heads=heads, n_kv_heads=groups) and hash(spec) == hash(AttentionSpec(
            n_heads=heads, n_kv_heads=groups))                       # a value: one compiled function for both
    else:
        with pytest.raises(ConfigError, match=f"n_kv_heads={groups} is invalid: it must divide n_heads={heads}"):
            AttentionSpec(n_heads=heads, n_kv_heads=groups)


def test_a_rope_scaling_refuses_a_field_its_kind_does_not_read():
    with pytest.raises(ConfigError, match="rope_scaling.beta_fast=8.0 is invalid: rope_scaling.kind='linear' does "
                                          "not read it"):
        RopeScaling(kind="linear", factor=2.0, beta_fast=8.0)
    with pytest.raises(ConfigError, match="rope_scaling.factor=0.5 is invalid"):
        RopeScaling(kind="linear", factor=0.5)
    assert RopeScaling(kind="llama3", factor=8.0, original_max_len=16).low_freq_factor == 1.0
