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
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from minitx_fn import runs, tokenizer as tokenizers_
from minitx_fn.errors import DataError
from minitx_fn.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer

MANIFEST_VERSION = 1
CHUNK_BYTES = 16 << 20
TRAIN_FRACTION = 0.9
BPE_TRAINING_BYTES = 64 << 20      # the merges are learned from at most this much of the training split
BPE_PIECE_CHARS = 1 << 16          # text handed to tokenizers.encode_batch in pieces of about this size
BPE_PIECES_PER_BATCH = 16          # pieces per encode_batch call: bounds its memory
BPE_HARD_CUT_CHARS = 4096          # a piece's length where the text has no newline or space to cut at
DEFAULT_BPE_VOCAB = 4096
MAX_BPE_VOCAB = 1 << 20
CACHE_ENV = "MINITX_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token ids of a text with its tokenizer: ids[:boundary] train, ids[boundary:] validate.

    Example:
        >>> c = Corpus.from_text("hello world", "char")
        >>> c.tokenizer.kind, len(c.ids), c.boundary, c.train.dtype
        ('char', 11, 9, dtype('uint8'))
    """

    tokenizer: Tokenizer
    ids: np.ndarray                # (N,) uint8/uint16/uint32: in memory, or a read-only memory map
    boundary: int
    folder: str | None = None      # the cache folder, None for a text prepared in memory
    source: dict | None = None     # {"path", "sha256"} of the text file, None for a text in memory

    @property
    def train(self) -> np.ndarray:
        return self.ids[:self.boundary]

    @property
    def validation(self) -> np.ndarray:
        return self.ids[self.boundary:]

    @classmethod
    def from_text(cls, text: str, kind: str = "char", vocab_size: int | None = None,
                  tokenizer: Tokenizer | None = None) -> "Corpus":
        """A text in memory (the built-in corpus), tokenized and split like a file."""
        if tokenizer is None:
            check_choice(kind, vocab_size)
            tokenizer = _new_tokenizer(kind, vocab_size, lambda: tokenizers_.code_points(text),
                                       [text[:_bpe_split(text)]])
        if tokenizer.kind == "bpe":
            cut = _bpe_split(text)
            parts = [tokenizer.encode(text[:cut]), tokenizer.encode(text[cut:])]
            ids, boundary = np.concatenate(parts), len(parts[0])
        else:
            ids = tokenizer.encode(text)
            boundary = int(len(ids) * TRAIN_FRACTION)
        return cls(tokenizer, ids.astype(ids_dtype(tokenizer.vocab_size)), boundary)


def ids_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds ids < vocab_size.

    Example:
        >>> [ids_dtype(v).name for v in (65, 256, 257, 50257, 70000)]
        ['uint8', 'uint8', 'uint16', 'uint16', 'uint32']
    """
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


def default_cache_dir(environ=os.environ) -> str:
    """$MINITX_CACHE_DIR, else $XDG_CACHE_HOME/minitx, else ~/.cache/minitx.

    Example:
        >>> default_cache_dir({"MINITX_CACHE_DIR": "/c", "XDG_CACHE_HOME": "/x"})
        '/c'
        >>> default_cache_dir({"XDG_CACHE_HOME": "/x"})
        '/x/minitx'
    """
    if environ.get(CACHE_ENV):
        return environ[CACHE_ENV]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "minitx")


def cache_folder(path: str, kind: str, vocab_size: int | None, cache_dir: str | None = None) -> str:
    """Where the preparation of this file with this tokenizer lives:
    CACHE/<file name>-<hash of its absolute path>/<kind>[-<vocab size>].

    Example:
        >>> cache_folder("/data/big.txt", "bpe", None, "/cache")
        '/cache/big.txt-8ef372f15de0/bpe-4096'
    """
    absolute = os.path.abspath(path)
    # At most 100 characters of the file's name: a folder name must fit in 255 bytes.
    name = (os.path.basename(absolute)[:100] + "-"
            + hashlib.sha256(absolute.encode("utf-8", "surrogatepass")).hexdigest()[:12])
    spec = kind if kind != "bpe" else f"bpe-{vocab_size or DEFAULT_BPE_VOCAB}"
    return os.path.join(cache_dir or default_cache_dir(), name, spec)


