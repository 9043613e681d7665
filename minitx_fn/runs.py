"""A run directory: what belongs to a run, the lock of the process training into it,
and its metrics log.

    RUN/checkpoint/          the latest checkpoint (`minitx_fn.checkpoint`)
    RUN/checkpoint.old/      the one before, only while a save is between its renames
    RUN/.checkpoint.tmp-*/   a save in progress (left behind only by a killed process)
    RUN/metrics.jsonl        one JSON object per line: the log of the run
    RUN/loss.png             its picture
    RUN/.lock                "PID HOST" of the process training into RUN

Nothing here imports JAX, so the commands that only read a run start fast.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import socket
import stat
import tempfile
from typing import NamedTuple

from minitx_fn.errors import RunDirError, StorageError

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"
LOCK = ".lock"
TEMPORARY_PREFIX = f".{CHECKPOINT}.tmp-"
# What a new run must not overwrite. The lock is not among them: a live one is
# refused by `Lock`, a stale one (its process is gone) is simply taken over.
RUN_FILES = (CHECKPOINT, CHECKPOINT + ".old", METRICS, LOSS_PNG)


def artifacts(run_dir: str) -> list[str]:
    """The names in run_dir that belong to a run (any run): what a new run must not overwrite.

    Example:
        >>> artifacts(tempfile.mkdtemp())
        []
    """
    if not os.path.isdir(run_dir):
        return []
    names = sorted(os.listdir(run_dir))
    return [n for n in names if n in RUN_FILES or n.startswith(TEMPORARY_PREFIX)]


def managing_run(path: str) -> str | None:
    """The run directory one of whose own files or folders (its checkpoint, the previous
    one, a save's temporary folder, which its saves replace whole; its metrics and lock,
    which it writes) is or holds `path` wherever the path really goes (links followed),
    else None: nothing may be written there. (Its loss picture may be drawn again: that
    is what `minitx plot` does.)

    Example:
        >>> run = tempfile.mkdtemp()
        >>> os.makedirs(os.path.join(run, CHECKPOINT))
        >>> managing_run(os.path.join(run, CHECKPOINT, "hf")) == os.path.realpath(run), managing_run(run)
        (True, None)
        >>> managing_run(os.path.join(run, LOCK)) == os.path.realpath(run)
        True
    """
    here = os.path.realpath(path)
    while True:
        parent = os.path.dirname(here)
        name = os.path.basename(here)
        if (name in (CHECKPOINT, CHECKPOINT + ".old", METRICS, LOCK) or name.startswith(TEMPORARY_PREFIX)) \
                and os.path.isdir(os.path.join(parent, CHECKPOINT)):
            return parent
        if parent == here:
            return None
        here = parent


def held_by(owner: str) -> str:
    """The words for a path `managing_run` says a run owns.

    Example:
        >>> held_by("runs/a")[:46]
        "is inside the files of the run 'runs/a' (its c"
    """
    return (f"is inside the files of the run {owner!r} (its checkpoint, metrics or lock), which it replaces "
            f"as it trains")


def not_regular(path: str) -> bool:
    """Whether path exists (links followed) and is neither a regular file nor a folder:
    a FIFO, whose opening blocks until a writer comes (no signal ends it), or a device
    such as /dev/zero, whose reading never ends. Every file of a run is checked before
    it is opened.

    Example:
        >>> not_regular("/dev/zero"), not_regular(tempfile.mkdtemp()), not_regular("/no/such/file")
        (True, False, False)
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_new_run_dir(run_dir: str, *, ignore_temporaries: bool = False) -> None:
    """RunDirError unless a new run can be written to run_dir: it is not a file nor
    inside another run's checkpoint (`managing_run`), holds nothing of another run
    (but, with ignore_temporaries, the temporary folders of a killed save, which the
    caller removes under the lock), and it (or the nearest existing parent) is writable.

    Example:
        >>> check_new_run_dir(os.path.join(tempfile.mkdtemp(), "new-run"))
    """
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"{run_dir!r} is a file, not a directory; choose another run directory")
    owner = managing_run(run_dir)
    if owner is not None:
        raise RunDirError(f"{run_dir!r} {held_by(owner)}; choose another run directory")
    found = [n for n in artifacts(run_dir) if not (ignore_temporaries and n.startswith(TEMPORARY_PREFIX))]
    if found:
        raise RunDirError(f"{run_dir!r} already holds a run ({', '.join(found)}); resume it, or choose another "
                          f"run directory")
    parent = run_dir
    while not os.path.isdir(parent):
        parent = os.path.dirname(os.path.abspath(parent))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise RunDirError(f"cannot create {run_dir!r}: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot create or write {run_dir!r}: {parent!r} is not writable; choose another run "
                          f"directory")


