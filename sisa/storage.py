"""Durable file primitives: atomic writes, checksums, directory fsync and the run's writer lock.

Every file in a run directory is written by :func:`atomic_write_bytes` (temp file in the same folder, fsync,
``os.replace``, fsync of the folder), so a reader sees either the old or the new content, never a torn file, and a
crash (even ``kill -9``) leaves at worst a ``.tmp-*`` file that the next writer removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .exceptions import IntegrityError, RunLockedError

TMP_PREFIX = ".tmp-"


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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


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


def write_parquet(path: Path, df: pd.DataFrame) -> str:
    """Atomically write ``df`` as Parquet; return the file's SHA-256 (kept by the caller for verification)."""
    data = parquet_bytes(df)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def read_parquet(path: Path, sha256: str | None = None) -> pd.DataFrame:
    """Read a Parquet file, verifying its SHA-256 first when one is given."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(path, "file is missing")
    data = path.read_bytes()
    if sha256 is not None and sha256_bytes(data) != sha256:
        raise IntegrityError(path, "checksum mismatch (file changed or truncated)")
    try:
        return pq.read_table(io.BytesIO(data)).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise IntegrityError(path, f"unreadable Parquet ({exc})") from None


def remove_tree(path: Path) -> None:
    """Delete a folder (a checkpoint) for real, then fsync its parent so the removal is durable."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
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
