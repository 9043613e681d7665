"""Tokenizers: text <-> token ids, three kinds behind one interface.

    kind    vocabulary                               unknown input          made from
    char    each distinct character of the corpus    an error naming it     the whole text (sorted)
    byte    the 256 byte values of UTF-8             none: any text         nothing
    bpe     bytes merged by byte-level BPE           none: any text         the training split (`tokenizers`)

Every kind has `kind`, `vocab_size`, `encode(text) -> (T,) int32`, `decode(ids) -> str`,
`encode_utf8(raw bytes, starts_document) -> (T,) int32` (a chunk of a file, the fastest
way the kind allows; only the chunk that starts a document gets what a tokenizer puts
at a text's start, so a prepared file holds it once), `to_meta() -> dict` (what a
checkpoint stores; `from_meta` reads it back), `hf_json()` (its Hugging Face
tokenizer.json, None without one), `document_start()` (the ids a text begins with, an
imported tokenizer's BOS) and `learn(source,
vocab_size)`, how it is made from a text (`learn(kind, ...)` picks the kind, `CLASSES`).
What differs between the kinds, each says itself, so no caller asks for the kind:

    open_vocabulary     any text encodes (char: only the characters it learned)
    splits_text         a corpus is split into training and validation text before
                        encoding, so no token straddles the boundary (bpe, whose tokens
                        span characters); else the ids are split
    default_vocab_size  the size it learns when none is given; None: a fixed vocabulary
    padded_table        a model's table may have more rows than it has ids (an
                        imported BPE's table, padded to a round size)
`decode` never fails: a byte or BPE sample that stops inside a multi-byte character
ends in U+FFFD (the replacement character) instead of raising.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Callable, Iterable, NamedTuple, Protocol

import numpy as np

from minitx_fn.defaults import DEFAULT_BPE_VOCAB, TOKENIZERS
from minitx_fn.errors import Error

KINDS = TOKENIZERS
# Which ids begin, end and pad a text, as Hugging Face's config.json names them (BPETokenizer.special).
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
MAX_CODE_POINT = 0x10FFFF
UTF8_BLOCK_BYTES = 1 << 16         # text is turned into code points a block of about this size at a time
BPE_PIECE_CHARS = 1 << 16          # text handed to tokenizers.encode_batch in pieces of about this size
BPE_PIECES_PER_BATCH = 16          # pieces per encode_batch call: bounds its memory
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")   # SentencePiece's byte fallback: one byte its vocabulary lacks
BPE_HARD_CUT_CHARS = 4096          # a piece's length where the text has no newline or space to cut at


class UnknownCharactersError(Error):
    """Text holds characters that are not in the vocabulary."""


class MissingTokenizersError(Error):
    """The BPE tokenizer needs the optional `tokenizers` library."""

    def __init__(self):
        super().__init__("the bpe tokenizer needs Hugging Face's tokenizers library: pip install -e \".[bpe]\"")


class Source(NamedTuple):
    """What a tokenizer may learn from, each part made only when asked for."""

    code_points: Callable[[], np.ndarray]         # the distinct code points of the whole text (char)
    training_texts: Callable[[], Iterable[str]]   # the training split's text, in pieces (bpe)


class Tokenizer(Protocol):
    kind: str
    open_vocabulary: bool
    splits_text: bool
    default_vocab_size: int | None
    padded_table: bool

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def encode_utf8(self, raw: bytes, starts_document: bool = False) -> np.ndarray: ...

    def decode(self, ids) -> str: ...

    def to_meta(self) -> dict: ...

    def token_bytes(self) -> np.ndarray: ...

    def hf_json(self) -> str | None: ...

    def document_start(self) -> np.ndarray: ...


def known_ids(ids, tokenizer: Tokenizer) -> np.ndarray:
    """ids as a flat int64 array, after checking each is one of the tokenizer's:
    ValueError naming the first that is not. Every kind's `decode` checks this, so an
    id past a tokenizer (a model whose table is padded past it, sampled without
    `Sampler.id_limit`) is never dropped or wrapped around unseen.

    Example:
        >>> known_ids([2, 7], ByteTokenizer()).tolist()
        [2, 7]
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids are whole numbers, not {ids.dtype}")
    ids = ids.astype(np.int64)
    bad = ids[(ids < 0) | (ids >= tokenizer.vocab_size)]
    if bad.size:
        hint = ("; a model whose table is padded past its tokenizer draws such ids unless sampled with "
                "Sampler(id_limit=tokenizer.vocab_size)") if tokenizer.padded_table else ""
        raise ValueError(f"id {int(bad[0])} is not one of the {tokenizer.kind} tokenizer's {tokenizer.vocab_size} "
                         f"ids{hint}")
    return ids


