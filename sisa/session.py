"""Opening a run: the one rule every entry point follows (docs/design.md, "Durability").

An acknowledged deletion or addition can never be lost, so before a command reads or changes a run, requests a crash
left pending are replayed (:func:`recover`). Writers go through :func:`writer_session` (the run's writer lock, replay,
the manifest checked under the lock); readers through :func:`reader_session` (replay when the lock is free: a
writer holding it replays pending requests itself before doing anything else).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .addition import apply_addition, incoming_leftovers, remove_empty_incoming
from .deletion import roll_back
from .exceptions import RunLockedError
from .retraining import catch_up, due, rolled_back_shards, settle
from .store.files import remove_tree, temp_leftovers, writer_lock
from .store.journal import Journal, kind_of
from .store.rundir import RunDir


@contextlib.contextmanager
def writer_session(
    root: str | Path,
    what: str,
    wait_s: float = 0.0,
    runtime: list[str] | tuple[str, ...] = (),
    trained: bool = True,
    replay_first: bool = True,
) -> Iterator[RunDir]:
    """The run, held by this process as its one writer, with every pending deletion applied.

    ``what`` names the operation in the "locked" error; ``trained=False`` accepts a run whose first training has
    not finished (``train --resume``). ``replay_first=False`` is for repair alone: a replay would resume from
    checkpoints that repair must first find broken and remove; it replays itself right after."""
    run = RunDir(root, runtime)
    _require(run, trained)
    with writer_lock(run.root, wait_s, what):
        if replay_first:
            recover(run, locked=True)
        _require(run, trained)
        yield run


def reader_session(root: str | Path, runtime: list[str] | tuple[str, ...] = ()) -> RunDir:
    """A trained run, opened for reading, with pending deletions replayed when no writer is at work."""
    run = RunDir(root, runtime)
    run.require_manifest()
    recover(run)
    return run


def _require(run: RunDir, trained: bool) -> None:
    if trained:
        run.require_manifest()
    else:
        run.require()


def recover(run: RunDir, locked: bool = False) -> list[dict]:
    """Replay pending journal entries to completion and clear leftovers of interrupted writes.

    Without ``locked`` it takes the writer lock only if it is free: a writer holding it replays pending requests
    itself before doing anything else."""
    journal = Journal(run.journal_dir)
    if (
        not journal.pending()
        and not journal.unfiled()
        and not temp_leftovers(run.root)
        and not (run.root / "incoming").exists()
        and not _catch_up_owed(run, journal)
    ):
        return []
    if locked:
        return replay(run, journal)
    try:
        with writer_lock(run.root, 0.0, "recovery"):
            return replay(run, journal)
    except RunLockedError:
        return []  # the writer holding the lock is applying them


def _catch_up_owed(run: RunDir, journal: Journal) -> bool:
    """A rolled-back request whose retrain is due now, or finished but not yet marked applied."""
    if not journal.rolled_back():
        return False
    manifest = run.manifest()
    still = {r for rb in rolled_back_shards(manifest or {"shards": []}).values() for r in rb["requests"]}
    return any(e["request_id"] not in still for e in journal.rolled_back()) or bool(due(run))


def replay(run: RunDir, journal: Journal, catch_up_due: bool = True) -> list[dict]:
    """Roll back every pending entry (erasure cannot wait), finish catch-ups a crash interrupted, run the retrains
    the policy says are due, then remove leftovers of interrupted writes. Caller holds the writer lock. Returns the
    entries rolled back here (each as its receipt once caught up), then the receipts of earlier rolled-back
    requests it completed. ``catch_up_due=False``: roll back and settle
    only (``sisa retrain`` chooses the shards itself)."""
    # in arrival order, deletions and additions alike (docs/design.md §4.1): an addition is merged and trained
    rolled = [(apply_addition if kind_of(e) == "add" else roll_back)(run, e) for e in journal.pending()]
    done = {r["request_id"]: r for r in settle(run)}
    now = due(run) if catch_up_due else {}
    if now:
        done.update({r["request_id"]: r for r in catch_up(run, sorted(now), reason="recovery")})
    for entry in journal.unfiled():  # applied, not yet filed away (see sisa.store.journal)
        journal.file_away(entry)
    for leftover in temp_leftovers(run.root):  # a crash before the journal write leaves only these
        remove_tree(leftover)
    for staged in incoming_leftovers(run, journal):  # an addition staged but never acknowledged
        remove_tree(staged)
    remove_empty_incoming(run)
    ids = {e["request_id"] for e in rolled}
    return [done.get(e["request_id"], e) for e in rolled] + [r for i, r in done.items() if i not in ids]
