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
from .exceptions import ConfigError, IntegrityError, RunLockedError, UnknownRecordError, UnrepairableError
from .fitting import plan, refresh
from .store.checkpoints import checkpoint_name, load_checkpoint
from .store.files import (
    TMP_PREFIX,
    atomic_write_bytes,
    parquet_bytes,
    remove_tree,
    sha256_bytes,
    sha256_file,
    temp_leftovers,
    writer_lock,
)
from .store.index import RecordIndex, keyed_id_hashes
from .store.journal import Journal, new_request_id
from .store.rundir import RunDir


def delete(
    root: str | Path,
    record_ids: list | None = None,
    subject_ids: list | None = None,
    *,
    wait_s: float = 0.0,
    on_ack: Callable[[dict], None] | None = None,
    request_id: str | None = None,
    duplicates: str = "ignore",
    runtime: list[str] | tuple[str, ...] = (),
) -> dict:
    """Delete records (by ID) and/or every row of some data subjects; return the receipt.

    Raises :class:`UnknownRecordError` (nothing changed) when any ID is neither active nor already deleted.
    ``on_ack`` is called right after the request is journaled (the server uses it to stop the shards serving).
    ``duplicates``: ``"report"`` lists other active records with identical features and label in the returned
    receipt (never on disk); ``"delete"`` deletes them in the same request. ``runtime``: overrides of the run's
    runtime keys for this retrain (workers, cluster, lanes; :meth:`Config.with_runtime`).
    """
    if duplicates not in ("ignore", "report", "delete"):
        raise ConfigError([f"delete: duplicates must be ignore, report or delete, got {duplicates!r}"])
    run = RunDir(root, runtime)
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
        _require_retrainable(run, manifest, affected)
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
        if on_ack:  # with the caller's own already-deleted IDs, which the journal never stores
            on_ack({**entry, "already_deleted": already})
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
    from .store.index import coerce_ids

    return coerce_ids([value], index.active["subject_id"])[0]


def apply_entry(
    run: RunDir, entry: dict, index: RecordIndex | None = None, positions: np.ndarray | None = None
) -> dict:
    """Carry out a journaled request (idempotent). Caller holds the writer lock."""
    t0 = time.perf_counter()
    secret = run.secret()
    shards = sorted(int(s) for s in entry["shards"])
    journal = Journal(run.journal_dir)
    if index is None:
        index = run.index()  # verified: the manifest's version, or the one this request staged
        positions = _positions_by_hash(index, secret, entry["id_hashes"], shards)
    files: dict[str, bytes] = {}
    if positions is not None and len(positions):
        index.remove(positions, secret, entry["request_id"], subject_hashes=entry.get("subject_hashes", []))
        files.update(_index_files(run, index))
    for s in shards:
        files.update(_purged_shard_data(run, index, s))
    if files:  # write-ahead: the checksums go into the journal before the files change
        entry = journal.stage(entry, {rel: sha256_bytes(data) for rel, data in files.items()})
        for rel, data in files.items():  # tombstones before the index (see RecordIndex.save)
            atomic_write_bytes(run.root / rel, data)
    report = refresh(run, shards, staged=entry.get("staged", {}))
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
    journal.complete(entry, receipt)
    return receipt


def _positions_by_hash(
    index: RecordIndex, secret: bytes, id_hashes: list[str], shards: list[int]
) -> np.ndarray:
    in_shards = np.flatnonzero(index.active["shard"].isin(shards).to_numpy())
    hashes = keyed_id_hashes(list(index.active["record_id"].iloc[in_shards]), secret, "record")
    wanted = set(id_hashes)
    return in_shards[[h in wanted for h in hashes]] if len(in_shards) else in_shards


def _require_retrainable(run: RunDir, manifest: dict, affected: dict[int, int]) -> None:
    """Before acknowledging, check the files the retrain will need (shard data, the checkpoint it resumes from):
    a corrupted one fails the request now, with nothing changed, instead of leaving it pending."""
    entries = {e["shard"]: e for e in manifest["shards"]}
    for s, k in affected.items():
        path = run.data_path(s)
        if not path.is_file():
            raise IntegrityError(path, "file is missing")
        if sha256_file(path) != manifest["files"].get(f"data/{path.name}"):
            raise IntegrityError(path, "checksum mismatch (file changed or truncated)")
        if k > 0:
            load_checkpoint(run.shard_checkpoints(s) / entries[s]["checkpoints"][k - 1])


