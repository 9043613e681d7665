"""Prepare a text file once, streamed: token ids on disk, read back as a memory map.

    minitx prepare --data big.txt --tokenizer char       (or the first `minitx train --data big.txt`)

Numpy only, no JAX: preparing starts at once and takes little memory.

    pass 1   read the file in 16 MB chunks: SHA-256 and UTF-8 check; a valid cache for
             that SHA-256 is used from here. Else the characters seen (char), or the
             training split's text (bpe: the merges are learned from it)
    pass 2   encode chunk by chunk, append the ids to tokens.bin (uint8, uint16 or uint32,
             the narrowest that holds the vocabulary)
    last     manifest.json: the source (path, size, SHA-256), the tokenizer, the token
             count and file's SHA-256 and modification time, the train/validation boundary

Memory stays bounded by the chunk size whatever the file's size (the char vocabulary
is a table of 1.1M flags; BPE learns from at most the first `BPE_TRAINING_BYTES` of
the training split). The cache folder is built under a temporary name and renamed
into place, so a killed preparation leaves no half-made cache, only a temporary
folder the next preparation removes.

A later run reuses the cache when the manifest, the source's SHA-256, the token
file's size and modification time and the tokenizer all match; anything else (the text was
edited, tokens.bin truncated or changed, another tokenizer asked for, a foreign or
damaged manifest) is said in one line and the cache is rebuilt.

Splits: char and byte split the ids at 90% (so the char path gives exactly the ids
and split of reading the whole file); bpe splits the text at 90% of its bytes (at a
character boundary) and learns its merges from the first part only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io  # noqa: F401  (the doctests)
import json
import mmap
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from minitx_fn import runs, signals, tokenizer as tokenizers_
from minitx_fn.defaults import CACHE_ENV, MAX_BPE_VOCAB, MIN_BPE_VOCAB, TRAIN_FRACTION
from minitx_fn.errors import DataError, StorageError
from minitx_fn.tokenizer import BPETokenizer, CharTokenizer, Tokenizer  # noqa: F401  (CharTokenizer: the doctests)

# 2: "learned" says whether the tokenizer was learned from this text (what a plain
# `--data FILE` reuses) or given (a resumed or fine-tuned run's own). 3: the special ids
# a tokenizer puts before a text (a BOS) appear once, at the start, not at every piece.
# 4: so does the space a SentencePiece-style tokenizer prepends to a text.
MANIFEST_VERSION = 4
CHUNK_BYTES = 16 << 20
BPE_TRAINING_BYTES = 64 << 20      # the merges are learned from at most this much of the training split

# The built-in corpus is a cycle of three phrases. Training text is the cycle
# repeated, so the model also sees the wrap from "flax! " back to "hello world!".
BUILTIN_CORPUS = "hello world! hello jax! hello flax! "
BUILTIN_REPEATS = 8
BUILTIN_SOURCE = {"builtin": True}      # Corpus.source (and a checkpoint's data) of the built-in corpus


def builtin_text() -> str:
    """The built-in training text: the corpus cycle repeated.

    Example:
        >>> builtin_text()[:24]
        'hello world! hello jax! '
    """
    return BUILTIN_CORPUS * BUILTIN_REPEATS


def train_boundary(n_tokens: int) -> int:
    """Where the training part of n_tokens ids ends: the first 90% train, the rest
    validates (char and byte; bpe splits the text's bytes instead, `_bpe_split`).

    Example:
        >>> train_boundary(100), train_boundary(11)
        (90, 9)
    """
    return int(n_tokens * TRAIN_FRACTION)


def sha256_text(text: str) -> str:
    """SHA-256 of the text's UTF-8 bytes, in hex: what a run records of a text in memory.

    Example:
        >>> sha256_text("hello")[:16]
        '2cf24dba5fb0a30e'
    """
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token ids of a text with its tokenizer: ids[:boundary] train, ids[boundary:] validate.

    `source` is what a run records of its training data (`checkpoint.save`'s `data`):
    {"path", "sha256"} of a text file, {"path": None, "sha256"} of a text or ids given
    in memory, or BUILTIN_SOURCE.

    Example:
        >>> c = Corpus.from_text("hello world", "char")
        >>> c.tokenizer.kind, len(c.ids), c.boundary, c.train.dtype, c.source["path"]
        ('char', 11, 9, dtype('uint8'), None)
    """

    tokenizer: Tokenizer
    ids: np.ndarray                # (N,) uint8/uint16/uint32: in memory, or a read-only memory map
    boundary: int
    source: dict                   # what the ids were made from (above)
    folder: str | None = None      # the cache folder, None for a text prepared in memory

    @property
    def train(self) -> np.ndarray:
        return self.ids[:self.boundary]

    @property
    def validation(self) -> np.ndarray:
        return self.ids[self.boundary:]

    @property
    def name(self) -> str:
        """A short name for run directories: the file's name without its extension,
        "hello" for the built-in corpus, "text" for one in memory.

        Example:
            >>> builtin().name, Corpus.from_text("abc").name
            ('hello', 'text')
        """
        if self.source == BUILTIN_SOURCE:
            return "hello"
        if self.source.get("path") is None:
            return "text"
        return os.path.splitext(os.path.basename(self.source["path"]))[0] or "data"

    @classmethod
    def from_text(cls, text: str, kind: str = "char", vocab_size: int | None = None,
                  tokenizer: Tokenizer | None = None) -> "Corpus":
        """A text in memory, tokenized and split like a file: with a tokenizer of `kind`
        learned from it, or with `tokenizer` (a run's own)."""
        check_text(text)
        if tokenizer is None:
            check_choice(kind, vocab_size)
            tokenizer = tokenizers_.learn(kind, tokenizers_.Source(lambda: tokenizers_.code_points(text),
                                                                  lambda: [text[:_bpe_split(text)]]), vocab_size)
        if tokenizer.splits_text:                      # the document's start once, then its two parts as pieces
            cut = _bpe_split(text)
            parts = [tokenizer.encode_utf8(text[:cut].encode(), starts_document=True),
                     tokenizer.encode_utf8(text[cut:].encode())]
            ids, boundary = np.concatenate(parts), len(parts[0])
        else:
            ids = tokenizer.encode(text)
            boundary = train_boundary(len(ids))
        return cls(tokenizer, ids.astype(ids_dtype(tokenizer.vocab_size)), boundary,
                   {"path": None, "sha256": sha256_text(text)})

    @classmethod
    def from_ids(cls, ids, tokenizer: Tokenizer) -> "Corpus":
        """Token ids already made with `tokenizer`, split 90% / 10%; DataError for ids
        outside its vocabulary.

        Example:
            >>> c = Corpus.from_ids(np.arange(20) % 3, CharTokenizer("abc"))
            >>> c.boundary, c.tokenizer.decode(c.validation)
            (18, 'ab')
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or not len(ids) or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"ids must be a non-empty 1-D array of integers, not {ids.dtype} of shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
            raise DataError(f"ids must lie in [0, {tokenizer.vocab_size}) for the {tokenizer.kind} tokenizer; found "
                            f"[{ids.min()}, {ids.max()}]")
        ids = ids.astype(ids_dtype(tokenizer.vocab_size))
        return cls(tokenizer, ids, train_boundary(len(ids)),
                   {"path": None, "sha256": hashlib.sha256(ids.astype("<u4").tobytes()).hexdigest()})


def check_text(text) -> None:
    """DataError unless `text` is a non-empty str that UTF-8 can encode.

    Example:
        >>> check_text(b"abc")
        Traceback (most recent call last):
        minitx_fn.errors.DataError: the text must be a str, not bytes
    """
    if not isinstance(text, str) or not text:
        raise DataError("the text is empty; give it some text to learn from" if text == "" else
                        f"the text must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:            # a lone surrogate: no Unicode text, and no file could hold it
        raise DataError(f"the text is not valid Unicode (a lone surrogate {text[e.start]!r} at index "
                        f"{e.start}); give text that UTF-8 can encode") from None


def builtin(kind: str = "char", vocab_size: int | None = None, tokenizer: Tokenizer | None = None) -> Corpus:
    """The built-in corpus `builtin_text()`, tokenized like any text; its source says so.

    Example:
        >>> builtin().source, builtin().tokenizer.vocab_size
        ({'builtin': True}, 13)
    """
    return dataclasses.replace(Corpus.from_text(builtin_text(), kind, vocab_size, tokenizer), source=BUILTIN_SOURCE)


def ids_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds ids < vocab_size.

    Example:
        >>> [ids_dtype(v).name for v in (65, 256, 257, 50257, 70000)]
        ['uint8', 'uint8', 'uint16', 'uint16', 'uint32']
    """
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


def default_cache_dir(environ: dict | None = None) -> str:
    """$MINITX_CACHE_DIR, else $XDG_CACHE_HOME/minitx, else ~/.cache/minitx (environ:
    the process's environment, or a dict standing in for it).

    Example:
        >>> default_cache_dir({"MINITX_CACHE_DIR": "/c", "XDG_CACHE_HOME": "/x"})
        '/c'
        >>> default_cache_dir({"XDG_CACHE_HOME": "/x"})
        '/x/minitx'
    """
    environ = os.environ if environ is None else environ
    if environ.get(CACHE_ENV):
        return environ[CACHE_ENV]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "minitx")


