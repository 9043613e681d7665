"""Text in, token ids out: the built-in corpus, reading files, splits and batches."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn import runs
from minitx_fn.errors import DataError

# The built-in corpus is a cycle of three phrases. Training text is the cycle
# repeated, so the model also sees the wrap from "flax! " back to "hello world!".
BUILTIN_CORPUS = "hello world! hello jax! hello flax! "
BUILTIN_REPEATS = 8

# Tiny Shakespeare, as nanoGPT and char-rnn use it.
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"   # 1,115,394 characters


def builtin_text() -> str:
    """The built-in training text: the corpus cycle repeated.

    Example:
        >>> builtin_text()[:24]
        'hello world! hello jax! '
    """
    return BUILTIN_CORPUS * BUILTIN_REPEATS


def read_text(path: str) -> str:
    """The whole file as text; DataError for a missing, unreadable, non-UTF-8 or empty file.

    Example:
        >>> read_text('/no/such/file')
        Traceback (most recent call last):
        minitx_fn.errors.DataError: data file '/no/such/file' does not exist; give the path of a UTF-8 text file
    """
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist; give the path of a UTF-8 text file")
    if os.path.isdir(path):
        raise DataError(f"data path {path!r} is a directory; give the path of a text file inside it")
    if not os.path.isfile(path):
        raise DataError(f"data path {path!r} is not a regular file; give the path of a UTF-8 text file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read data file {path!r}: {e.strerror}; check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path!r} is not UTF-8 text (invalid byte at offset {e.start}); "
                        f"convert it to UTF-8, e.g. with iconv") from None
    if not text:
        raise DataError(f"data file {path!r} is empty; give it some text to learn from")
    return text


class DownloadError(Exception):
    """A download failed (no network, a wrong checksum); the message says what to do instead."""


def download(url: str, path: str, sha256: str, *, timeout: float = 60.0) -> bool:
    """Fetch url into path if the file there is not already the one with this SHA-256.

    The bytes go to a temporary file beside path and are renamed into place only after
    their SHA-256 matched, so path never holds a partial or wrong file. Returns False
    when path already held the file, True when it was downloaded. DownloadError
    otherwise; DataError if path holds a different file (it is never overwritten).

    Example:
        >>> src = os.path.join(tempfile.mkdtemp(), "src.txt")
        >>> _ = open(src, "w").write("to be")
        >>> dst = os.path.join(tempfile.mkdtemp(), "copy.txt")
        >>> download("file://" + src, dst, hashlib.sha256(b"to be").hexdigest()), open(dst).read()
        (True, 'to be')
    """
    if not path:
        raise DataError("the output path is empty; give a file path")
    if os.path.isdir(path):
        raise DataError(f"{path!r} is a directory; give a file path")
    if os.path.exists(path):
        try:
            same = _file_sha256(path) == sha256
        except OSError as e:
            raise DataError(f"cannot read {path!r}: {e.strerror}") from None
        if same:
            return False
        raise DataError(f"{path!r} exists and is not the expected file (its SHA-256 differs); move it away or "
                        f"choose another path")
    folder = os.path.dirname(os.path.abspath(path))
    made = []                                                  # the folders this call creates, deepest first
    missing = folder
    while not os.path.exists(missing):
        made.append(missing)
        missing = os.path.dirname(missing)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=folder)
    except OSError as e:
        raise DataError(f"cannot write into {folder!r}: {e.strerror or e}; choose another path") from None
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    while chunk := response.read(1 << 20):
                        digest.update(chunk)
                        f.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise DownloadError(f"cannot download {url}: {reason}. Without a network, fetch the file elsewhere "
                                    f"and put it at {path} (SHA-256 {sha256})") from None
        if digest.hexdigest() != sha256:
            raise DownloadError(f"the file at {url} has SHA-256 {digest.hexdigest()}, not the expected {sha256}; "
                                f"nothing was written to {path}")
        try:
            os.chmod(tmp, runs.file_mode())                   # mkstemp makes it 0600
            os.replace(tmp, path)
        except OSError as e:
            raise DownloadError(f"cannot write {path!r}: {e.strerror or e}; nothing was written there") from None
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not os.path.exists(path):
            for made_folder in made:                          # only what this call made, never a folder it found
                try:
                    os.rmdir(made_folder)
                except OSError:
                    break


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    """SHA-256 of the text's UTF-8 bytes, in hex: what a checkpoint records of its data.

    Example:
        >>> text_sha256("hello")[:16]
        '2cf24dba5fb0a30e'
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split(ids: np.ndarray, train_fraction: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """(N,) -> first 90% for training, last 10% for validation.

    Example:
        >>> [len(a) for a in split(np.arange(100))]
        [90, 10]
    """
    n = int(len(ids) * train_fraction)
    return ids[:n], ids[n:]


def check_length(ids: np.ndarray, context: int, what: str) -> None:
    """DataError unless ids (N,) holds at least one window: N >= context + 1.

    Example:
        >>> check_length(np.arange(5), 8, 'training')
        Traceback (most recent call last):
        minitx_fn.errors.DataError: the training text has 5 tokens, fewer than the context plus one (9); use a longer text or a smaller max_len=8
    """
    if len(ids) < context + 1:
        raise DataError(f"the {what} text has {len(ids)} tokens, fewer than the context plus one "
                        f"({context + 1}); use a longer text or a smaller {{context}}", context=("max_len", context))


def sample_batch(data: jax.Array, key: jax.Array, *, batch_size: int, context: int) -> tuple[jax.Array, jax.Array]:
    """data (N,) int -> inputs x (B, T) and targets y (B, T), y[b, t] = x[b, t + 1] in the text.

    B windows start at uniform random offsets. Runs inside the jitted train step,
    so the data stays on the device and no batch is copied from the host per step.

    Example:
        >>> x, y = sample_batch(jnp.arange(100), jax.random.key(0), batch_size=2, context=4)
        >>> x.shape, bool((y == x + 1).all())
        ((2, 4), True)
    """
    starts = jax.random.randint(key, (batch_size, 1), 0, data.shape[0] - context)    # (B, 1)
    idx = starts + jnp.arange(context)[None, :]                                      # (B, T)
    return data[idx], data[idx + 1]


def eval_windows(ids: np.ndarray, context: int) -> np.ndarray:
    """(N,) -> (W, T + 1): consecutive windows stepping by T, so every position of the
    split (but a final stub shorter than T + 1) is predicted exactly once.

    Example:
        >>> eval_windows(np.arange(9), 4)
        array([[0, 1, 2, 3, 4],
               [4, 5, 6, 7, 8]])
    """
    n_windows = (len(ids) - 1) // context
    idx = np.arange(n_windows)[:, None] * context + np.arange(context + 1)[None, :]
    return ids[idx]
