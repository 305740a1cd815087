"""Durable file primitives: atomic writes, checksums, directory fsync and the run's writer lock.

Every file in a run directory is written by :func:`atomic_write_bytes` (temp file in the same folder, fsync,
``os.replace``, fsync of the folder), so a reader sees either the old or the new content, never a torn file, and a
crash (even ``kill -9``) leaves at worst a ``.tmp-*`` file that the next writer removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.ipc  # noqa: F401 - pa.ipc
import pyarrow.parquet as pq

from ..exceptions import IntegrityError, RunLockedError

TMP_PREFIX = ".tmp-"
CRASH_AT_ENV, CRASH_LOG_ENV = "SISA_CRASH_AT", "SISA_CRASH_LOG"
_crash_hits = {"all": 0, "matching": 0}
_crash_lock = threading.Lock()  # points are hit from the stacked executor's threads too


def crash_point(kind: str, path: Path) -> None:
    """Fault-injection hook, called before every durable step (write, rename, removal) in a run directory.

    The point's name is ``kind`` + the path relative to the run, e.g. ``replace:manifest.json``.

    Crash tests must kill a real process at exact, repeatable moments. With ``SISA_CRASH_LOG=FILE`` each hit
    appends ``N<TAB>point`` to FILE (to enumerate the moments of one operation); with ``SISA_CRASH_AT=N`` (or
    ``PREFIX:N``, counting only points whose name starts with PREFIX) the process SIGKILLs itself at the N-th
    hit, as ``kill -9`` or a power cut would. Unset (the normal case) it costs two environment lookups.
    """
    at, log = os.environ.get(CRASH_AT_ENV), os.environ.get(CRASH_LOG_ENV)
    if not at and not log:
        return
    point = f"{kind}{_label(path)}"
    with _crash_lock:
        _crash_hits["all"] += 1
        if log:
            with open(log, "a") as f:
                f.write(f"{_crash_hits['all']}\t{point}\n")
        if at:
            prefix, _, count = at.rpartition(":")
            if prefix and not point.startswith(prefix):
                return
            _crash_hits["matching"] += 1
            if _crash_hits["matching"] == int(count):
                os.kill(os.getpid(), signal.SIGKILL)


def crash_testing() -> bool:
    """True when crash points are being logged or armed by plain count (``SISA_CRASH_AT=N``): work that would run
    on a background thread then runs in order, so the N-th point is the same moment in every run. A count of
    points with one prefix (``PREFIX:N``) is repeatable with threads too, and leaves them on."""
    at = os.environ.get(CRASH_AT_ENV, "")
    return bool(os.environ.get(CRASH_LOG_ENV)) or bool(at and ":" not in at)


def reset_crash_counter() -> None:
    """Count crash points from zero again (for tests that enumerate points in-process)."""
    _crash_hits.update(all=0, matching=0)


def _label(path: Path) -> str:
    """A run-independent name for a path in crash-point names: relative to its run directory (the nearest
    folder holding ``config.yaml``), e.g. ``checkpoints/shard-000/slice-001-…``. Only computed for crash tests."""
    path = Path(path)
    for parent in list(path.parents)[:4]:
        if (parent / "config.yaml").is_file():
            return path.relative_to(parent).as_posix()
    return "/".join(path.parts[-2:])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}"
    crash_point("write:", path)
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        crash_point("torn:", path)  # a half-written temp file is left behind
        f.write(data[len(data) // 2 :])
        f.flush()
        os.fsync(f.fileno())
    replace_path(tmp, path)


def replace_path(src: Path, dst: Path, sync: bool = True) -> None:
    """``os.replace`` a finished temp file or folder into place, then fsync the folder so the rename is durable
    (``sync=False``: a later :func:`sync_filesystem` barrier does)."""
    crash_point("replace:", dst)
    os.replace(src, dst)
    crash_point("replaced:", dst)
    if sync:
        fsync_dir(Path(dst).parent)


def sync_filesystem(path: Path) -> None:
    """One durability barrier for everything written under ``path`` so far: ``syncfs`` of its filesystem (Linux),
    else ``sync``. Cheaper than an fsync per file when a retrain wrote many checkpoints."""
    crash_point("sync:", Path(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        if _LIBC is None or _LIBC.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages to disk now, without waiting (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; elsewhere nothing). Not a durability guarantee: it lets the disk
    work while training goes on, so the later :func:`sync_filesystem` barrier finds little left to write."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE; an error only means no head start


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.syncfs.argtypes = [ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # not Linux / no syncfs
        return None


def _sync_file_range():
    try:
        fn = _LIBC.sync_file_range
    except AttributeError:  # no libc, or not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_LIBC = _libc()
_SYNC_FILE_RANGE = _sync_file_range()


def atomic_write_json(path: Path, obj: Any, compact: bool = False) -> None:
    """``compact``: one line, by the C encoder (the manifest: hundreds of KB, rewritten by every change); else
    indented for people."""
    text = json.dumps(obj, indent=None if compact else 1, sort_keys=True, default=str)
    atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise IntegrityError(path, f"not valid JSON ({exc})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    # Uncompressed, no dictionary pages: an auditor's plain `grep -r` over the run directory sees every stored ID
    # and value as it is, so the absence of a deleted ID is checkable with ordinary tools.
    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(table, buf, compression="none", use_dictionary=False, write_statistics=False)
    return buf.getvalue()


def ipc_bytes(table: pa.Table | pd.DataFrame) -> bytes:
    """An Arrow IPC file (uncompressed: every stored value is visible to ``grep``; ``pandas.read_feather`` opens
    it), without schema metadata, so equal content gives equal bytes."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    table = table.replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def parse_ipc(data: bytes, path: Path) -> pa.Table:
    """Arrow IPC bytes (already read, and verified by the caller where it must be) as a table."""
    try:
        return pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise IntegrityError(path, f"unreadable Arrow file ({exc})") from None