# ----------------------------------------------------------------------------- reading a file in chunks


def check_file(path: str) -> int:
    """The size of the text file at path; DataError for a missing or empty file, a
    directory, or anything else that is not a regular file.

    Example:
        >>> check_file('/tmp')
        Traceback (most recent call last):
        minitx_fn.errors.DataError: data path '/tmp' is a directory; give the path of a text file inside it
    """
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist; give the path of a UTF-8 text file")
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
                for at, part in _blocks(piece):
                    if not part.isascii():
                        try:
                            part.decode("utf-8")
                        except UnicodeDecodeError as e:
                            raise DataError(f"data file {path!r} is not UTF-8 text (invalid byte at offset "
                                            f"{offset + at + e.start}); convert it to UTF-8, e.g. with "
                                            f"iconv") from None
                yield offset, piece
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
    if vocab_size is not None and kind != "bpe":
        raise DataError(f"the {kind} tokenizer has a fixed vocabulary; {{vocab_size}} is for bpe",
                        vocab_size=("vocab_size", vocab_size))
    if vocab_size is not None and not 256 <= vocab_size <= MAX_BPE_VOCAB:
        raise DataError(f"{{vocab_size}} must lie in [256, {MAX_BPE_VOCAB:,}]: the 256 bytes, then merges",
                        vocab_size=("vocab_size", vocab_size))
    if kind == "bpe":
        tokenizers_.require_tokenizers()


def _new_tokenizer(kind: str, vocab_size: int | None, char_points, bpe_texts) -> Tokenizer:
    """A tokenizer made from the data: char_points() -> the code points seen (char);
    bpe_texts, an iterable of the training text (bpe)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.from_code_points(char_points())
    return BPETokenizer.train(bpe_texts, vocab_size or DEFAULT_BPE_VOCAB)


def _source_sha256(path: str, size: int, progress) -> str:
    """Pass 1, all that a valid cache costs: the text's SHA-256 (its UTF-8 is checked by
    the passes that read characters, when there is something to prepare)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                digest.update(block)
                progress("checking", f.tell(), size)
    except OSError as e:
        raise DataError(f"cannot read data file {path!r}: {e.strerror}; check its permissions") from None
    return digest.hexdigest()


def _code_points_seen(path: str, size: int, progress) -> np.ndarray:
    """The sorted distinct code points of the text: a flag per Unicode code point."""
    seen = np.zeros(tokenizers_.MAX_CODE_POINT + 1, bool)
    for offset, raw in chunks(path):
        for points in _points(raw):
            seen[points] = True
        progress("reading the characters", offset + len(raw), size)
    return np.flatnonzero(seen)


def _char_boundary(raw: bytes, end: int) -> int:
    """The largest cut <= end that does not fall inside a UTF-8 character of raw."""
    cut = max(0, min(end, len(raw)))
    while 0 < cut < len(raw) and raw[cut] & 0xC0 == 0x80:      # a continuation byte
        cut -= 1
    return cut


def _bpe_split(text: str) -> int:
    """The character index before which 90% of the text's UTF-8 bytes lie."""
    raw = text.encode("utf-8")
    return len(raw[:_char_boundary(raw, int(len(raw) * TRAIN_FRACTION))].decode("utf-8"))


BLOCK_BYTES = 1 << 16


def _blocks(raw: bytes):
    """(offset, block) of raw in blocks of about BLOCK_BYTES, cut between characters.
    Most blocks of most texts are ASCII: those take the fast paths."""
    start = 0
    while start < len(raw):
        end = _char_boundary(raw, start + BLOCK_BYTES) if start + BLOCK_BYTES < len(raw) else len(raw)
        end = end if end > start else min(start + BLOCK_BYTES, len(raw))
        yield start, raw[start:end]
        start = end


def _points(raw: bytes):
    """UTF-8 bytes (whole characters) -> code points, a block at a time: the bytes
    themselves for an ASCII block, decoded to UTF-32 otherwise."""
    for _, block in _blocks(raw):
        yield np.frombuffer(block, np.uint8) if block.isascii() else tokenizers_.code_points(block.decode("utf-8"))