def new_run_name(root: str, name: str) -> str:
    """root/name-NNN for the first NNN not taken.

    Example:
        >>> os.path.basename(new_run_name(tempfile.mkdtemp(), "hello"))
        'hello-001'
    """
    for i in range(1, 100_000):
        path = os.path.join(root, f"{name}-{i:03d}")
        if not os.path.exists(path):
            return path
    raise RunDirError(f"{root!r} holds 99,999 runs named {name}-NNN; choose a run directory")


def remove_temporaries(run_dir: str) -> list[str]:
    """Delete the `.checkpoint.tmp-*` folders a killed save left behind; returns their names.

    Only call it while holding the run's lock: another process's save in progress
    looks the same.

    Example:
        >>> run = tempfile.mkdtemp()
        >>> os.mkdir(os.path.join(run, TEMPORARY_PREFIX + "x"))
        >>> remove_temporaries(run)
        ['.checkpoint.tmp-x']
    """
    found = sorted(glob.glob(os.path.join(glob.escape(run_dir), TEMPORARY_PREFIX + "*")))
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return [os.path.basename(p) for p in found]


def make_dirs(path: str) -> list[str]:
    """os.makedirs(path) with this process's umask; returns the folders it created, deepest
    first, so that a failed write can remove exactly those (`remove_made`) and never a
    folder that was there before.

    Example:
        >>> root = tempfile.mkdtemp()
        >>> [os.path.relpath(p, root) for p in make_dirs(os.path.join(root, "a", "b"))]
        ['a/b', 'a']
    """
    made, missing = [], os.path.abspath(path)
    while not os.path.exists(missing):
        made.append(missing)
        missing = os.path.dirname(missing)
    os.makedirs(path, mode=dir_mode(), exist_ok=True)
    return made


def remove_made(made: list[str]) -> None:
    """Remove the folders `make_dirs` created that are still empty, deepest first.

    Example:
        >>> root = tempfile.mkdtemp()
        >>> remove_made(make_dirs(os.path.join(root, "a", "b"))); os.listdir(root)
        []
    """
    for folder in made:
        try:
            os.rmdir(folder)
        except OSError:
            break


# errno values that mean the storage itself failed (full, read-only, broken): exit status 1, not bad input.
STORAGE_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EIO", "EFBIG")
                           if hasattr(errno, name))


def owned_prefix(kind: str, pid: int | None = None) -> str:
    """`.KIND-PID-`: the start of a temporary folder's name that says which process
    made it, so a later one can tell an abandoned folder from one in progress.

    Example:
        >>> owned_prefix("export", 42)
        '.export-42-'
    """
    return f".{kind}-{pid or os.getpid()}-"


def remove_abandoned(parent: str, kind: str) -> list[str]:
    """Delete the `owned_prefix(kind)` folders in parent whose process is gone (killed);
    another process's folder, still in progress, is left alone. Returns their names.

    Example:
        >>> parent = tempfile.mkdtemp()
        >>> os.mkdir(os.path.join(parent, owned_prefix("export", 2**31 - 2) + "x"))   # no such process
        >>> os.mkdir(os.path.join(parent, owned_prefix("export") + "y"))              # this one
        >>> remove_abandoned(parent, "export"), len(os.listdir(parent))
        (['.export-2147483646-x'], 1)
    """
    removed = []
    for name in sorted(os.listdir(parent)):
        pid = name[len(kind) + 2:].split("-")[0] if name.startswith(f".{kind}-") else ""
        if pid.isdigit() and 0 < int(pid) < 2**31 and not alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
    return removed


# ----------------------------------------------------------------------------- lock