def cache_folder(path: str, kind: str, vocab_size: int | None = None, cache_dir: str | None = None, *,
                 tokenizer: Tokenizer | None = None) -> str:
    """Where the preparation of this file lives: CACHE/<file name>-<hash of its absolute
    path>/<spec>. A tokenizer learned from the text has spec <kind>[-<vocab size asked>];
    a given one (a resumed or fine-tuned run's) lives where a preparation made with it
    already is, else under <kind>-given-<hash of the tokenizer>: the cache is keyed by
    the tokenizer itself, so two tokenizers of one file never overwrite each other.

    Example:
        >>> cache_folder("/data/big.txt", "bpe", None, "/cache")
        '/cache/big.txt-8ef372f15de0/bpe-4096'
        >>> os.path.basename(cache_folder("/data/big.txt", "char", cache_dir="/cache", tokenizer=CharTokenizer("ab")))
        'char-given-...'

    """
    absolute = os.path.abspath(path)
    # At most 100 characters of the file's name: a folder name must fit in 255 bytes.
    name = (os.path.basename(absolute)[:100] + "-"
            + hashlib.sha256(absolute.encode("utf-8", "surrogatepass")).hexdigest()[:12])
    parent = os.path.join(cache_dir or default_cache_dir(), name)
    if tokenizer is None:
        learned = tokenizers_.CLASSES[kind].default_vocab_size
        return os.path.join(parent, f"{kind}-{vocab_size or learned}" if learned else kind)
    identity = tokenizer_sha256(tokenizer)
    return _folder_holding(parent, tokenizer.kind, identity) or os.path.join(
        parent, f"{tokenizer.kind}-given-{identity[:12]}")


