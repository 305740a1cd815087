"""Deletion by record ID or by data subject, and crash recovery of acknowledged deletions.

Lifecycle (DESIGN §4): validate (unknown IDs: error, nothing changed; already deleted: an explicit answer) ->
journal the request as pending and fsync (acknowledged) -> tombstone the records in the index -> purge their rows
from the shard data -> retrain each affected shard once, from its earliest affected slice -> swap the manifest ->
delete every checkpoint trained on the records -> mark the journal entry applied with its receipt.

:func:`apply_entry` is idempotent, so :func:`recover` finishes a request interrupted at any point (even kill -9)
by simply running it again; the end state equals the uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .duplicates import find_duplicates
from .exceptions import ConfigError, RunLockedError, UnknownRecordError
from .fitting import refresh
from .index import RecordIndex, keyed_id_hashes
from .journal import Journal, new_request_id
from .rundir import RunDir
from .storage import writer_lock


def delete(
    root: str | Path,
    record_ids: list | None = None,
    subject_ids: list | None = None,
    *,
    wait_s: float = 0.0,
    on_ack: Callable[[dict], None] | None = None,
    request_id: str | None = None,
    duplicates: str = "ignore",
) -> dict:
    """Delete records (by ID) and/or every row of some data subjects; return the receipt.

    Raises :class:`UnknownRecordError` (nothing changed) when any ID is neither active nor already deleted.
    ``on_ack`` is called right after the request is journaled (the server uses it to stop the shards serving).
    ``duplicates``: ``"report"`` lists other active records with identical features and label in the returned
    receipt (never on disk); ``"delete"`` deletes them in the same request.
    """
    if duplicates not in ("ignore", "report", "delete"):
        raise ConfigError([f"delete: duplicates must be ignore, report or delete, got {duplicates!r}"])
    run = RunDir(root)
    run.require_manifest()
    record_ids, subject_ids = _unique(record_ids), _unique(subject_ids)
    if not record_ids and not subject_ids:
        raise ConfigError(["delete: give at least one record ID (or subject ID)"])
    with writer_lock(run.root, wait_s, "delete"):
        recover(run, locked=True)
        secret, index = run.secret(), run.index()
        positions, already, subject_rows = _resolve(run, index, secret, record_ids, subject_ids)
        dupes = find_duplicates(run, index, positions) if duplicates != "ignore" and len(positions) else []
        if duplicates == "delete" and dupes:
            positions = np.union1d(positions, index.positions_of(dupes)).astype(np.int64)
        if len(positions) == 0:
            return {
                "status": "already_deleted",
                "request_id": None,
                "records_deleted": 0,
                "already_deleted": already,
                "shards_retrained": {},
            }
        rows = index.active.iloc[positions]
        affected = rows.groupby("shard")["slice"].min().astype(int).to_dict()
        manifest = run.require_manifest()
        before = {e["shard"]: e["fingerprint"] for e in manifest["shards"] if e["shard"] in affected}
        journal = Journal(run.journal_dir)
        entry = journal.begin(
            request_id or new_request_id(),
            keyed_id_hashes(list(rows["record_id"]), secret, "record"),
            keyed_id_hashes(subject_ids, secret, "subject") if subject_ids else [],
            affected,
            len(positions),
            before,
            extra={
                "subject_rows": {
                    h: n
                    for h, n in zip(
                        keyed_id_hashes(list(subject_rows), secret, "subject"),
                        subject_rows.values(),
                        strict=True,
                    )
                }
            },
        )
        if on_ack:
            on_ack(entry)
        receipt = apply_entry(run, entry, index, positions)
        receipt["already_deleted"] = already
        if duplicates != "ignore":  # returned to the caller only: the stored receipt never names record IDs
            receipt["duplicates_deleted" if duplicates == "delete" else "duplicates_found"] = dupes
        if subject_ids:
            receipt["subject_rows"] = {str(s): int(n) for s, n in subject_rows.items()}
        return receipt


def _unique(ids: list | None) -> list:
    return list(dict.fromkeys(ids or []))


def _resolve(run: RunDir, index: RecordIndex, secret: bytes, record_ids: list, subject_ids: list):
    """Positions of the rows to delete; IDs already deleted; rows per subject. Raises on unknown IDs."""
    pos = index.positions_of(record_ids) if record_ids else np.array([], dtype=np.int64)
    missing = [i for i, p in zip(record_ids, pos, strict=True) if p < 0]
    already = index.already_deleted(missing, secret, "record")
    unknown = [i for i in missing if i not in set(already)]
    subject_rows: dict = {}
    if subject_ids:
        if not index.has_subjects:
            raise ConfigError(["delete --subject: this run has no data.subject_column; delete by record ID"])
        s_pos = index.positions_of(subject_ids, "subject_id")
        counts = index.active["subject_id"].iloc[s_pos].value_counts()
        for s in subject_ids:
            n = int(counts.get(_as_index_type(s, index), 0))
            subject_rows[s] = n
        absent = [s for s, n in subject_rows.items() if n == 0]
        gone = index.already_deleted(absent, secret, "subject")
        already += [f"subject:{s}" for s in gone]
        unknown_s = [s for s in absent if s not in set(gone)]
        for s in gone:
            subject_rows.pop(s)
        if unknown_s:
            raise UnknownRecordError(unknown_s, kind="subject")
        pos = np.concatenate([pos[pos >= 0], s_pos])
    if unknown:
        raise UnknownRecordError(unknown)
    return np.unique(pos[pos >= 0]).astype(np.int64), already, subject_rows


def _as_index_type(value, index: RecordIndex):
    from .index import coerce_ids

    return coerce_ids([value], index.active["subject_id"])[0]


def apply_entry(
    run: RunDir, entry: dict, index: RecordIndex | None = None, positions: np.ndarray | None = None
) -> dict:
    """Carry out a journaled request (idempotent). Caller holds the writer lock."""
    t0 = time.perf_counter()
    secret = run.secret()
    shards = sorted(int(s) for s in entry["shards"])
    if index is None:
        index = run.index(verify=False)
        positions = _positions_by_hash(index, secret, entry["id_hashes"], shards)
    if positions is not None and len(positions):
        index.remove(positions, secret, entry["request_id"], subject_hashes=entry.get("subject_hashes", []))
        run.write_index(index)
    for s in shards:
        _purge_shard_data(run, index, s)
    report = refresh(run, shards)
    receipt = {
        "request_id": entry["request_id"],
        "status": "applied",
        "records_deleted": entry["records"],
        "subjects_deleted": len(entry.get("subject_hashes", [])),
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
    Journal(run.journal_dir).complete(entry, receipt)
    return receipt


def _positions_by_hash(
    index: RecordIndex, secret: bytes, id_hashes: list[str], shards: list[int]
) -> np.ndarray:
    in_shards = np.flatnonzero(index.active["shard"].isin(shards).to_numpy())
    hashes = keyed_id_hashes(list(index.active["record_id"].iloc[in_shards]), secret, "record")
    wanted = set(id_hashes)
    return in_shards[[h in wanted for h in hashes]] if len(in_shards) else in_shards


def _purge_shard_data(run: RunDir, index: RecordIndex, shard: int) -> None:
    """Rewrite the shard's data file without rows that are no longer in the index (the real erasure)."""
    frame = run.shard_frame(shard, verify=False)
    live = index.active.loc[index.active["shard"] == shard, "record_id"]
    keep = frame["_record_id"].isin(live).to_numpy()
    if not keep.all():
        run.write_shard_frame(shard, frame.loc[keep].reset_index(drop=True))


def recover(run: RunDir, locked: bool = False) -> list[dict]:
    """Replay pending journal entries to completion. Without ``locked``, takes the lock if it is free."""
    journal = Journal(run.journal_dir)
    if not journal.pending():
        return []
    if locked:
        return [apply_entry(run, e) for e in journal.pending()]
    try:
        with writer_lock(run.root, 0.0, "recovery"):
            return [apply_entry(run, e) for e in journal.pending()]
    except RunLockedError:
        return []  # the writer holding the lock is applying them