def alive(pid: int) -> bool:
    """Whether a process with this PID (in [1, 2**31)) exists on this machine.

    Example:
        >>> alive(os.getpid())
        True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # exists, owned by someone else
        return True
    return True


class Lock:
    """`with Lock(run_dir) as lock:` holds RUN/.lock while a process trains into RUN.

    The lock file is written whole under a temporary name and linked into place, so
    it always holds "PID HOST". A lock whose process is gone (same host, no such
    PID) is stale: it is taken over, and `lock.took_over` says from which PID.

    Example:
        >>> run = tempfile.mkdtemp()
        >>> with Lock(run):
        ...     Lock(run).__enter__()
        Traceback (most recent call last):
        minitx_fn.errors.RunDirError: ... is in use by another process (PID ...); wait for it to finish, or choose another run directory
    """

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.took_over: int | None = None

    def _holder(self) -> tuple[int, str] | None:
        if not_regular(self.path):                          # a pipe would block the read: unreadable
            return None
        try:
            with open(self.path) as f:
                pid, host = f.read().split()
            pid = int(pid)
        except (OSError, ValueError):
            return None
        return (pid, host) if 0 < pid < 2**31 else None     # no process has another PID (0 and -n are groups)

    def live_holder(self) -> str | None:
        """"PID n" (and " on HOST" from another machine) of a live process holding the lock, else None."""
        holder = self._holder()
        if holder is None:
            return None
        pid, host = holder
        if host == socket.gethostname():
            return f"PID {pid}" if alive(pid) else None
        return f"PID {pid} on {host}"

    def __enter__(self) -> "Lock":
        me = f"{os.getpid()} {socket.gethostname()}\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=".lock.", dir=os.path.dirname(self.path))
            with os.fdopen(fd, "w") as f:
                f.write(me)
        except OSError as e:
            raise StorageError(self.path, e) from None
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)          # atomic: fails if a lock exists
                    return self
                except FileExistsError:
                    holder = self._holder()
                    if holder is None:
                        raise RunDirError(f"{self.path!r} exists but is unreadable; if no process trains into "
                                          f"this directory, delete it") from None
                    pid, host = holder
                    if host != socket.gethostname() or alive(pid):
                        where = "" if host == socket.gethostname() else f" on {host}"
                        raise RunDirError(f"{os.path.dirname(self.path)!r} is in use by another process "
                                          f"(PID {pid}{where}); wait for it to finish, or choose another run "
                                          f"directory") from None
                    os.remove(self.path)             # stale: its process is gone
                    self.took_over = pid
            raise RunDirError(f"could not take the lock {self.path!r}; try again")
        finally:
            try:
                os.remove(tmp)
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        holder = self._holder()
        if holder is not None and holder[0] == os.getpid():
            os.remove(self.path)


# ----------------------------------------------------------------------------- metrics


class Records(NamedTuple):
    records: list[dict]     # one dict per logged step, in order
    torn: bool              # the last line was half-written (a process killed mid-write) and is left out


def append_record(path: str, record: dict) -> None:
    """Append one record as a whole line, flushed and synced, so a crash leaves at
    most a torn last line (which `read_records` leaves out).

    Example:
        >>> path = os.path.join(tempfile.mkdtemp(), METRICS)
        >>> append_record(path, {"step": 1, "loss": 2.5})
        >>> read_records(path)
        Records(records=[{'step': 1, 'loss': 2.5}], torn=False)
    """
    line = json.dumps(record, allow_nan=False) + "\n"
    if not_regular(path):
        raise RunDirError(f"{path!r} is not a regular file (a pipe or a device); move it away")
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_records(path: str) -> Records:
    """The records of a metrics log. A torn last line is left out (torn=True); any
    other line that is not a JSON object with an integer "step" is a RunDirError
    naming the line.

    Example:
        >>> path = os.path.join(tempfile.mkdtemp(), METRICS)
        >>> _ = open(path, "w").write('{"step": 1, "loss": 2.5}' + chr(10) + '{"step": 2, "lo')
        >>> read_records(path)
        Records(records=[{'step': 1, 'loss': 2.5}], torn=True)
    """
    if not_regular(path):
        raise RunDirError(f"{path!r} is not a regular file (a pipe or a device); move it away")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise RunDirError(f"cannot read {path!r}: {e.strerror}") from None
    lines = raw.split(b"\n")
    records, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                raise ValueError("not a record")
        except ValueError:
            if number == len(lines):         # no newline after it: the last write was cut short
                torn = True
                continue
            raise RunDirError(f"{path!r} line {number} is not a metrics record; repair or delete the file") from None
        records.append(record)
    return Records(records, torn)


def truncate_records(path: str, last_step: int) -> None:
    """Keep the records up to last_step (a run resumed from that step's checkpoint
    logs the later ones again). Rewritten whole (`write_whole`).

    Example:
        >>> path = os.path.join(tempfile.mkdtemp(), METRICS)
        >>> for s in (100, 200, 300):
        ...     append_record(path, {"step": s})
        >>> truncate_records(path, 200)
        >>> [r["step"] for r in read_records(path).records]
        [100, 200]
    """
    if not os.path.exists(path):
        return
    kept = [r for r in read_records(path).records if r["step"] <= last_step]
    write_whole(path, "".join(json.dumps(r) + "\n" for r in kept))


def write_whole(path: str, text: str) -> None:
    """Write a text file whole or not at all: under a temporary name beside it, synced,
    then renamed into place (a signal or full disk never leaves half of it).

    Example:
        >>> path = os.path.join(tempfile.mkdtemp(), "a.json")
        >>> write_whole(path, "{}"); open(path).read()
        '{}'
    """
    fd, tmp = tempfile.mkstemp(prefix=".write-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    umask = os.umask(0)        # reading the umask means setting it: put it straight back
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode a new file gets under the process's umask (0o644 under the usual 022).

    Example:
        >>> oct(file_mode() | 0o022)
        '0o666'
    """
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a new directory gets under the process's umask (0o755 under 022).

    Example:
        >>> oct(dir_mode() | 0o022)
        '0o777'
    """
    return 0o777 & ~_umask()
