"""Deletion by record ID or by data subject: the front door (docs/design.md, "Deletion lifecycle", steps 1-2).

:func:`delete` validates the request (unknown IDs: an error, nothing changed; already deleted: an explicit answer),
checks that the files the retrain needs are intact, journals the request as pending and fsyncs it (from then on it
is acknowledged), and hands it to :func:`sisa.deletion.roll_back` (erased and forgotten: the affected shards serve
the checkpoint before the records' slice); the retrain policy (:mod:`sisa.retraining`) then decides whether the
catch-up retrain runs now (``unlearning.retrain: immediate``, the default) or later.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .deletion import Loaded, roll_back
from .duplicates import find_duplicates
from .exceptions import UnknownRecordError, UsageError
from .refresh import EarlyRetrain
from .retraining import catch_up, deadlines, due, rolled_back_shards
from .session import replay, writer_session
from .store.checkpoints import load_checkpoint
from .store.files import read_checked_all
from .store.garbage import finish_erasure
from .store.index import RecordIndex, coerce_ids, keyed_id_hashes
from .store.journal import Journal, new_request_id
from .store.rundir import RunDir
from .store.shardfile import from_bytes, shard_files


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
    defer: bool = False,
    on_rollback: Callable[[dict], None] | None = None,
) -> dict:
    """Delete records (by ID) and/or every row of some data subjects; return the receipt.

    Raises :class:`UnknownRecordError` (nothing changed) when any ID is neither active nor already deleted.
    ``on_ack`` is called right after the request is journaled (the server uses it to stop the shards serving).
    ``duplicates``: ``"report"`` lists other active records with identical features and label in the returned
    receipt (never on disk); ``"delete"`` deletes them in the same request. ``runtime``: overrides of the run's
    runtime keys for this retrain (workers, cluster, lanes, unlearning; :meth:`Config.with_runtime`).
    ``defer``: journal, roll back and erase, but leave the retrain to the policy's schedule (or ``sisa retrain``)
    even under ``immediate``; ``on_rollback`` is called once the rollback is durable (the server serves the
    rolled-back checkpoints from then on). The receipt's status is ``applied`` when the retrain ran, else
    ``rolled_back``.
    """
    if duplicates not in ("ignore", "report", "delete"):
        raise UsageError([("duplicates", f"expected ignore, report or delete, got {duplicates!r}")])
    record_ids, subject_ids = _unique(record_ids), _unique(subject_ids)
    if not record_ids and not subject_ids:
        raise UsageError([("record_ids", "give at least one record ID (or subject ID)")])
    with writer_session(root, "delete", wait_s, runtime) as run:
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
        loaded = _require_retrainable(run, manifest, affected)
        journal = Journal(run.journal_dir)
        entry = journal.begin(
            request_id or new_request_id(),
            keyed_id_hashes(list(rows["record_id"]), secret, "record"),
            keyed_id_hashes(subject_ids, secret, "subject") if subject_ids else [],
            affected,
            len(positions),
            before,
            extra={
                "deferred": defer,
                "slices": {
                    str(s): sorted({int(k) for k in g})
                    for s, g in rows.groupby("shard")["slice"].unique().items()
                },
                "subject_rows": {
                    h: n
                    for h, n in zip(
                        keyed_id_hashes(list(subject_rows), secret, "subject"),
                        subject_rows.values(),
                        strict=True,
                    )
                },
            },
        )
        if on_ack:  # with the caller's own already-deleted IDs, which the journal never stores
            on_ack({**entry, "already_deleted": already})
        loaded = dict(loaded)
        # under `immediate`, the catch-up trains on the purged rows while the rollback persists (docs/design.md §4)
        early = EarlyRetrain(run, sorted(affected)) if _retrains_now(run, defer) else None
        try:  # the stale checkpoints are removed while the catch-up trains; erased before this returns
            entry = roll_back(
                run, entry, index, positions, loaded, deferred=defer, background=True, early=early
            )
            if on_rollback:
                on_rollback(entry)
            now = due(run)
            receipts = {}
            if now:  # the retrain uses the slice bytes verified before the acknowledgement
                receipts = {
                    r["request_id"]: r
                    for r in catch_up(run, sorted(now), reason="policy", loaded=loaded, early=early)
                }
        finally:
            _settle_early(early)
            finish_erasure()
        receipt = receipts.get(entry["request_id"]) or rollback_receipt(run, entry)
        receipt["already_deleted"] = already
        if duplicates != "ignore":  # returned to the caller only: the stored receipt never names record IDs
            receipt["duplicates_deleted" if duplicates == "delete" else "duplicates_found"] = dupes
        if subject_ids:
            receipt["subject_rows"] = {str(s): int(n) for s, n in subject_rows.items()}
        return receipt


def retrain(
    root: str | Path,
    shards: list[int] | None = None,
    *,
    due_only: bool = False,
    wait_s: float = 0.0,
    runtime: list[str] | tuple[str, ...] = (),
) -> dict:
    """Catch up rolled-back shards now (``sisa retrain``): every one, ``shards`` only, or (``due_only``) those the
    retrain policy says are due. Returns what was retrained and the receipts of the requests it completed."""
    with writer_session(root, "retrain", wait_s, runtime, replay_first=False) as run:
        replay(run, Journal(run.journal_dir), catch_up_due=False)  # erase what a crash left pending first
        n = run.config().sharding.shards
        bad = sorted({s for s in shards or [] if not 0 <= s < n})
        if bad:
            raise UsageError([("shards", f"{s} is not a shard of this run (it has 0..{n - 1})") for s in bad])
        rolled = sorted(rolled_back_shards(run.require_manifest()))
        why = due(run) if due_only else {s: "manual" for s in rolled}
        chosen = [s for s in (rolled if shards is None else shards) if s in why]
        receipts = catch_up(run, chosen, reason="manual" if not due_only else "policy") if chosen else []
        return {
            "shards_retrained": chosen,
            "reasons": {str(s): why[s] for s in chosen},
            "requests_applied": [r["request_id"] for r in receipts],
            "samples_retrained": receipts[0]["catch_up_samples"] if receipts else 0,
            "still_rolled_back": sorted(rolled_back_shards(run.require_manifest())),
            "generation": run.require_manifest()["generation"],
            "receipts": receipts,
        }


def rollback_receipt(run, entry: dict) -> dict:
    """The receipt of a request rolled back and erased whose catch-up retrain is still to come."""
    manifest = run.require_manifest()
    limits = deadlines(run, manifest)
    shards = [int(s) for s in entry["shards"]]
    return {
        "request_id": entry["request_id"],
        "status": entry["status"],
        "records_deleted": entry["records"],
        "subjects_deleted": len(entry.get("subject_hashes", [])),
        "shards_rolled_back": entry["rollback"]["shards"],
        "shards_out": entry["rollback"]["shards_out"],
        "shards_retrained": {},
        "forgotten_at": entry["rolled_back"],
        "rollback_seconds": entry["rollback"]["seconds"],
        "retrain_deadline": min((limits[s]["deadline"] for s in shards if s in limits), default=None),
        "generation": manifest["generation"],
    }


def _retrains_now(run: RunDir, defer: bool) -> bool:
    return not defer and run.config().unlearning.retrain == "immediate"


def _settle_early(early: EarlyRetrain | None) -> None:
    """Never leave the writer session with the early retrain still writing (an error, or results not taken: its
    checkpoints stay unnamed, removed or trusted after a full check by the next refresh of their shards)."""
    if early is not None:
        with contextlib.suppress(
            Exception
        ):  # what the caller raises (or the catch-up that took it) says more
            early.wait()


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
            raise UsageError([("subject_ids", "this run has no data.subject_column; delete by record ID")])
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
    return coerce_ids([value], index.active["subject_id"])[0]


def _require_retrainable(run: RunDir, manifest: dict, affected: dict[int, int]) -> Loaded:
    """Before acknowledging, check the files the retrain will need (every slice file of each affected shard, the
    checkpoint it resumes from): a corrupted one fails the request now, with nothing changed, instead of leaving
    it pending. Returns the slices read, which the retrain then uses instead of reading them again."""
    entries = {e["shard"]: e for e in manifest["shards"]}
    slices, n_f = run.config().sharding.slices, len(run.config().data.features)
    keys = [(s, j) for s in affected for j in range(slices)]  # every shard's files in one stream of reads
    names = [n for s in affected for n in shard_files(s, slices)]
    items = [(run.root / n, manifest["files"].get(n)) for n in names]
    loaded: Loaded = {
        key: (from_bytes(raw, run.root / n, n_f), sha)
        for key, n, (raw, sha) in zip(keys, names, read_checked_all(items), strict=True)
    }
    for s, k in affected.items():
        k = min(k, len(entries[s]["checkpoints"]))  # a rolled-back shard resumes from its last named one
        if k > 0:
            load_checkpoint(run.shard_checkpoints(s) / entries[s]["checkpoints"][k - 1])
    return loaded