def read_verified(path: Path, sha256: str | Collection[str] | None = None) -> bytes:
    """A file's bytes, its SHA-256 checked first when one (or a set of acceptable ones) is given."""
    return read_checked(path, sha256)[0]


def read_checked(path: Path, sha256: str | Collection[str] | None = None) -> tuple[bytes, str]:
    """:func:`read_verified` and the SHA-256 it computed (hashed once)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise IntegrityError(path, "file is missing") from None
    digest = sha256_bytes(data)
    allowed = {sha256} if isinstance(sha256, str) else sha256
    if allowed is not None and digest not in allowed:
        raise IntegrityError(path, "checksum mismatch (file changed or truncated)")
    return data, digest


def read_checked_all(
    items: list[tuple[Path, str | Collection[str] | None]],
) -> Iterator[tuple[bytes, str]]:
    """:func:`read_checked` of each ``(path, sha256)``, yielded in order; two files are read and hashed at a time
    on threads (both release the GIL) while the caller parses the last one. The first bad file in order raises."""
    if len(items) < 2:
        yield from (read_checked(p, sha) for p, sha in items)
        return
    yield from _readers().map(lambda item: read_checked(*item), items)


_READERS: list[ThreadPoolExecutor] = []  # one per process: a forked child starts its own


def _readers() -> ThreadPoolExecutor:
    if not _READERS:
        _READERS.append(ThreadPoolExecutor(2, thread_name_prefix="sisa-read"))
    return _READERS[0]


os.register_at_fork(after_in_child=_READERS.clear)


def write_parquet(path: Path, df: pd.DataFrame) -> str:
    """Atomically write ``df`` as Parquet; return the file's SHA-256 (kept by the caller for verification)."""
    data = parquet_bytes(df)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def read_parquet(path: Path, sha256: str | Collection[str] | None = None) -> pd.DataFrame:
    """Read a Parquet file, verifying its SHA-256 first when one is given.

    ``sha256`` may be a set of acceptable checksums: while a journaled deletion is being applied a file is either
    the version the manifest names or the one the journal entry staged before writing it."""
    return parse_parquet(read_verified(path, sha256), path)


def parse_parquet(data: bytes, path: Path) -> pd.DataFrame:
    """Parquet bytes (already read, and verified by the caller where it must be) as a frame."""
    try:
        return pq.read_table(io.BytesIO(data)).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise IntegrityError(path, f"unreadable Parquet ({exc})") from None


def remove_tree(path: Path, sync: bool = True) -> None:
    """Delete a folder (a checkpoint) for real, then fsync its parent so the removal is durable (``sync=False``:
    the caller fsyncs the parent once after removing several).

    A checkpoint's ``COMPLETE`` marker goes first, so a folder whose removal was interrupted is never trusted."""
    path = Path(path)
    if not path.exists():
        return
    children = sorted(path.iterdir(), key=lambda p: (p.name != "COMPLETE", p.name)) if path.is_dir() else []
    for child in children:
        crash_point("remove:", child)
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    crash_point("rmdir:", path)
    path.rmdir() if path.is_dir() else path.unlink()
    if sync:
        fsync_dir(path.parent)


def clean_temp_files(folder: Path) -> None:
    """Remove leftovers of interrupted atomic writes (files or folders named ``.tmp-*``)."""
    if not Path(folder).is_dir():
        return
    for p in Path(folder).iterdir():
        if p.name.startswith(TMP_PREFIX):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def temp_leftovers(root: Path) -> list[Path]:
    """``.tmp-*`` leftovers of interrupted writes anywhere in a run directory (at most three levels deep)."""
    found, level = [], [str(root)]
    for _ in range(3):
        deeper = []
        for folder in level:
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for e in entries:
                if e.name.startswith(TMP_PREFIX):
                    found.append(Path(e.path))
                elif e.is_dir(follow_symlinks=False):
                    deeper.append(e.path)
        level = deeper
    return sorted(found)


@contextlib.contextmanager
def writer_lock(run_dir: Path, wait_s: float = 0.0, what: str = "this operation") -> Iterator[None]:
    """Hold the run's exclusive writer lock (an ``flock`` on ``run_dir/lock``, released by the OS on kill -9).

    A second writer waits up to ``wait_s`` seconds, then fails with :class:`RunLockedError`.
    """
    path = Path(run_dir) / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RunLockedError(
                        f"run {run_dir} is locked by another sisa process (a train, delete or repair is in progress); "
                        f"{what} was not started. Wait for it to finish, or pass --wait SECONDS"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
