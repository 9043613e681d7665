"""Token ids to batches: device-sampled or memory-mapped, validation windows, prefetch; and the download of Tiny Shakespeare."""

from __future__ import annotations

import functools
import hashlib
import os
import queue
import tempfile
import threading
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn import corpus, runs, signals
from minitx_fn.corpus import BUILTIN_CORPUS, BUILTIN_REPEATS, builtin_text  # noqa: F401  (re-exported)
from minitx_fn.errors import DataError

# Tiny Shakespeare, as nanoGPT and char-rnn use it.
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"   # 1,115,394 characters


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
    try:
        made = runs.make_dirs(folder)
        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=folder)
    except OSError as e:
        runs.remove_made(made)
        raise DataError(f"cannot write into {folder!r}: {e.strerror or e}; choose another path") from None
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    while chunk := response.read(1 << 20):
                        digest.update(chunk)
                        f.write(chunk)
                        signals.check()               # a stop signal: the partial file is removed below
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
            runs.remove_made(made)                            # only what this call made, never a folder it found


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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


EVAL_SAMPLE_SEED = 0      # one fixed sample of validation windows for every run, so curves compare


class Windows:
    """W windows of T + 1 ids of a token array (in memory or memory-mapped), gathered
    only when a slice is asked for: (W, T + 1) int32 without ever holding all of them.

    Example:
        >>> w = Windows(np.arange(20, dtype=np.uint8), np.array([0, 10]), 4)
        >>> len(w), w[1:].tolist()
        (2, [[10, 11, 12, 13, 14]])
    """

    def __init__(self, ids: np.ndarray, starts: np.ndarray, context: int):
        self.ids, self.starts, self.context = ids, np.asarray(starts, np.int64), context

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def shape(self) -> tuple[int, int]:
        """(W, T + 1), as the array it stands for."""
        return len(self.starts), self.context + 1

    def __getitem__(self, rows: slice) -> np.ndarray:
        starts = self.starts[rows]
        windows = np.asarray(self.ids[starts[:, None] + np.arange(self.context + 1)], np.int32)
        corpus.unmap_pages(self.ids)
        return windows

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


def windows_in(n_tokens: int, context: int) -> int:
    """How many consecutive windows of T + 1 ids, stepping by T, a split of n_tokens holds.

    Example:
        >>> windows_in(9, 4), windows_in(8, 4)
        (2, 1)
    """
    return max(n_tokens - 1, 0) // context


def eval_windows(ids: np.ndarray, context: int, max_tokens: int | None = None) -> Windows:
    """(N,) -> W windows of T + 1 ids. All of them (max_tokens None): consecutive windows
    stepping by T, so every position of the split but a final stub is predicted exactly
    once. Else a fixed sample (seed EVAL_SAMPLE_SEED, whatever the run's seed) of
    ceil(max_tokens / T) of those windows, in order: the same windows at every
    evaluation and in every run on this data, so the curves stay comparable.

    Example:
        >>> np.asarray(eval_windows(np.arange(9), 4))
        array([[0, 1, 2, 3, 4],
               [4, 5, 6, 7, 8]], dtype=int32)
        >>> sample = eval_windows(np.arange(1000), 4, max_tokens=8)    # 2 of the 249 windows
        >>> len(sample), bool((sample.starts % 4 == 0).all())
        (2, True)
    """
    n_windows = windows_in(len(ids), context)
    chosen = np.arange(n_windows)
    if max_tokens is not None and max_tokens < n_windows * context:
        sample = -(-max_tokens // context)
        chosen = np.sort(np.random.default_rng(EVAL_SAMPLE_SEED).choice(n_windows, sample, replace=False))
    return Windows(ids, chosen * context, context)


def batch_starts(data_key, step: int, *, n_tokens: int, batch_size: int, context: int) -> np.ndarray:
    """(B,) the offsets of step t's windows in a text of n_tokens: the very offsets
    `sample_batch` draws on the device, computed on the host's CPU.

    Example:
        >>> import jax
        >>> starts = batch_starts(jax.random.key(0), 3, n_tokens=100, batch_size=2, context=4)
        >>> x, _ = sample_batch(jnp.arange(100), jax.random.fold_in(jax.random.key(0), 3), batch_size=2, context=4)
        >>> bool((starts == np.asarray(x[:, 0])).all())
        True
    """
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return np.asarray(_starts(data_key, step, n_tokens=n_tokens, batch_size=batch_size, context=context))


@functools.partial(jax.jit, static_argnames=("n_tokens", "batch_size", "context"))
def _starts(data_key, step, *, n_tokens: int, batch_size: int, context: int) -> jax.Array:
    key = jax.random.fold_in(data_key, step)
    return jax.random.randint(key, (batch_size, 1), 0, n_tokens - context)[:, 0]


def host_batch_at(ids: np.ndarray, data_key, step: int, *, batch_size: int, context: int,
                  sharding=None) -> tuple[jax.Array, jax.Array]:
    """The batch of step t gathered on the host from ids (N,) (a memory map: only the
    windows are read) and put on the device: equal, bit for bit, to
    `train.batch_at(jnp.asarray(ids), data_key, t)`. With a sharding along B, each
    process reads only the rows its own devices hold.

    Example:
        >>> import jax
        >>> from minitx_fn import train
        >>> ids = np.arange(100, dtype=np.uint16) % 7
        >>> a = host_batch_at(ids, jax.random.key(0), 5, batch_size=3, context=4)
        >>> b = train.batch_at(jnp.asarray(ids, jnp.int32), jax.random.key(0), 5, batch_size=3, context=4)
        >>> all(bool((u == v).all()) for u, v in zip(a, b))
        True
    """
    starts = batch_starts(data_key, step, n_tokens=len(ids), batch_size=batch_size, context=context)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    windows = Windows(ids, starts, context)
    rows = {}

    def part(index, offset):          # index: this device's (rows, columns) of the (B, T) batch
        key = (index[0].start, index[0].stop)
        if key not in rows:
            rows[key] = windows[index[0]]
        return rows[key][:, offset:offset + context]

    return tuple(jax.make_array_from_callback((batch_size, context), sharding, functools.partial(part, offset=o))
                 for o in (0, 1))


class Prefetcher:
    """next_batch(t) for t = start, start + 1, ...: each batch made by make(t) in a
    background thread, up to `depth` steps ahead, so the step does not wait for the
    host to read and copy it. Errors in the thread are raised by the call that
    wanted the batch. Use as a context manager (the thread stops on exit).

    Example:
        >>> with Prefetcher(lambda t: t * t, start=3) as next_batch:
        ...     [next_batch(t) for t in (3, 4, 5)]
        [9, 16, 25]
    """

    DEPTH = 2

    def __init__(self, make, start: int, depth: int = DEPTH):
        self.make, self.expected = make, start
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._work, args=(start,), daemon=True, name="minitx-prefetch")
        self.thread.start()

    def _work(self, step: int) -> None:
        while not self.stopping.is_set():
            try:
                item = (step, self.make(step))
            except BaseException as e:          # handed to the consumer, raised there
                item = (step, e)
            while not self.stopping.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if isinstance(item[1], BaseException):
                return
            step += 1

    def __call__(self, step: int):
        if step != self.expected:
            raise ValueError(f"batches are prefetched in order: expected step {self.expected}, got {step}")
        _, batch = self.queue.get()
        if isinstance(batch, BaseException):
            raise batch
        self.expected += 1
        return batch

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
