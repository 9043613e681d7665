"""Errors keep the fields they mention apart from their text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from minitx_fn.errors import ConfigError, Error


def test_fields_render_as_the_library_names_them_or_as_the_caller_asks():
    e = ConfigError("{a} is invalid: it must lie in [0, {b}]", a=("min_lr", 1.0), b=("lr", 0.003))
    assert str(e) == "min_lr=1.0 is invalid: it must lie in [0, lr=0.003]"
    assert e.render(lambda field, value: f"<{field}: {value}>") == \
        "<min_lr: 1.0> is invalid: it must lie in [0, <lr: 0.003>]"
    assert isinstance(e, ValueError) and e.mentions == {"a": ("min_lr", 1.0), "b": ("lr", 0.003)}


@given(text=st.text(max_size=40).filter(lambda t: "{x}" not in t))
def test_braces_that_are_not_mentions_are_left_alone(text):
    """A path or a prompt may hold braces: only known placeholders are replaced."""
    assert str(Error(text)) == text
    assert Error(text + " {x}", x=("seed", 1)).render() == text + " seed=1"