def _folder_holding(parent: str, kind: str, tokenizer_sha256: str) -> str | None:
    """The cache folder under parent whose manifest names this tokenizer (by the SHA-256
    of its description), if any: a run finds the preparation its tokenizer came from."""
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return None
    for name in names:
        if name == kind or name.startswith(kind + "-"):
            try:
                with open(os.path.join(parent, name, "manifest.json"), encoding="utf-8") as f:
                    if json.load(f).get("tokenizer_sha256") == tokenizer_sha256:
                        return os.path.join(parent, name)
            except (OSError, ValueError, AttributeError):
                continue
    return None


# ----------------------------------------------------------------------------- reading a file in chunks


def check_file(path: str) -> int:
    """The size of the text file at path; DataError for a missing or empty file, a
    directory, or anything else that is not a regular file.

    Example:
        >>> check_file('/tmp')
        Traceback (most recent call last):
        minitx_fn.errors.DataError: data path '/tmp' is a directory; give the path of a text file inside it
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        raise DataError(f"data file {path!r} does not exist; give the path of a UTF-8 text file") from None
    except OSError as e:                      # a loop of symbolic links, a path through a file, no permission
        raise DataError(f"data path {path!r} cannot be opened: {e.strerror}; give the path of a UTF-8 text "
                        f"file") from None
    if os.path.isdir(path):
        raise DataError(f"data path {path!r} is a directory; give the path of a text file inside it")
    if not os.path.isfile(path):
        raise DataError(f"data path {path!r} is not a regular file; give the path of a UTF-8 text file")
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"data file {path!r} is empty; give it some text to learn from")
    return size


def chunks(path: str, chunk_bytes: int | None = None, start: int = 0, end: int | None = None):
    """Yield (offset, raw bytes) of the file's bytes [start, end) in pieces of about
    chunk_bytes (default CHUNK_BYTES), each ending on a UTF-8 character boundary and
    checked to be UTF-8 (DataError naming the offset of a bad byte). start and end
    must be character boundaries.

    Example:
        >>> p = os.path.join(tempfile.mkdtemp(), "t.txt"); _ = open(p, "w").write("héllo")
        >>> [raw for _, raw in chunks(p, chunk_bytes=2)]
        [b'h', b'\\xc3\\xa9l', b'lo']
    """
    size = check_file(path)
    end = size if end is None else end
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    try:
        with open(path, "rb") as f:
            f.seek(start)
            offset, carry = start, b""
            while offset + len(carry) < end:
                block = f.read(min(chunk_bytes, end - offset - len(carry)))
                raw = carry + block
                at_end = not block or offset + len(raw) >= end
                cut = len(raw) if at_end else _complete_prefix(raw)
                piece, carry = raw[:cut], raw[cut:]
                if not piece:
                    if not block:                      # the file shrank while we read it
                        return
                    continue
                for at, part in tokenizers_.utf8_blocks(piece):
                    if not part.isascii():
                        try:
                            part.decode("utf-8")
                        except UnicodeDecodeError as e:
                            raise DataError(f"data file {path!r} is not UTF-8 text (invalid byte at offset "
                                            f"{offset + at + e.start}); convert it to UTF-8, e.g. with "
                                            f"iconv") from None
                yield offset, piece
                signals.check()                           # a stop signal: between two chunks
                offset += len(piece)
                if not block:
                    return
    except OSError as e:
        raise DataError(f"cannot read data file {path!r}: {e.strerror}; check its permissions") from None


def _complete_prefix(raw: bytes) -> int:
    """The length of raw without a multi-byte character cut off at its end."""
    i = len(raw) - 1
    while i > 0 and len(raw) - i < 4 and raw[i] & 0xC0 == 0x80:          # continuation bytes
        i -= 1
    lead = raw[i]
    need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    return i if len(raw) - i < need else len(raw)


# ----------------------------------------------------------------------------- preparing


def check_choice(kind: str, vocab_size: int | None) -> None:
    """DataError unless kind is a tokenizer and vocab_size is given only for bpe, in [256, 2**20].

    Example:
        >>> check_choice("byte", 1000)
        Traceback (most recent call last):
        minitx_fn.errors.DataError: the byte tokenizer has a fixed vocabulary; vocab_size=1000 is for bpe
    """
    if kind not in tokenizers_.KINDS:
        raise DataError(f"unknown tokenizer {kind!r}; choose one of {', '.join(tokenizers_.KINDS)}")
    if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)):
        raise DataError("{vocab_size} must be a whole number", vocab_size=("vocab_size", vocab_size))
    if vocab_size is not None and tokenizers_.CLASSES[kind].default_vocab_size is None:
        sized = [name for name, cls in tokenizers_.CLASSES.items() if cls.default_vocab_size]
        raise DataError(f"the {kind} tokenizer has a fixed vocabulary; {{vocab_size}} is for {' or '.join(sized)}",
                        vocab_size=("vocab_size", vocab_size))
    if vocab_size is not None and not MIN_BPE_VOCAB <= vocab_size <= MAX_BPE_VOCAB:
        raise DataError(f"{{vocab_size}} must lie in [{MIN_BPE_VOCAB}, {MAX_BPE_VOCAB:,}]: the 256 bytes, then merges",
                        vocab_size=("vocab_size", vocab_size))
    tokenizers_.CLASSES[kind].require_library()


def _source_sha256(path: str, size: int, progress) -> str:
    """Pass 1, all that a valid cache costs: the text's SHA-256 (its UTF-8 is checked by
    the passes that read characters, when there is something to prepare)."""
    digest, done = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            while done < size and (block := f.read(min(CHUNK_BYTES, size - done))):   # the bytes checked, no more
                digest.update(block)
                done += len(block)
                progress("checking", done, size)
                signals.check()
    except OSError as e:
        raise DataError(f"cannot read data file {path!r}: {e.strerror}; check its permissions") from None
    return digest.hexdigest()


def _code_points_seen(path: str, size: int, progress) -> np.ndarray:
    """The sorted distinct code points of the text: a flag per Unicode code point."""
    seen = np.zeros(tokenizers_.MAX_CODE_POINT + 1, bool)
    for offset, raw in chunks(path):
        for points in tokenizers_.utf8_code_points(raw):
            seen[points] = True
        progress("reading the characters", offset + len(raw), size)
    return np.flatnonzero(seen)


def _bpe_split(text: str) -> int:
    """The character index before which 90% of the text's UTF-8 bytes lie."""
    raw = text.encode("utf-8")
    return len(raw[:tokenizers_.char_boundary(raw, train_boundary(len(raw)))].decode("utf-8"))