def learn(kind: str, source: Source, vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer of `kind` made from a text (`vocab_size`: bpe only).

    Example:
        >>> learn("char", Source(lambda: code_points("hello"), lambda: ["hello"])).chars
        'ehlo'
    """
    return CLASSES[kind].learn(source, vocab_size)


def char_boundary(raw: bytes, end: int) -> int:
    """The largest cut <= end that does not fall inside a UTF-8 character of raw.

    Example:
        >>> char_boundary("hé".encode(), 2)          # byte 2 is inside 'é'
        1
    """
    cut = max(0, min(end, len(raw)))
    while 0 < cut < len(raw) and raw[cut] & 0xC0 == 0x80:      # a continuation byte
        cut -= 1
    return cut


def utf8_blocks(raw: bytes):
    """(offset, block) of raw in blocks of about UTF8_BLOCK_BYTES, cut between characters.
    Most blocks of most texts are ASCII: those take the fast paths.

    Example:
        >>> [block for _, block in utf8_blocks(b"abc")]
        [b'abc']
    """
    start = 0
    while start < len(raw):
        end = char_boundary(raw, start + UTF8_BLOCK_BYTES) if start + UTF8_BLOCK_BYTES < len(raw) else len(raw)
        end = end if end > start else min(start + UTF8_BLOCK_BYTES, len(raw))
        yield start, raw[start:end]
        start = end


def utf8_code_points(raw: bytes):
    """UTF-8 bytes (whole characters) -> code points, a block at a time: the bytes
    themselves for an ASCII block, decoded to UTF-32 otherwise.

    Example:
        >>> [p.tolist() for p in utf8_code_points("hé".encode())]
        [[104, 233]]
    """
    for _, block in utf8_blocks(raw):
        yield np.frombuffer(block, np.uint8) if block.isascii() else code_points(block.decode("utf-8"))


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
    open_vocabulary, splits_text, default_vocab_size, padded_table = False, False, None, False

    @staticmethod
    def require_library() -> None:
        """Nothing to require: NumPy does it all."""

    def __post_init__(self) -> None:
        if not self.chars:
            raise ValueError("the vocabulary is empty: build it from a non-empty text")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("the vocabulary repeats a character")
        if list(self.chars) != sorted(self.chars):       # ids follow code points: an edited order is another model
            raise ValueError("the vocabulary is not in code-point order")

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @classmethod
    def from_code_points(cls, points: np.ndarray) -> "CharTokenizer":
        """The vocabulary of a set of code points (any order, repeats allowed)."""
        return cls(np.unique(points).astype(np.uint32).tobytes().decode("utf-32-le", "surrogatepass"))

    @classmethod
    def learn(cls, source: Source, vocab_size: int | None = None) -> "CharTokenizer":
        """Every character the whole text holds, in code-point order."""
        return cls.from_code_points(source.code_points())

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

    def encode_utf8(self, raw: bytes, starts_document: bool = False) -> np.ndarray:
        """Whole UTF-8 characters -> (T,) int32 ids: one table look-up per code point,
        a block at a time (ASCII blocks without decoding). A document's start adds nothing."""
        blocks = [self.lookup(points) for points in utf8_code_points(raw)]
        ids = np.concatenate(blocks) if blocks else np.zeros(0, np.int32)
        if ids.size and ids.min() < 0:                     # a character this vocabulary lacks
            self.encode(raw.decode("utf-8"))               # raises, naming the characters
        return ids

    def decode(self, ids) -> str:
        """(T,) ids -> str."""
        return self._points[known_ids(ids, self)].tobytes().decode("utf-32-le", "surrogatepass")

    def token_bytes(self) -> np.ndarray:
        """(V,) the UTF-8 bytes each id stands for (bits per byte count them)."""
        return np.array([len(c.encode("utf-8", "surrogatepass")) for c in self.chars], np.int64)

    def to_meta(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    def hf_json(self) -> None:
        """None: Hugging Face's tokenizers have no per-character vocabulary of this kind."""
        return None

    def document_start(self) -> np.ndarray:
        """No ids: a text begins with its first character's."""
        return np.zeros(0, np.int32)


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes: vocabulary 256, any text encodes, any ids decode.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé").tolist(), tok.decode([104, 195, 169]), tok.decode([104, 195])
        ([104, 195, 169], 'hé', 'h\ufffd')
    """

    kind = "byte"
    open_vocabulary, splits_text, default_vocab_size, padded_table = True, False, None, False

    @staticmethod
    def require_library() -> None:
        """Nothing to require: NumPy does it all."""

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        # surrogatepass keeps a lone surrogate (a non-UTF-8 command-line byte) as bytes
        # instead of failing; decoding turns it into U+FFFD.
        return np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8).astype(np.int32)

    def encode_utf8(self, raw: bytes, starts_document: bool = False) -> np.ndarray:
        """One id per byte; a document's start adds nothing."""
        return np.frombuffer(raw, np.uint8).astype(np.int32)

    @classmethod
    def learn(cls, source: Source, vocab_size: int | None = None) -> "ByteTokenizer":
        """Nothing to learn: the 256 byte values."""
        return cls()

    def token_bytes(self) -> np.ndarray:
        """(V,) the bytes each id stands for: one."""
        return np.ones(256, np.int64)

    def decode(self, ids) -> str:
        return known_ids(ids, self).astype(np.uint8).tobytes().decode("utf-8", "replace")

    def to_meta(self) -> dict:
        return {"kind": self.kind}

    def hf_json(self) -> str:
        """A `tokenizers` JSON of the same ids: byte-level BPE with no merges, where byte b
        (written as GPT-2's printable stand-in for b, `bytes_to_unicode`) is id b."""
        tk = require_tokenizers()
        alphabet = bytes_to_unicode()
        hf = tk.Tokenizer(tk.models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tk.decoders.ByteLevel()
        return hf.to_str()

    def document_start(self) -> np.ndarray:
        """No ids: a text begins with its first byte's."""
        return np.zeros(0, np.int32)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (its encoder.py): printable
    Latin-1 bytes stand for themselves, the other 68 for code points 256 .. 323.

    Example:
        >>> m = bytes_to_unicode()
        >>> m[ord("a")], m[ord(" ")], len(set(m.values()))
        ('a', 'Ġ', 256)
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


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
    open_vocabulary, splits_text, default_vocab_size, padded_table = True, True, DEFAULT_BPE_VOCAB, True

    @staticmethod
    def require_library() -> None:
        """MissingTokenizersError unless Hugging Face's tokenizers is installed."""
        require_tokenizers()

    def __init__(self, hf_tokenizer, special: dict | None = None):
        """`special`: which ids are the beginning, end and padding of a text, under
        Hugging Face's names (`SPECIAL_TOKENS`; an id, or a list of them for several
        ends), as an imported model's config.json gives them; export writes them back."""
        ids = set(hf_tokenizer.get_vocab(with_added_tokens=True).values())
        if ids != set(range(hf_tokenizer.get_vocab_size())):
            # A model has one row per id 0 .. V - 1: an id beyond them would reach no row.
            raise ValueError(f"the tokenizer's ids are not 0 .. {hf_tokenizer.get_vocab_size() - 1} without gaps "
                             f"(largest {max(ids, default=-1)})")
        self._hf = hf_tokenizer
        self.special = _checked_special(special or {}, self.vocab_size)

    def with_special(self, special: dict) -> "BPETokenizer":
        """The same tokenizer, its special ids these (None values dropped); ValueError
        naming a key that is not in SPECIAL_TOKENS or an id it does not have."""
        return BPETokenizer(self._hf, special)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """A byte-level BPE of at most vocab_size ids (at least 256, the bytes) learned
        from texts: fewer when the texts offer fewer merges (read `.vocab_size`). The
        same texts give the same tokenizer."""
        tk = require_tokenizers()
        hf = tk.Tokenizer(tk.models.BPE())
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def learn(cls, source: Source, vocab_size: int | None = None) -> "BPETokenizer":
        """Merges learned from the training split's text, to vocab_size ids (default DEFAULT_BPE_VOCAB)."""
        return cls.train(source.training_texts(), vocab_size or cls.default_vocab_size)

    @staticmethod
    def pieces(text: str) -> list[str]:
        """The text cut into pieces of about BPE_PIECE_CHARS for `tokenizers`: after a
        newline, else after a space, within twice that; else (a text without either,
        where BPE's time grows with the square of a word's length) every
        BPE_HARD_CUT_CHARS. Learning from pieces bounds its memory: tokenizers holds a
        whole string's pre-tokenization while it counts (16 MB strings took 1.35 GB to
        learn from 15 MB; 64 KB ones, 150 MB).

        Example:
            >>> BPETokenizer.pieces("short text")
            ['short text']
        """
        pieces, start = [], 0
        while start < len(text):
            end = len(text)
            if end - start > 2 * BPE_PIECE_CHARS:
                window = (start + BPE_PIECE_CHARS, start + 2 * BPE_PIECE_CHARS)
                cut = max(text.rfind("\n", *window), text.rfind(" ", *window))
                end = cut + 1 if cut >= 0 else start + BPE_HARD_CUT_CHARS
            pieces.append(text[start:end])
            start = end
        return pieces

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

    def hf_json(self) -> str:
        """Its own `tokenizers` JSON (`to_json`)."""
        return self.to_json()

    def token_bytes(self) -> np.ndarray:
        """(V,) the bytes each id stands for, as the tokenizer decodes it: byte-level BPE
        (GPT-2's) writes each byte of a token as one character of its printable alphabet,
        so a token's length in characters is its length in bytes (a special token such as
        <|endoftext|> counts its name); a SentencePiece-style one (Llama-2's Metaspace with
        byte fallback) writes a space as "▁" and a byte it has no piece for as "<0xNN>",
        one byte (tests/test_tokenizer.py holds both to the text's own bytes).
        """
        pieces = [self._hf.id_to_token(i) or "" for i in range(self.vocab_size)]
        if "ByteLevel" in json.dumps(json.loads(self.to_json()).get("decoder")):
            return np.array([len(piece) for piece in pieces], np.int64)
        return np.array([1 if BYTE_PIECE.fullmatch(piece) else len(piece.replace("▁", " ").encode("utf-8"))
                         for piece in pieces], np.int64)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._hf.encode(text).ids, np.int32)

    def encode_batch(self, texts: list[str], continuing: bool = False) -> list[np.ndarray]:
        """Several pieces of a text at once, on every core, without the special tokens
        the tokenizer adds to a whole text (`document_start`): a BOS at every piece
        would be data the model never saw. continuing: the pieces continue a text, so
        nothing is prepended to them either (SentencePiece's "▁", `_continuing`)."""
        hf = self._continuing if continuing else self._hf
        return [np.asarray(e.ids, np.int32) for e in hf.encode_batch(texts, add_special_tokens=False)]

    @functools.cached_property
    def _continuing(self):
        """This tokenizer with nothing prepended to a text: Llama-2's Metaspace (or its
        normalizer's Prepend) writes a space before every text it encodes, which inside a
        document is a space the text does not have."""
        return require_tokenizers().Tokenizer.from_str(json.dumps(_without_prefix(json.loads(self.to_json()))))

    def document_start(self) -> np.ndarray:
        """The ids the tokenizer puts before a text (Llama 3's BOS, from its
        post-processor), none for GPT-2's: what `encode("")` gives."""
        return np.asarray(self._hf.encode("").ids, np.int32)

    def encode_utf8(self, raw: bytes, starts_document: bool = False) -> np.ndarray:
        """Whole UTF-8 characters -> (T,) int32 ids, a few pieces at a time: tokenizers
        keeps ~100 bytes of offsets and strings per token until a batch returns, so a
        whole 16 MB chunk at once would take a gigabyte. Only a document's first piece
        is encoded as a text's start (its BOS, a prepended space); the rest continue it."""
        pieces = self.pieces(raw.decode("utf-8"))
        ids = [self.document_start(), *self.encode_batch(pieces[:1])] if starts_document else []
        rest = pieces[1:] if starts_document else pieces
        for start in range(0, len(rest), BPE_PIECES_PER_BATCH):
            ids += self.encode_batch(rest[start:start + BPE_PIECES_PER_BATCH], continuing=True)
        return np.concatenate([np.zeros(0, np.int32), *ids])

    def decode(self, ids) -> str:
        return self._hf.decode(known_ids(ids, self).tolist())

    def to_meta(self) -> dict:
        return {"kind": self.kind, "json": self.to_json(), **({"special": self.special} if self.special else {})}

    def __eq__(self, other) -> bool:
        return isinstance(other, BPETokenizer) and self.to_json() == other.to_json() and self.special == other.special

    def __hash__(self) -> int:
        return hash(self.to_json())


def _without_prefix(spec: dict) -> dict:
    """A `tokenizers` JSON with nothing prepended to a text: no normalizer `Prepend`, and
    Metaspace and ByteLevel pre-tokenizers that add no space (`BPETokenizer._continuing`).

    Example:
        >>> _without_prefix({"normalizer": {"type": "Sequence", "normalizers": [
        ...     {"type": "Prepend", "prepend": "▁"}, {"type": "Replace"}]}, "pre_tokenizer": {
        ...     "type": "Metaspace", "prepend_scheme": "first", "split": False}})
        {'normalizer': {'type': 'Sequence', 'normalizers': [{'type': 'Replace'}]}, \
'pre_tokenizer': {'type': 'Metaspace', 'prepend_scheme': 'never', 'split': False}}
    """
    def strip(part):
        if not isinstance(part, dict):
            return part
        if part.get("type") == "Prepend":
            return None
        part = dict(part)
        for key in ("normalizers", "pretokenizers"):           # a Sequence's parts
            if isinstance(part.get(key), list):
                part[key] = [p for p in map(strip, part[key]) if p is not None]
        if part.get("type") == "Metaspace" and "prepend_scheme" in part:
            part["prepend_scheme"] = "never"
        if part.get("type") in ("Metaspace", "ByteLevel") and "add_prefix_space" in part:
            part["add_prefix_space"] = False
        return part
    return {**spec, **{key: strip(spec.get(key)) for key in ("normalizer", "pre_tokenizer") if key in spec}}


CLASSES = {cls.kind: cls for cls in (CharTokenizer, ByteTokenizer, BPETokenizer)}   # in the order of KINDS


def _checked_special(special, vocab_size: int) -> dict:
    """{name: id, or for eos_token_id a non-empty list of ids} for the names of
    SPECIAL_TOKENS that are not None (a list of one bos or pad id is that id: transformers
    takes a list for eos alone); ValueError naming the first bad key or id.

    Example:
        >>> _checked_special({"bos_token_id": [1], "eos_token_id": [2, 3], "pad_token_id": None}, 5)
        {'bos_token_id': 1, 'eos_token_id': [2, 3]}
        >>> _checked_special({"pad_token_id": [0, 4]}, 5)
        Traceback (most recent call last):
        ValueError: pad_token_id = [0, 4] must be one id: only eos_token_id may list several
    """
    if not isinstance(special, dict):
        raise ValueError(f"the special token ids must be an object, not {type(special).__name__}")
    out = {}
    for name, value in special.items():
        if name not in SPECIAL_TOKENS:
            raise ValueError(f"{name!r} is not a special token id; they are {list(SPECIAL_TOKENS)}")
        if isinstance(value, list) and name != "eos_token_id":
            if len(value) != 1:
                raise ValueError(f"{name} = {value!r} must be one id: only eos_token_id may list several")
            value = value[0]
        ids = value if isinstance(value, list) else [value]
        if value is None:
            continue
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
            raise ValueError(f"{name} = {value!r} must be an id in [0, {vocab_size})"
                             + (" or a list of them" if name == "eos_token_id" else ""))
        out[name] = value
    return out


def from_meta(meta) -> Tokenizer:
    """The tokenizer a checkpoint or cache manifest describes; ValueError if it is malformed.

    Example:
        >>> from_meta({"kind": "char", "chars": "ab"}).encode("ba").tolist(), from_meta({"kind": "byte"}).vocab_size
        ([1, 0], 256)
    """
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        raise ValueError(f"the tokenizer must be an object whose kind is one of {list(KINDS)}")
    fields = {"char": {"kind", "chars"}, "byte": {"kind"}, "bpe": {"kind", "json"}}[meta["kind"]]
    optional = {"special"} if meta["kind"] == "bpe" else set()               # BPETokenizer.special, when it has some
    if not fields <= set(meta) <= fields | optional or not all(isinstance(meta[k], str) for k in fields):
        raise ValueError(f"a {meta['kind']} tokenizer is an object of the strings {sorted(fields)}"
                         + (f", and may have {sorted(optional)}" if optional else ""))
    if meta["kind"] == "char":
        return CharTokenizer(meta["chars"])
    if meta["kind"] == "byte":
        return ByteTokenizer()
    return BPETokenizer.from_json(meta["json"]).with_special(meta.get("special", {}))


def same_ids(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers turn every text into the same ids and back: the same
    kind and vocabulary, whatever special ids they name (`BPETokenizer.special`).

    Example:
        >>> same_ids(CharTokenizer("ab"), CharTokenizer("ab")), same_ids(CharTokenizer("ab"), ByteTokenizer())
        (True, False)
    """
    def ids(tokenizer: Tokenizer) -> dict:
        return {key: value for key, value in tokenizer.to_meta().items() if key != "special"}
    return ids(a) == ids(b)


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
