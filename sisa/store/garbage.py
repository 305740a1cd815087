"""Removing what no manifest names any more: stale checkpoints and temp leftovers (docs/design.md §4, "Erasure").

:func:`collect_garbage` deletes every checkpoint folder of some shards that the live manifest does not name
(including each one trained on a deleted record) and the leftovers of interrupted writes. A deletion's rollback
passes ``background=True``: each stale folder is renamed to a ``.tmp-stale-*`` name first (one rename instead of
five removals; from then on it is a leftover of an interrupted write to every reader, never trusted, and removed
by recovery if the process dies), and the removals run on a thread (:func:`start_erasure`) while the catch-up
retrain trains.
:func:`finish_erasure` waits for them; every later :func:`collect_garbage` does so first, and a deletion does
before it returns, so its receipt still means "erased".
"""

from __future__ import annotations

import threading
from pathlib import Path

from .files import TMP_PREFIX, clean_temp_files, crash_testing, fsync_dir, remove_tree, replace_path
from .rundir import RunDir
from .shardfile import shard_dir

STALE_PREFIX = f"{TMP_PREFIX}stale-"

_pending: list[tuple[threading.Thread, list[BaseException]]] = []  # background removals of this process


def collect_garbage(
    run: RunDir,
    manifest: dict,
    shards: list[int],
    background: bool = False,
    only: dict[int, set[str]] | None = None,
) -> None:
    """Delete every checkpoint folder of ``shards`` that ``manifest`` does not name (real erasure) and the
    shards' temp leftovers; each shard's folder is fsynced once, after its removals (``background``: after its
    renames, the removals following on a thread: see the module docstring). ``only``: per shard, the names its
    checkpoint folder held before a retrain began writing there (:class:`sisa.refresh.EarlyRetrain`): nothing
    else in it is touched, not even that retrain's temp folders."""
    finish_erasure()
    live = {e["shard"]: set(e["checkpoints"]) for e in manifest["shards"]}
    trash: list[tuple[Path, list[Path]]] = []
    for s in shards:
        folder = run.shard_checkpoints(s)
        if only is None:
            clean_temp_files(folder)
        stale = (
            [
                p
                for p in folder.iterdir()
                if p.name not in live.get(s, set())
                and (only is None or (p.name in only.get(s, ()) and not p.name.startswith(TMP_PREFIX)))
            ]
            if folder.is_dir()
            else []
        )
        if background and stale:
            moved = [p.with_name(STALE_PREFIX + p.name) for p in stale]
            for src, dst in zip(stale, moved, strict=True):
                replace_path(src, dst, sync=False)
            trash.append((folder, moved))
        for p in [] if background else stale:
            remove_tree(p, sync=False)
        if stale:
            fsync_dir(folder)
    for s in shards:
        clean_temp_files(run.root / shard_dir(s))
    clean_temp_files(run.root / "index")
    clean_temp_files(run.root)
    if trash:
        errors: list[BaseException] = []
        thread = threading.Thread(target=_remove, args=(trash, errors), name="sisa-erasure", daemon=True)
        _pending.append((thread, errors))  # started by start_erasure, once the caller's journal write is done


def start_erasure() -> None:
    """Start the background removals :func:`collect_garbage` prepared. Called after the rollback's journal
    write, whose fsync would otherwise wait for the removals' metadata too. Under crash tests they are left for
    :func:`finish_erasure` to run in order."""
    if crash_testing():
        return
    for thread, _ in _pending:
        if thread.ident is None:
            thread.start()


def finish_erasure() -> None:
    """Wait until this process's background removals are done (and durable); raise the first error one hit."""
    while _pending:
        thread, errors = _pending.pop(0)
        if thread.ident is None:  # not started (crash tests): run it here
            thread.run()
        else:
            thread.join()
        if errors:
            raise errors[0]


def _remove(trash: list[tuple[Path, list[Path]]], errors: list[BaseException]) -> None:
    try:
        for folder, moved in trash:
            for p in moved:
                remove_tree(p, sync=False)
            fsync_dir(folder)
    except BaseException as exc:  # re-raised by finish_erasure in the caller's thread
        errors.append(exc)
