"""Tokenizers: text <-> token ids, three kinds behind one interface.

    kind    vocabulary                               unknown input          made from
    char    each distinct character of the corpus    an error naming it     the whole text (sorted)
    byte    the 256 byte values of UTF-8             none: any text         nothing
    bpe     bytes merged by byte-level BPE           none: any text         the training split (`tokenizers`)

Every kind has `kind`, `vocab_size`, `encode(text) -> (T,) int32`, `decode(ids) -> str`
and `to_meta() -> dict` (what a checkpoint stores; `from_meta` reads it back).
`decode` never fails: a byte or BPE sample that stops inside a multi-byte character
ends in U+FFFD (the replacement character) instead of raising.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Iterable, Protocol

import numpy as np

from minitx_fn.errors import Error

KINDS = ("char", "byte", "bpe")
MAX_CODE_POINT = 0x10FFFF


class UnknownCharactersError(Error):
    """Text holds characters that are not in the vocabulary."""


class MissingTokenizersError(Error):
    """The BPE tokenizer needs the optional `tokenizers` library."""

    def __init__(self):
        super().__init__("the bpe tokenizer needs Hugging Face's tokenizers library: pip install -e \".[bpe]\"")


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...

    def to_meta(self) -> dict: ...


def code_points(text: str) -> np.ndarray:
    """str of length T -> (T,) uint32 Unicode code points, without a Python loop.

    Example:
        >>> code_points("hé").tolist()
        [104, 233]
    """
    # surrogatepass: a lone surrogate (how Python keeps a command-line byte that is not
    # UTF-8) becomes its own code point, which no vocabulary holds, so encode names it.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """Each distinct character is one id, in code-point order, so the same corpus always
    gives the same vocabulary.

    Example:
        >>> tok = CharTokenizer.from_text("hello")
        >>> tok.chars, tok.encode("hole").tolist(), tok.decode([3, 2])
        ('ehlo', [1, 3, 2, 0], 'ol')
    """

    chars: str  # the vocabulary: id i is chars[i]
    kind = "char"

    def __post_init__(self) -> None:
        if not self.chars:
            raise ValueError("the vocabulary is empty: build it from a non-empty text")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("the vocabulary repeats a character")

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @classmethod
    def from_code_points(cls, points: np.ndarray) -> "CharTokenizer":
        """The vocabulary of a set of code points (any order, repeats allowed)."""
        return cls(np.unique(points).astype(np.uint32).tobytes().decode("utf-32-le", "surrogatepass"))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @functools.cached_property
    def _points(self) -> np.ndarray:
        return code_points(self.chars)

    @functools.cached_property
    def _ids_of_points(self) -> np.ndarray:
        """(0x110000,) int32: the id of every Unicode code point, -1 where the vocabulary
        has none (4.4 MB, made once)."""
        table = np.full(MAX_CODE_POINT + 1, -1, np.int32)
        table[self._points] = np.arange(self.vocab_size, dtype=np.int32)
        return table

    def lookup(self, points: np.ndarray) -> np.ndarray:
        """(T,) code points -> (T,) int32 ids, -1 for a character not in the vocabulary."""
        return self._ids_of_points[points]

    def encode(self, text: str) -> np.ndarray:
        """str of length T -> (T,) int32 ids. Raises UnknownCharactersError naming them.

        Vectorised: one table look-up per code point."""
        points = code_points(text)
        ids = self.lookup(points)
        if (ids < 0).any():
            unknown = "".join(sorted(set(chr(p) for p in points[ids < 0])))
            raise UnknownCharactersError(
                f"{len(unknown)} character(s) not in the vocabulary: {unknown!r} "
                f"(the model knows {self.vocab_size}: {self.chars!r})")
        return ids

    def decode(self, ids) -> str:
        """(T,) ids -> str."""
        return self._points[np.asarray(ids, np.int64)].tobytes().decode("utf-32-le", "surrogatepass")

    def to_meta(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes: vocabulary 256, any text encodes, any ids decode.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé").tolist(), tok.decode([104, 195, 169]), tok.decode([104, 195])
        ([104, 195, 169], 'hé', 'h\ufffd')
    """

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        # surrogatepass keeps a lone surrogate (a non-UTF-8 command-line byte) as bytes
        # instead of failing; decoding turns it into U+FFFD.
        return np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return np.asarray(ids, np.int64).astype(np.uint8).tobytes().decode("utf-8", "replace")

    def to_meta(self) -> dict:
        return {"kind": self.kind}