def _bpe_training_texts(path: str, split_at: int):
    """The training split's text, at most its first BPE_TRAINING_BYTES, in pieces."""
    end = _char_boundary_in_file(path, min(split_at, BPE_TRAINING_BYTES))
    for _, raw in chunks(path, end=end):
        # In pieces: tokenizers holds a whole string's pre-tokenization while it counts,
        # so 16 MB strings took 1.35 GB of memory to learn from 15 MB; 64 KB ones, 150 MB.
        yield from _bpe_pieces(raw.decode("utf-8"))


def _char_boundary_in_file(path: str, at: int) -> int:
    with open(path, "rb") as f:
        f.seek(max(at - 3, 0))
        raw = f.read(6)
    return max(at - 3, 0) + _char_boundary(raw, min(at, 3))


def _bpe_pieces(text: str) -> list[str]:
    """The text cut into pieces of about BPE_PIECE_CHARS for `tokenizers`: after a
    newline, else after a space, within twice that; else (a text without either, where
    BPE's time grows with the square of a word's length) every BPE_HARD_CUT_CHARS."""
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


def _encode_chunk(tokenizer: Tokenizer, raw: bytes, dtype: np.dtype) -> np.ndarray:
    """Whole UTF-8 characters -> ids of dtype, the fastest way each kind allows."""
    if tokenizer.kind == "byte":
        return np.frombuffer(raw, np.uint8)
    if tokenizer.kind == "char":
        ids, n = np.empty(len(raw), dtype), 0                 # at most one character per byte
        for points in _points(raw):
            block = tokenizer.lookup(points)
            if block.min() < 0:                 # a given tokenizer (a resumed run's) lacks a character
                tokenizer.encode(raw.decode("utf-8"))      # raises, naming the characters
            ids[n:n + len(block)] = block
            n += len(block)
        return ids[:n]
    # A few pieces at a time: tokenizers keeps ~100 bytes of offsets and strings per token
    # until a batch returns, so a whole 16 MB chunk at once would take a gigabyte.
    pieces = _bpe_pieces(raw.decode("utf-8"))
    ids = [np.zeros(0, np.int32)]
    for start in range(0, len(pieces), BPE_PIECES_PER_BATCH):
        ids += tokenizer.encode_batch(pieces[start:start + BPE_PIECES_PER_BATCH])
    return np.concatenate(ids).astype(dtype)


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
        kind, vocab_size = tokenizer.kind, (tokenizer.vocab_size if tokenizer.kind == "bpe" else None)
    check_choice(kind, vocab_size)
    size = check_file(path)
    folder = cache_folder(path, kind, vocab_size, cache_dir)
    progress = _Progress(out)
    started = time.perf_counter()
    sha256 = _source_sha256(path, size, progress)
    if expected_sha256 is not None and sha256 != expected_sha256:
        progress.done()
        raise SourceChangedError(path)
    corpus, problem = _load(folder, path, size, sha256, kind, tokenizer)
    if corpus is not None:
        progress.done()
        print(f"Data: {_shown(path)}, prepared before ({describe(corpus)}); text and cache checked in "
              f"{time.perf_counter() - started:.1f} s", file=out)
        return corpus
    if problem:
        print(f"The cache {_shown(folder)} {problem}; preparing again", file=out)
    split_at = _char_boundary_in_file(path, int(size * TRAIN_FRACTION))
    if tokenizer is None:
        tokenizer = _new_tokenizer(kind, vocab_size, lambda: _code_points_seen(path, size, progress),
                                   _bpe_training_texts(path, split_at))
    corpus = _build(folder, path, size, sha256, split_at, tokenizer, progress)
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