def _bpe_training_texts(path: str, split_at: int):
    """The training split's text, at most its first BPE_TRAINING_BYTES, in pieces."""
    end = _char_boundary_in_file(path, min(split_at, BPE_TRAINING_BYTES))
    for _, raw in chunks(path, end=end):
        # In pieces: tokenizers holds a whole string's pre-tokenization while it counts,
        # so 16 MB strings took 1.35 GB of memory to learn from 15 MB; 64 KB ones, 150 MB.
        yield from BPETokenizer.pieces(raw.decode("utf-8"))


def _char_boundary_in_file(path: str, at: int) -> int:
    with open(path, "rb") as f:
        f.seek(max(at - 3, 0))
        raw = f.read(6)
    return max(at - 3, 0) + tokenizers_.char_boundary(raw, min(at, 3))


class _Progress:
    """A line refreshed on a terminal (MB done, MB/s); silent elsewhere."""

    def __init__(self, out):
        self.out, self.started, self.last = out, time.perf_counter(), 0.0
        self.tty = hasattr(out, "isatty") and out.isatty()

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if not self.tty or now - self.last < 0.2:
            return
        self.last = now
        rate = done / 1e6 / max(now - self.started, 1e-9)
        self.out.write(f"\r\033[K{what}: {done / 1e6:,.0f} / {total / 1e6:,.0f} MB, {rate:,.0f} MB/s")
        self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\r\033[K")
            self.out.flush()


class SourceChangedError(DataError):
    """The text is not the one expected (a resumed run's): its SHA-256 differs."""

    def __init__(self, path: str):
        super().__init__(f"data file {path!r} is not the expected text (its SHA-256 differs)")
        self.path = path


def prepare(path: str, kind: str = "char", vocab_size: int | None = None, *, cache_dir: str | None = None,
            tokenizer: Tokenizer | None = None, expected_sha256: str | None = None, out=None) -> Corpus:
    """Token ids of the text file at path: from the cache when it is valid, else prepared
    (streamed, bounded memory) and cached. With `tokenizer` (a resumed run's), the text
    is encoded with it instead of a new one; with expected_sha256, a text whose SHA-256
    differs raises SourceChangedError before any encoding. Messages go to out (default
    stdout).

    Example:
        >>> p = os.path.join(tempfile.mkdtemp(), "t.txt"); _ = open(p, "w").write("hello world")
        >>> c = prepare(p, cache_dir=tempfile.mkdtemp(), out=io.StringIO())
        >>> c.tokenizer.decode(c.train), c.tokenizer.decode(c.validation)
        ('hello wor', 'ld')
    """
    out = out if out is not None else sys.stdout
    if tokenizer is not None:
        kind, vocab_size = tokenizer.kind, None
    check_choice(kind, vocab_size)
    size = check_file(path)
    owner = runs.managing_run(cache_dir or default_cache_dir())
    if owner is not None:                                # the run would delete the cache without a word
        raise DataError(f"the cache folder {cache_dir or default_cache_dir()!r} {runs.held_by(owner)}; give the "
                        f"cache a folder of its own ({{cache_dir}})", cache_dir=("cache_dir", "DIR"))
    folder = cache_folder(path, kind, vocab_size, cache_dir, tokenizer=tokenizer)
    progress = _Progress(out)
    started = time.perf_counter()
    sha256 = _source_sha256(path, size, progress)
    if expected_sha256 is not None and sha256 != expected_sha256:
        progress.done()
        raise SourceChangedError(path)
    corpus, problem = _load(folder, path, size, sha256, kind, tokenizer, tokenizer is None)
    if corpus is not None:
        progress.done()
        print(f"Data: {_shown(path)}, prepared before ({describe(corpus)}); text and cache checked in "
              f"{time.perf_counter() - started:.1f} s", file=out)
        return corpus
    if problem:
        print(f"The cache {_shown(folder)} {problem}; preparing again", file=out)
    split_at = _char_boundary_in_file(path, train_boundary(size))
    learned = tokenizer is None
    if learned:
        tokenizer = tokenizers_.learn(kind, tokenizers_.Source(lambda: _code_points_seen(path, size, progress),
                                                              lambda: _bpe_training_texts(path, split_at)), vocab_size)
    corpus = _build(folder, path, size, sha256, split_at, tokenizer, progress, learned)
    progress.done()
    elapsed = time.perf_counter() - started
    print(f"Data: prepared {_shown(path)} ({describe(corpus)}) in {elapsed:.2f} s, {size / 1e6 / elapsed:,.1f} MB/s; "
          f"cached in {_shown(folder)}", file=out)
    return corpus


def _shown(path: str) -> str:
    """A path for a message: a byte of its name that is not UTF-8 written as an escape."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def describe(corpus: Corpus) -> str:
    """Example:
        >>> describe(Corpus.from_text("hello world"))
        'char (8 ids) tokenizer, 11 tokens: 9 train, 2 validate'
    """
    return (f"{tokenizers_.describe(corpus.tokenizer)} tokenizer, {len(corpus.ids):,} tokens: "
            f"{corpus.boundary:,} train, {len(corpus.ids) - corpus.boundary:,} validate")


def _build(folder: str, path: str, size: int, sha256: str, split_at: int, tokenizer: Tokenizer, progress,
           learned: bool) -> Corpus:
    """Pass 2: encode the file into a new cache folder, renamed into place when complete.
    learned: the tokenizer was learned from this text (else given: a run's own)."""
    dtype = ids_dtype(tokenizer.vocab_size)
    parent = os.path.dirname(folder)
    made, tmp = [], None
    try:
        made = runs.make_dirs(parent)
        runs.remove_abandoned(parent, "prepare")        # folders of killed preparations
        tmp = tempfile.mkdtemp(prefix=runs.owned_prefix("prepare"), dir=parent)
    except OSError as e:
        runs.remove_made(made)
        raise _cache_error(parent, e, "give the cache a writable folder ({cache_dir})") from None
    aside = None
    try:
        os.chmod(tmp, runs.dir_mode())
        digest, count, boundary = hashlib.sha256(), 0, None
        encoded = hashlib.sha256()                       # of the text's bytes as encoded: what the manifest names
        # bpe encodes the two splits apart, so no token straddles the boundary.
        ranges = [(0, split_at), (split_at, size)] if tokenizer.splits_text else [(0, size)]
        with open(os.path.join(tmp, "tokens.bin"), "wb") as f:
            for start, end in ranges:
                for offset, raw in chunks(path, start=start, end=end):
                    encoded.update(raw)
                    # the document's start (a BOS, a prepended space) once, not at every piece
                    ids = tokenizer.encode_utf8(raw, starts_document=offset == 0)
                    blob = ids.astype(dtype).tobytes()
                    f.write(blob)
                    digest.update(blob)
                    count += len(blob) // dtype.itemsize
                    progress("encoding", offset + len(raw), size)
                boundary = count if boundary is None else boundary
            f.flush()
            os.fsync(f.fileno())
        if encoded.hexdigest() != sha256:                # the file changed (grew, was edited) while being read
            raise DataError(f"data file {_shown(path)!r} changed while it was being prepared (its SHA-256 differs "
                            f"from a moment before); prepare it again once nothing writes to it")
        if not tokenizer.splits_text:
            boundary = train_boundary(count)
        manifest = {"version": MANIFEST_VERSION,
                    "source": {"path": os.path.abspath(path), "bytes": size, "sha256": sha256},
                    "tokenizer": tokenizer.to_meta(),
                    "tokenizer_sha256": tokenizer_sha256(tokenizer), "learned": learned,
                    "tokens": {"file": "tokens.bin", "dtype": dtype.name, "count": count,
                               "sha256": digest.hexdigest(),
                               "mtime_ns": os.stat(os.path.join(tmp, "tokens.bin")).st_mtime_ns},
                    "boundary": boundary}
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        os.chmod(os.path.join(tmp, "manifest.json"), runs.file_mode())
        os.chmod(os.path.join(tmp, "tokens.bin"), runs.file_mode())
        made_meanwhile, _ = _load(folder, path, size, sha256, tokenizer.kind, tokenizer, learned)
        if made_meanwhile is not None:                  # by another process of a multi-process run
            return made_meanwhile
        if os.path.exists(folder):                      # the stale cache: aside, then gone
            aside = tempfile.mkdtemp(prefix=runs.owned_prefix("prepare"), dir=parent)
            os.rename(folder, os.path.join(aside, "stale"))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.isdir(folder):               # else another process made it meanwhile: use theirs
                raise
    except OSError as e:
        raise _cache_error(parent, e, "free some space or give the cache another folder ({cache_dir})") from None
    finally:
        for leftover in (tmp, aside):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
        if sys.exc_info()[0] is not None:               # failed: no empty folder of ours is left behind
            runs.remove_made(made)
    corpus, problem = _load(folder, path, size, sha256, tokenizer.kind, tokenizer, learned)
    if corpus is None:
        raise DataError(f"the cache {folder} {problem} right after it was written; check the disk")
    return corpus


def _cache_error(parent: str, error: OSError, fix: str) -> Exception:
    """A failed write of the cache: StorageError (exit 1) when the disk failed (full,
    read-only), else DataError (exit 2: bad input) saying what to change."""
    if error.errno in runs.STORAGE_ERRNOS:
        return StorageError(parent, error)
    return DataError(f"cannot write the cache in {parent!r}: {error.strerror or error}; {fix}",
                     cache_dir=("cache_dir", "DIR"))


def largest_id(ids: np.ndarray, chunk: int = 1 << 24) -> int:
    """The largest id of a token array (a memory map: read a chunk at a time, its pages
    released after each, so resident memory stays bounded).

    Example:
        >>> largest_id(np.array([3, 9, 2], np.uint8), chunk=2)
        9
    """
    largest = -1
    for start in range(0, len(ids), chunk):
        largest = max(largest, int(ids[start:start + chunk].max()))
        unmap_pages(ids)
    return largest


def unmap_pages(ids: np.ndarray) -> None:
    """Drop a memory map's pages from this process's resident memory (they stay in the
    OS's page cache, so nothing is read again from disk unless memory is short).

    Without it the resident size grows with the corpus: each window read maps the
    whole neighbourhood the kernel read around it (measured: 2048 random 65-byte
    windows of a 1 GB map added 900 MB of resident memory; after this call, 18 MB).

    Example:
        >>> unmap_pages(np.zeros(3))            # not a memory map: nothing to do
    """
    mapped = getattr(ids, "_mmap", None)                     # np.memmap, and its slices
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """The tokenizer's identity: the SHA-256 of its canonical description.

    Example:
        >>> tokenizer_sha256(CharTokenizer("ab")) == tokenizer_sha256(CharTokenizer.from_text("abba"))
        True
    """
    return sha256_text(tokenizers_.meta_json(tokenizer))


def _load(folder: str, path: str, size: int, sha256: str, kind: str, tokenizer: Tokenizer | None,
          learned: bool) -> tuple[Corpus | None, str]:
    """(the cached corpus, "") when folder holds a valid preparation of this source by a
    tokenizer of this kind (equal to `tokenizer` when one is given; learned from the
    text when `learned`), else (None, what is wrong: "" when there is no cache at all)."""
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.exists(manifest_path):
        return None, ("holds no manifest (an unfinished or foreign cache)" if os.path.exists(folder) else "")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        tokens, source = manifest["tokens"], manifest["source"]
        if not (isinstance(tokens, dict) and isinstance(source, dict) and tokens.get("file") == "tokens.bin"):
            raise ValueError
        cached_tokenizer = tokenizers_.from_meta(manifest["tokenizer"])
        if manifest["tokenizer_sha256"] != tokenizer_sha256(cached_tokenizer):
            return None, "has a tokenizer that changed since it was written (its SHA-256 differs)"
        dtype = np.dtype(tokens["dtype"])
        count, boundary = tokens["count"], manifest["boundary"]
        if (manifest["version"] != MANIFEST_VERSION or dtype != ids_dtype(cached_tokenizer.vocab_size)
                or not isinstance(manifest["learned"], bool)
                or not isinstance(count, int) or not isinstance(boundary, int) or not 0 <= boundary <= count):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError, tokenizers_.MissingTokenizersError):
        return None, "has a damaged or foreign manifest"
    if not cached_tokenizer.splits_text and boundary != train_boundary(count):
        return None, "has a damaged manifest (its train/validation boundary is not at 90%)"
    if source.get("sha256") != sha256 or source.get("bytes") != size:
        return None, f"was made from another version of {path} (its SHA-256 differs)"
    if type(cached_tokenizer) is not tokenizers_.CLASSES[kind] or (learned and not manifest["learned"]) or (
            tokenizer is not None and tokenizers_.meta_json(cached_tokenizer) != tokenizers_.meta_json(tokenizer)):
        return None, "was made with another tokenizer than this one"
    tokens_path = os.path.join(folder, tokens.get("file", ""))
    try:
        stat = os.stat(tokens_path)
        if stat.st_size != count * dtype.itemsize:
            return None, "has a truncated or overlong tokens.bin"
        # Its time, not its SHA-256 (recorded too): hashing 2 GB of ids at every start
        # would cost seconds; any write to the file changes the time.
        if stat.st_mtime_ns != tokens.get("mtime_ns"):
            return None, "has a tokens.bin that changed since it was written (its modification time differs)"
        ids = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(count,))
    except (OSError, ValueError):
        return None, "has a missing or unreadable tokens.bin"
    largest = largest_id(ids)
    if largest >= cached_tokenizer.vocab_size:         # a tokens.bin copied in with its time kept (cp -p, rsync -a)
        return None, (f"has token ids up to {largest}, beyond its tokenizer's {cached_tokenizer.vocab_size} (a "
                      f"tokens.bin from elsewhere)")
    return Corpus(cached_tokenizer, ids, boundary, {"path": os.path.abspath(path), "sha256": sha256}, folder), ""
