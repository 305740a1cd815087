"""The one durability barrier before a manifest names new checkpoints (docs/design.md §4, "Durability").

Training writes each checkpoint folder without fsync (:func:`sisa.store.checkpoints.save_checkpoint` with
``sync=False``) and, when it runs in this process, hands the finished folder to :func:`flush_later`: a background
thread fsyncs the folder's files and the folder itself while training goes on. :func:`barrier` then waits for
those, fsyncs each shard folder once (the renames that put the checkpoints in place) and the checkpoint root, so
that only the last checkpoint's flush is left on the critical path. A folder this process did not hand over (one a
joblib worker process wrote) makes it fall back to one ``syncfs`` of the whole filesystem
(:func:`sisa.store.files.sync_filesystem`), as does any error while flushing. Either way, when it returns, every
checkpoint in ``folders`` is on disk; until then no manifest names them.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import Counter
from pathlib import Path

from .files import crash_point, fsync_dir, sync_filesystem

_queue: queue.Queue[str] = queue.Queue()
_state = threading.Condition()
_known: set[str] = set()  # folders (absolute paths) handed over since the barrier that last covered them
_outstanding: Counter[str] = Counter()  # flushes queued and not yet done, per folder
_failed: set[str] = set()  # folders whose flush hit an error: the barrier falls back to a full sync
_worker: list[threading.Thread] = []


def flush_later(folder: Path) -> None:
    """Queue a finished checkpoint folder for fsync on the background thread."""
    key = os.path.abspath(folder)
    with _state:
        _known.add(key)
        _outstanding[key] += 1
        if not _worker or not _worker[0].is_alive():
            _worker[:] = [threading.Thread(target=_run, name="sisa-flush", daemon=True)]
            _worker[0].start()
    _queue.put(key)


def barrier(checkpoint_root: Path, folders: list[Path]) -> None:
    """Make every folder in ``folders`` durable (see the module docstring)."""
    keys = {os.path.abspath(f) for f in folders}
    with _state:
        handed = keys <= _known
    if not handed:
        sync_filesystem(checkpoint_root)
        _forget(keys)
        return
    crash_point("sync:", Path(checkpoint_root))
    with _state:
        _state.wait_for(lambda: all(_outstanding[k] == 0 for k in keys))
        failed = bool(keys & _failed)
    _forget(keys)
    if failed:
        os.sync()
        return
    for parent in sorted({os.path.dirname(k) for k in keys}):
        fsync_dir(Path(parent))
    fsync_dir(Path(checkpoint_root))


def _forget(keys: set[str]) -> None:
    with _state:
        _known.difference_update(keys)
        _failed.difference_update(keys)
        for k in keys:
            if _outstanding[k] == 0:
                del _outstanding[k]


def _run() -> None:
    while True:
        key = _queue.get()
        ok = True
        try:
            for name in os.listdir(key):
                fd = os.open(os.path.join(key, name), os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            fsync_dir(Path(key))
        except OSError:  # gone or unreadable: the barrier syncs everything instead
            ok = False
        with _state:
            _outstanding[key] -= 1
            if not ok:
                _failed.add(key)
            _state.notify_all()
