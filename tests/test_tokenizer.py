"""The tokenizers: the character tokenizer, a bijection between text and ids checked
against a plain-dict definition, for any Unicode (outside the BMP too); the byte
tokenizer, for any text; byte-level BPE (Hugging Face's tokenizers), reproducible,
round-tripping any text, its special tokens checked; and what each refuses."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import tokenizer as tokenizers_
from minitx_fn.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, UnknownCharactersError
from tests.helpers import sentencepiece_style

try:
    import tokenizers  # noqa: F401
    HAVE_TOKENIZERS = True
except ImportError:
    HAVE_TOKENIZERS = False
needs_tokenizers = pytest.mark.skipif(not HAVE_TOKENIZERS, reason="the bpe tokenizer needs the optional "
                                      "'tokenizers' library (pip install -e '.[bpe]')")

TEXT = "First Citizen: héllo, wörld! 😀 Before we proceed any further, hear me speak.\n" * 40


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
    tok = CharTokenizer("abc") if kind == "char" else ByteTokenizer()
    bad = offset if offset < 0 else tok.vocab_size + offset
    with pytest.raises(ValueError, match=f"id {bad} is not one of the {kind} tokenizer's {tok.vocab_size} ids"):
        tok.decode([0, bad])
    assert tok.decode([0, tok.vocab_size - 1]) == tok.decode([0]) + tok.decode([tok.vocab_size - 1])


# ----------------------------------------------------------------------------- bytes


@given(st.text(max_size=50))
def test_the_byte_tokenizer_round_trips_any_unicode_string(text):
    ids = ByteTokenizer().encode(text)
    assert ids.dtype == np.int32 and ((0 <= ids) & (ids < 256)).all()
    assert ByteTokenizer().decode(ids) == text


@given(st.lists(st.integers(0, 255), max_size=30))
def test_any_byte_ids_decode_without_error(ids):
    """A sample may stop inside a multi-byte character: decoding replaces it, never raises."""
    text = ByteTokenizer().decode(ids)
    assert isinstance(text, str)
    if bytes(ids).isascii():
        assert text == bytes(ids).decode("ascii")


# ----------------------------------------------------------------------------- byte-level BPE


@needs_tokenizers
def test_bpe_is_reproducible_and_round_trips_any_text():
    from minitx_fn.tokenizer import from_meta
    first = BPETokenizer.train([TEXT], vocab_size=300)
    second = BPETokenizer.train([TEXT], vocab_size=300)
    assert first.to_json() == second.to_json() and first.vocab_size == 300
    assert from_meta(first.to_meta()) == first and "special" not in first.to_meta()
    marked = first.with_special({"bos_token_id": 0, "eos_token_id": [1, 299], "pad_token_id": None})
    assert from_meta(marked.to_meta()) == marked != first and marked.special == {"bos_token_id": 0,
                                                                                  "eos_token_id": [1, 299]}
    for bad, said in (({"eos_token_id": 300}, r"eos_token_id = 300 must be an id in \[0, 300\)"),
                      ({"eos_token_id": []}, "eos_token_id = \\[\\] must be"), ({"unk_token_id": 1}, "not a special"),
                      ({"bos_token_id": True}, "bos_token_id = True must be")):
        with pytest.raises(ValueError, match=said):
            from_meta({**first.to_meta(), "special": bad})
    with pytest.raises(ValueError, match="id 300 is not one of the bpe tokenizer's 300 ids; a model whose table"):
        first.decode([5, 300])                               # tokenizers itself would drop it
    for text in (TEXT, "ünseen çharacters ∑ 😀\n", "héllo"):
        assert first.decode(first.encode(text)) == text
    assert len(first.encode(TEXT)) < len(TEXT.encode()) / 2          # merges learned: fewer tokens than bytes


@needs_tokenizers
@given(st.text(max_size=30))
def test_bpe_round_trips_any_unicode_string(text):
    tok = _bpe()
    assert tok.decode(tok.encode(text)) == text


_BPE = []


def _bpe():
    if not _BPE:
        _BPE.append(BPETokenizer.train([TEXT], vocab_size=280))
    return _BPE[0]


@given(text=st.text(alphabet="ab \n", max_size=300), piece=st.sampled_from([4, 16]))
def test_bpe_pieces_join_back_and_stay_bounded_without_newlines(text, piece):
    old = tokenizers_.BPE_PIECE_CHARS, tokenizers_.BPE_HARD_CUT_CHARS
    tokenizers_.BPE_PIECE_CHARS, tokenizers_.BPE_HARD_CUT_CHARS = piece, 3
    try:
        pieces = BPETokenizer.pieces(text)
    finally:
        tokenizers_.BPE_PIECE_CHARS, tokenizers_.BPE_HARD_CUT_CHARS = old
    assert "".join(pieces) == text and all(pieces)
    assert all(len(p) <= 2 * piece for p in pieces)


def test_bpe_without_its_library_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)                   # import tokenizers -> ImportError
    with pytest.raises(tokenizers_.MissingTokenizersError, match=r"pip install.*\.\[bpe\]"):
        tokenizers_.require_tokenizers()


@needs_tokenizers
@given(text=st.text(alphabet=st.sampled_from(list("ab xé\n")), max_size=60).map(lambda t: "a" + t),
       piece=st.sampled_from([4, 8]), legacy=st.booleans())
def test_a_document_encoded_in_pieces_decodes_to_its_text(text, piece, legacy):
    """A file is encoded a piece at a time: a SentencePiece-style tokenizer prepends a
    space to each text it encodes (by Metaspace's prepend_scheme, or Llama-2's normalizer
    Prepend), which a piece inside a document must not get. Decoded, the ids are the
    text; the first piece alone is encoded as the whole text would be."""
    tok = sentencepiece_style(legacy)
    old = tokenizers_.BPE_PIECE_CHARS, tokenizers_.BPE_HARD_CUT_CHARS
    tokenizers_.BPE_PIECE_CHARS, tokenizers_.BPE_HARD_CUT_CHARS = piece, 3
    try:
        pieces = BPETokenizer.pieces(text)
        ids = tok.encode_utf8(text.encode(), starts_document=True)
        rest = tok.encode_utf8(text.encode())
    finally:
        tokenizers_.BPE_PIECE_CHARS, tokenizers_.BPE_HARD_CUT_CHARS = old
    assert tok.decode(ids) == text
    assert tok.decode(ids[:len(tok.encode(pieces[0]))]) == pieces[0]
    assert tok.encode(text[:0] + pieces[0]).tolist() == ids[:len(tok.encode(pieces[0]))].tolist()
    assert tok.decode(np.concatenate([ids, rest])) == text + text        # a continuation: no space between


@needs_tokenizers
@given(st.text(alphabet=st.sampled_from(list("abc xyzé😀ü∑")), max_size=30).map(lambda t: "a" + t))
def test_the_bytes_each_id_stands_for_add_up_to_the_texts_bytes(text):
    """Bits per byte divide by these: for byte-level BPE the ids' bytes are the text's
    exactly; for a SentencePiece-style tokenizer, the text's and the space Metaspace
    prepends ("<0xC3>" is one byte, not six characters). The texts begin with a letter:
    SentencePiece's decoding drops a text's leading spaces."""
    for tok, extra in ((_bpe(), 0), (sentencepiece_style(), 1)):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8")) + extra, (tok.kind, text)
