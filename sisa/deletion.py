"""Carrying out one journaled deletion request (docs/design.md, "Deletion lifecycle", steps 3-5).

:func:`apply_entry` tombstones the records in the index, purges their rows from the shard data, retrains each
affected shard once from its earliest affected slice (:func:`sisa.refresh.refresh`), swaps the manifest, deletes
every checkpoint trained on the records and marks the entry applied with its receipt. It is idempotent, so replaying
a request interrupted at any point (even kill -9) gives the uninterrupted end state.
"""

from __future__ import annotations

import time

import numpy as np

from .refresh import refresh
from .store.files import atomic_write_bytes, parquet_bytes, sha256_bytes
from .store.index import RecordIndex, keyed_id_hashes
from .store.journal import Journal
from .store.rundir import RunDir
from .store.shardfile import data_file, record_ids


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
        files.update(index.to_bytes())
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


def _purged_shard_data(run: RunDir, index: RecordIndex, shard: int) -> dict[str, bytes]:
    """The shard's data file without rows that are no longer in the index (the real erasure); {} if unchanged."""
    frame = run.shard_frame(shard)  # verified: the manifest's version, or the one this request staged
    live = index.active.loc[index.active["shard"] == shard, "record_id"]
    keep = record_ids(frame).isin(live).to_numpy()
    if keep.all():
        return {}
    return {data_file(shard): parquet_bytes(frame.loc[keep].reset_index(drop=True))}
