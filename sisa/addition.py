"""Carrying out one journaled addition (docs/design.md §4.1, "Additions").

:func:`apply_addition` merges the rows an addition staged in ``incoming/<request id>.arrow`` into the index and into
the slice files they were placed in (keeping training order), retrains each shard that received rows once from its
earliest receiving slice (:func:`sisa.refresh.refresh`, the same mechanism as deletions), swaps the manifest,
removes the staged file and marks the entry applied with its receipt. Like :func:`sisa.deletion.apply_entry` it is
idempotent: a replay after a crash at any point gives the uninterrupted end state.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from .refresh import refresh
from .store.files import fsync_dir, read_verified, remove_tree, sha256_bytes
from .store.index import RecordIndex
from .store.journal import Journal
from .store.rundir import RunDir
from .store.shardfile import (
    ShardRows,
    concat,
    incoming_file,
    incoming_from_bytes,
    slice_file,
    to_bytes,
    training_order,
)

INCOMING_DIR = "incoming"


def apply_addition(run: RunDir, entry: dict) -> dict:
    """Carry out a journaled addition (idempotent). Caller holds the writer lock."""
    t0 = time.perf_counter()
    journal = Journal(run.journal_dir)
    config = run.config()
    n_f = len(config.data.features)
    shards = sorted(int(s) for s in entry["shards"])
    staged_rel = entry["incoming"]["file"]
    path = run.root / staged_rel
    changed: dict[int, set[int]] = {int(s): {int(k) for k in ks} for s, ks in entry["slices"].items()}
    if path.is_file():  # not merged yet, or merged but not yet refreshed: merging again changes nothing
        rows, shard_of, subjects = incoming_from_bytes(
            read_verified(path, entry["incoming"]["sha256"]), path, n_f
        )
        index = run.index()
        files = _merged(run, index, rows, shard_of, subjects, changed)
        if entry.get("readmitted"):
            before = len(index.tombstones)
            index.untombstone(entry["readmitted"])
            if len(index.tombstones) != before:
                files = {**index.to_bytes([]), **files}  # tombstones first, as a deletion writes them
        if files:  # write-ahead: the checksums go into the journal before the files change
            entry = journal.stage(entry, {rel: sha256_bytes(data) for rel, data in files.items()})
            run.write_files(files)
    report = refresh(run, shards, metrics=False, staged=entry.get("staged", {}), changed=changed)
    if path.is_file():
        remove_tree(path)
    remove_empty_incoming(run)
    receipt = {
        "request_id": entry["request_id"],
        "kind": "add",
        "status": "applied",
        "records_added": entry["records"],
        "returning_allowed": bool(entry.get("allow_returning", False)),
        "returning_rows": int(entry.get("returning_rows", 0)),
        "shards_retrained": {str(s): int(k) for s, k in entry["shards"].items()},
        "slices_retrained": {
            str(j.shard): list(range(j.from_slice, len(j.fingerprints))) for j in report.jobs
        },
        "fingerprints_before": entry["before"],
        "fingerprints_after": {str(s): fp for s, fp in report.after.items()},
        "optimizer_steps": sum(r.optimizer_steps for r in report.results),
        "samples_retrained": sum(r.samples for r in report.results),
        "generation": report.generation,
        "seconds": round(time.perf_counter() - t0, 4),
    }
    journal.complete(entry, receipt)
    return receipt


def _merged(
    run: RunDir,
    index: RecordIndex,
    rows: ShardRows,
    shard_of: np.ndarray,
    subjects: pd.Series,
    changed: dict[int, set[int]],
) -> dict[str, bytes]:
    """The index files and slice files with the staged rows merged in: only rows not merged already (a replay),
    slice files in training order. Index files first, then slice files."""
    new = ~rows.ids.isin(index.active["record_id"]).to_numpy()
    out: dict[str, bytes] = {}
    if new.any():
        subj = subjects[new].reset_index(drop=True) if index.has_subjects else None
        index.insert(
            pd.DataFrame(
                {
                    "record_id": rows.ids[new].reset_index(drop=True),
                    "subject_id": subj
                    if subj is not None
                    else pd.Series([None] * int(new.sum()), dtype="string"),
                    "shard": shard_of[new],
                    "slice": rows.slices[new],
                    "order": rows.orders[new],
                }
            )
        )
        out.update({rel: b for rel, b in index.to_bytes(index.changed).items() if rel.startswith("index/")})
    n_f = rows.features.shape[1]
    for s, ks in sorted(changed.items()):
        for k in sorted(ks):
            mine = np.flatnonzero((shard_of == s) & (rows.slices == k))
            stored = run.shard_rows(s, [k])
            fresh = mine[~rows.ids.iloc[mine].isin(stored.ids).to_numpy()]
            if len(fresh):
                merged = concat([stored, rows.take(fresh)], n_f) if len(stored) else rows.take(fresh)
                out[slice_file(s, k)] = to_bytes(training_order(merged))
    return out


def incoming_leftovers(run: RunDir, journal: Journal) -> list:
    """Staged addition files that no pending entry names: a crash came before the journal write (not
    acknowledged), so recovery removes them."""
    folder = run.root / INCOMING_DIR
    if not folder.is_dir():
        return []
    named = {e["incoming"]["file"] for e in journal.pending() if "incoming" in e}
    return [p for p in sorted(folder.iterdir()) if f"{INCOMING_DIR}/{p.name}" not in named]


def remove_empty_incoming(run: RunDir) -> None:
    folder = run.root / INCOMING_DIR
    if folder.is_dir() and not any(folder.iterdir()):
        remove_tree(folder)
        fsync_dir(run.root)


__all__ = ["INCOMING_DIR", "apply_addition", "incoming_file", "incoming_leftovers", "remove_empty_incoming"]