def require_tokenizers():
    """The `tokenizers` module, or MissingTokenizersError saying how to install it.

    Example:
        >>> require_tokenizers().__name__      # doctest: +SKIP
        'tokenizers'
    """
    try:
        import tokenizers
    except ImportError:
        raise MissingTokenizersError() from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (GPT-2's scheme) from Hugging Face's `tokenizers`: any text encodes.

    Example (needs `tokenizers`):
        >>> tok = BPETokenizer.train(["hello hello help"] * 10, vocab_size=260)   # doctest: +SKIP
        >>> tok.decode(tok.encode("hello help"))                                  # doctest: +SKIP
        'hello help'
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        ids = set(hf_tokenizer.get_vocab(with_added_tokens=True).values())
        if ids != set(range(hf_tokenizer.get_vocab_size())):
            # A model has one row per id 0 .. V - 1: an id beyond them would reach no row.
            raise ValueError(f"the tokenizer's ids are not 0 .. {hf_tokenizer.get_vocab_size() - 1} without gaps "
                             f"(largest {max(ids, default=-1)})")
        self._hf = hf_tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """A byte-level BPE of vocab_size ids (at least 256, the bytes) learned from texts.
        The same texts give the same tokenizer."""
        tk = require_tokenizers()
        hf = tk.Tokenizer(tk.models.BPE())
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def from_json(cls, text: str) -> "BPETokenizer":
        tk = require_tokenizers()
        try:
            hf = tk.Tokenizer.from_str(text)
        except Exception as e:             # tokenizers raises its own Exception for a bad file
            raise ValueError(f"not a valid tokenizers JSON ({str(e)[:100]})") from None
        return cls(hf)

    @classmethod
    def from_vocab_and_merges(cls, vocab_path: str, merges_path: str) -> "BPETokenizer":
        """GPT-2's original files: vocab.json (token -> id) and merges.txt (one merge a
        line). "<|endoftext|>", where the vocabulary has it, is a special token: it
        encodes whole, never from the characters of its name."""
        tk = require_tokenizers()
        try:
            hf = tk.Tokenizer(tk.models.BPE.from_file(vocab_path, merges_path))
        except Exception as e:             # tokenizers raises its own Exception for a bad file
            raise ValueError(f"not a valid vocabulary and merge list ({str(e)[:100]})") from None
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tk.decoders.ByteLevel()
        if hf.token_to_id("<|endoftext|>") is not None:
            hf.add_special_tokens(["<|endoftext|>"])
        return cls(hf)

    def to_json(self) -> str:
        return self._hf.to_str()

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._hf.encode(text).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Several texts at once, on every core."""
        return [np.asarray(e.ids, np.int32) for e in self._hf.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._hf.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def to_meta(self) -> dict:
        return {"kind": self.kind, "json": self.to_json()}

    def __eq__(self, other) -> bool:
        return isinstance(other, BPETokenizer) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())


def from_meta(meta) -> Tokenizer:
    """The tokenizer a checkpoint or cache manifest describes; ValueError if it is malformed.

    Example:
        >>> from_meta({"kind": "char", "chars": "ab"}).encode("ba").tolist(), from_meta({"kind": "byte"}).vocab_size
        ([1, 0], 256)
    """
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        raise ValueError(f"the tokenizer must be an object whose kind is one of {list(KINDS)}")
    fields = {"char": {"kind", "chars"}, "byte": {"kind"}, "bpe": {"kind", "json"}}[meta["kind"]]
    if set(meta) != fields or not all(isinstance(meta[k], str) for k in fields):
        raise ValueError(f"a {meta['kind']} tokenizer is an object of the strings {sorted(fields)}")
    if meta["kind"] == "char":
        return CharTokenizer(meta["chars"])
    if meta["kind"] == "byte":
        return ByteTokenizer()
    return BPETokenizer.from_json(meta["json"])


def describe(tokenizer: Tokenizer) -> str:
    """A short name for messages.

    Example:
        >>> describe(CharTokenizer("abc")), describe(ByteTokenizer())
        ('char (3 ids)', 'byte (256 ids)')
    """
    return f"{tokenizer.kind} ({tokenizer.vocab_size:,} ids)"


def meta_json(tokenizer: Tokenizer) -> str:
    """to_meta as canonical JSON: equal tokenizers give equal strings.

    Example:
        >>> meta_json(CharTokenizer("ab")) == meta_json(CharTokenizer.from_text("abba"))
        True
    """
    return json.dumps(tokenizer.to_meta(), sort_keys=True, ensure_ascii=False)