def _index_files(run: RunDir, index: RecordIndex) -> dict[str, bytes]:
    """The bytes :meth:`RecordIndex.save` writes (tombstones first), produced in a scratch folder of the run."""
    scratch = run.root / f"{TMP_PREFIX}index"
    remove_tree(scratch)
    scratch.mkdir()
    names = list(index.save(scratch / run.index_path.name))
    files = {name: (scratch / name).read_bytes() for name in names}
    remove_tree(scratch)
    return files


def _purged_shard_data(run: RunDir, index: RecordIndex, shard: int) -> dict[str, bytes]:
    """The shard's data file without rows that are no longer in the index (the real erasure); {} if unchanged."""
    frame = run.shard_frame(shard)  # verified: the manifest's version, or the one this request staged
    live = index.active.loc[index.active["shard"] == shard, "record_id"]
    keep = frame["_record_id"].isin(live).to_numpy()
    if keep.all():
        return {}
    rel = run.data_path(shard).relative_to(run.root).as_posix()
    return {rel: parquet_bytes(frame.loc[keep].reset_index(drop=True))}


def recover(run: RunDir, locked: bool = False) -> list[dict]:
    """Replay pending journal entries to completion and clear leftovers of interrupted writes.

    Every command that opens a run calls this first. Without ``locked`` it takes the writer lock only if it is
    free: a writer holding it replays pending requests itself before doing anything else."""
    journal = Journal(run.journal_dir)
    if not journal.pending() and not temp_leftovers(run.root):
        return []
    if locked:
        return _replay(run, journal)
    try:
        with writer_lock(run.root, 0.0, "recovery"):
            return _replay(run, journal)
    except RunLockedError:
        return []  # the writer holding the lock is applying them


def _replay(run: RunDir, journal: Journal) -> list[dict]:
    receipts = [apply_entry(run, e) for e in journal.pending()]
    for leftover in temp_leftovers(run.root):  # a crash before the journal write leaves only these
        remove_tree(leftover)
    return receipts


def repair(
    root: str | Path,
    shards: list[int] | None = None,
    *,
    wait_s: float = 0.0,
    runtime: list[str] | tuple[str, ...] = (),
) -> dict:
    """Rebuild what the run can rebuild from itself: every corrupted, truncated or missing checkpoint.

    Data files (index, tombstones, shard data) are checked first: a bad one cannot be rebuilt from the run alone
    (:class:`UnrepairableError`, nothing changed). Then every checkpoint the manifest names is loaded and verified;
    a bad one is deleted and :func:`refresh` retrains its shard from the last valid slice, bit-identical to the
    original on the same device. Pending deletions are replayed too.
    """
    run = RunDir(root, runtime)
    run.require_manifest()
    t0 = time.perf_counter()
    with writer_lock(run.root, wait_s, "repair"):
        config, manifest = run.config(), run.require_manifest()
        shards = sorted(set(shards)) if shards else list(range(config.sharding.shards))
        for s in shards:
            _require_intact(lambda s=s: run.shard_frame(s))
        _require_intact(run.index)
        chains = plan(run, config, shards)[2]
        named = {e["shard"]: e["checkpoints"] for e in manifest["shards"]}
        removed = []
        for s in shards:
            removed += _remove_bad_checkpoints(run, s, chains[s]["fingerprints"], named.get(s, []))
        replayed = _replay(run, Journal(run.journal_dir))
        report = refresh(run, shards)
    return {
        "run": str(run.root),
        "shards_checked": shards,
        "checkpoints_rebuilt": removed,
        "shards_retrained": {str(j.shard): j.from_slice for j in report.jobs},
        "deletions_replayed": [r["request_id"] for r in replayed],
        "generation": report.generation,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def _require_intact(read: Callable[[], object]) -> None:
    try:
        read()
    except IntegrityError as exc:
        raise UnrepairableError(exc.path, exc.reason) from None


def _remove_bad_checkpoints(run: RunDir, shard: int, fingerprints: list[str], named: list[str]) -> list[str]:
    """Delete each checkpoint of the shard's chain (as the stored data gives it) that fails verification.

    Returns the run-relative paths of those and of checkpoints the manifest names that are missing; both are
    rebuilt by the refresh that follows. Stale checkpoints of a pending deletion are left to its replay."""
    removed = []
    for k, fp in enumerate(fingerprints):
        folder = run.shard_checkpoints(shard) / checkpoint_name(k, fp)
        rel = folder.relative_to(run.root).as_posix()
        if not folder.exists():
            removed += [rel] if folder.name in named else []
            continue
        try:
            load_checkpoint(folder, fp)
        except IntegrityError:
            remove_tree(folder)
            removed.append(rel)
    return removed
