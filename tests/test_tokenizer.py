"""The character tokenizer: a bijection between text and ids, checked against a
plain-dict definition, for any Unicode (outside the BMP too)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn.tokenizer import CharTokenizer, UnknownCharactersError


@given(text=st.text(min_size=1, max_size=200))
def test_encode_is_the_sorted_vocabulary_index_and_decode_inverts_it(text):
    tok = CharTokenizer.from_text(text)
    assert tok.chars == "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(tok.chars)}                  # the definition, by hand
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == [index[c] for c in text]
    assert tok.decode(ids) == text


@given(known=st.text(min_size=1, max_size=30), extra=st.text(min_size=1, max_size=10))
def test_unknown_characters_are_all_named(known, extra):
    tok = CharTokenizer.from_text(known)
    unknown = sorted(set(extra) - set(known))
    if not unknown:
        assert tok.decode(tok.encode(extra)) == extra
        return
    with pytest.raises(UnknownCharactersError) as info:
        tok.encode(known + extra)
    assert repr("".join(unknown)) in str(info.value)


def test_characters_outside_the_basic_plane():
    tok = CharTokenizer.from_text("a🙂b\U0010ffff")
    assert tok.decode(tok.encode("🙂ab\U0010ffff🙂")) == "🙂ab\U0010ffff🙂"


@pytest.mark.parametrize("chars, match", [("", "empty"), ("aba", "repeats")])
def test_bad_vocabularies(chars, match):
    with pytest.raises(ValueError, match=match):
        CharTokenizer(chars)


@given(st.sampled_from(["char", "byte"]), st.integers(-3, 2))
def test_decode_refuses_ids_the_tokenizer_does_not_have(kind, offset):
    """An id below 0 or past the vocabulary is named, never wrapped around (NumPy's
    negative index, a byte's modulo 256) nor dropped; the ids it has decode."""
    from minitx_fn.tokenizer import ByteTokenizer
    tok = CharTokenizer("abc") if kind == "char" else ByteTokenizer()
    bad = offset if offset < 0 else tok.vocab_size + offset
    with pytest.raises(ValueError, match=f"id {bad} is not one of the {kind} tokenizer's {tok.vocab_size} ids"):
        tok.decode([0, bad])
    assert tok.decode([0, tok.vocab_size - 1]) == tok.decode([0]) + tok.decode([tok.vocab_size - 1])
