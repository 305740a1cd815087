"""The one durability barrier before a manifest names new checkpoints (docs/design.md §4, "Durability").

Training in this process hands each checkpoint (its tensors copied) to :func:`write_later`: a writer thread builds
the folder (:func:`sisa.store.checkpoints.save_checkpoint` with ``sync=False``: no fsync) in the order they came
while the next slice trains, and hands the finished folder to :func:`flush_later`: a second thread fsyncs the
folder's files and the folder itself. :func:`barrier` first waits for the writes (raising the first error one
hit), then for the flushes, fsyncs each shard folder once (the renames that put the checkpoints in place) and the checkpoint root, so
that only the last checkpoint's flush is left on the critical path. A folder this process did not hand over (one a
joblib worker process wrote) makes it fall back to one ``syncfs`` of the whole filesystem
(:func:`sisa.store.files.sync_filesystem`), as does any error while flushing. Either way, when it returns, every
checkpoint in ``folders`` is on disk; until then no manifest names them.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from .files import crash_point, crash_testing, fsync_dir, sync_filesystem

_queue: queue.Queue[str] = queue.Queue()
_state = threading.Condition()
# folders (absolute paths) handed over since the barrier that last covered them, oldest first; a training whose
# barrier never comes (verify's scratch retrain) leaves its folders here: past MAX_KNOWN the oldest are forgotten,
# and a barrier asking for one of those syncs the whole filesystem instead
MAX_KNOWN = 20_000
_known: dict[str, None] = {}
_outstanding: Counter[str] = Counter()  # flushes queued and not yet done, per folder
_failed: set[str] = set()  # folders whose flush hit an error: the barrier falls back to a full sync
_worker: list[threading.Thread] = []
WRITE_QUEUE = (
    8  # checkpoints waiting to be written at most: training waits beyond that (memory stays bounded)
)
_writes: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=WRITE_QUEUE)
_writing = {"pending": 0, "errors": []}
_writer: list[threading.Thread] = []


def write_later(write: Callable[[], None]) -> None:
    """Run ``write`` (one checkpoint folder's write) on the writer thread, after those queued before it. Under
    crash tests (:func:`sisa.store.files.crash_testing`) it runs here and now, so crash points keep their order."""
    if crash_testing():
        write()
        return
    with _state:
        _writing["pending"] += 1
        if not _writer or not _writer[0].is_alive():
            _writer[:] = [threading.Thread(target=_write_loop, name="sisa-write", daemon=True)]
            _writer[0].start()
    _writes.put(write)


def drain_writes() -> None:
    """Wait until every checkpoint handed to :func:`write_later` is written; raise the first error one hit."""
    with _state:
        _state.wait_for(lambda: _writing["pending"] == 0)
        errors, _writing["errors"] = _writing["errors"], []
    if errors:
        raise errors[0]


@contextlib.contextmanager
def writes_drained() -> Iterator[None]:
    """Around a training function: when it returns, every checkpoint it handed over is written (a worker process
    may return its results right after). On an error the finished checkpoints are still written, and the error
    is raised, not a write error behind it."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            drain_writes()
        raise
    drain_writes()


def _write_loop() -> None:
    while True:
        write = _writes.get()
        error = None
        try:
            write()
        except BaseException as exc:  # raised by drain_writes in the trainer's thread
            error = exc
        with _state:
            _writing["pending"] -= 1
            if error is not None:
                _writing["errors"].append(error)
            _state.notify_all()


def flush_later(folder: Path) -> None:
    """Queue a finished checkpoint folder for fsync on the background thread."""
    key = os.path.abspath(folder)
    with _state:
        _known.pop(key, None)
        _known[key] = None
        while len(_known) > MAX_KNOWN:
            del _known[next(iter(_known))]
        _outstanding[key] += 1
        if not _worker or not _worker[0].is_alive():
            _worker[:] = [threading.Thread(target=_run, name="sisa-flush", daemon=True)]
            _worker[0].start()
    _queue.put(key)


def barrier(checkpoint_root: Path, folders: list[Path]) -> None:
    """Make every folder in ``folders`` durable (see the module docstring)."""
    drain_writes()
    keys = {os.path.abspath(f) for f in folders}
    with _state:
        handed = keys <= _known.keys()
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
        for k in keys:
            _known.pop(k, None)
            _failed.discard(k)
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
            if _outstanding[key] == 0 and key not in _known:  # forgotten already: nobody will ask
                del _outstanding[key]
                _failed.discard(key)
            _state.notify_all()