def _build(folder: str, path: str, size: int, sha256: str, split_at: int, tokenizer: Tokenizer, progress) -> Corpus:
    """Pass 2: encode the file into a new cache folder, renamed into place when complete."""
    dtype = ids_dtype(tokenizer.vocab_size)
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, mode=runs.dir_mode(), exist_ok=True)
        runs.remove_abandoned(parent, "prepare")        # folders of killed preparations
        tmp = tempfile.mkdtemp(prefix=runs.owned_prefix("prepare"), dir=parent)
    except OSError as e:
        raise DataError(f"cannot write the cache in {parent!r}: {e.strerror or e}; give --cache-dir a writable "
                        f"folder") from None
    aside = None
    try:
        os.chmod(tmp, runs.dir_mode())
        digest, count, boundary = hashlib.sha256(), 0, None
        # bpe encodes the two splits apart, so no token straddles the boundary.
        ranges = [(0, split_at), (split_at, size)] if tokenizer.kind == "bpe" else [(0, size)]
        with open(os.path.join(tmp, "tokens.bin"), "wb") as f:
            for start, end in ranges:
                for offset, raw in chunks(path, start=start, end=end):
                    blob = _encode_chunk(tokenizer, raw, dtype).tobytes()
                    f.write(blob)
                    digest.update(blob)
                    count += len(blob) // dtype.itemsize
                    progress("encoding", offset + len(raw), size)
                boundary = count if boundary is None else boundary
            f.flush()
            os.fsync(f.fileno())
        if tokenizer.kind != "bpe":
            boundary = int(count * TRAIN_FRACTION)          # as data.split: the char path is unchanged
        manifest = {"version": MANIFEST_VERSION,
                    "source": {"path": os.path.abspath(path), "bytes": size, "sha256": sha256},
                    "tokenizer": tokenizer.to_meta(),
                    "tokenizer_sha256": _sha256_text(tokenizers_.meta_json(tokenizer)),
                    "tokens": {"file": "tokens.bin", "dtype": dtype.name, "count": count,
                               "sha256": digest.hexdigest(),
                               "mtime_ns": os.stat(os.path.join(tmp, "tokens.bin")).st_mtime_ns},
                    "boundary": boundary}
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        os.chmod(os.path.join(tmp, "manifest.json"), runs.file_mode())
        os.chmod(os.path.join(tmp, "tokens.bin"), runs.file_mode())
        made_meanwhile, _ = _load(folder, path, size, sha256, tokenizer.kind, tokenizer)
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
        raise DataError(f"cannot write the cache in {parent!r}: {e.strerror or e}; free some space or give "
                        f"--cache-dir another folder") from None
    finally:
        for leftover in (tmp, aside):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
    corpus, problem = _load(folder, path, size, sha256, tokenizer.kind, tokenizer)
    if corpus is None:
        raise DataError(f"the cache {folder} {problem} right after it was written; check the disk")
    return corpus


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _load(folder: str, path: str, size: int, sha256: str, kind: str,
          tokenizer: Tokenizer | None) -> tuple[Corpus | None, str]:
    """(the cached corpus, "") when folder holds a valid preparation of this source by a
    tokenizer of this kind (equal to `tokenizer` when one is given), else (None, what is
    wrong: "" when there is no cache at all)."""
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
        if manifest["tokenizer_sha256"] != _sha256_text(tokenizers_.meta_json(cached_tokenizer)):
            return None, "has a tokenizer that changed since it was written (its SHA-256 differs)"
        dtype = np.dtype(tokens["dtype"])
        count, boundary = tokens["count"], manifest["boundary"]
        if (manifest["version"] != MANIFEST_VERSION or dtype != ids_dtype(cached_tokenizer.vocab_size)
                or not isinstance(count, int) or not isinstance(boundary, int) or not 0 <= boundary <= count):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError, tokenizers_.MissingTokenizersError):
        return None, "has a damaged or foreign manifest"
    if cached_tokenizer.kind != "bpe" and boundary != int(count * TRAIN_FRACTION):
        return None, "has a damaged manifest (its train/validation boundary is not at 90%)"
    if source.get("sha256") != sha256 or source.get("bytes") != size:
        return None, f"was made from another version of {path} (its SHA-256 differs)"
    if cached_tokenizer.kind != kind or (
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
    return Corpus(cached_tokenizer, ids, boundary, folder, {"path": os.path.abspath(path), "sha256": sha256}), ""
