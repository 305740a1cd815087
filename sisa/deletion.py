"""Carrying out one journaled deletion request (docs/design.md, "Deletion lifecycle", steps 3-5).

:func:`apply_entry` tombstones the records in the index, purges their rows from the affected slice files, retrains each
affected shard once from its earliest affected slice (:func:`sisa.refresh.refresh`), swaps the manifest, deletes
every checkpoint trained on the records and marks the entry applied with its receipt. It is idempotent, so replaying
a request interrupted at any point (even kill -9) gives the uninterrupted end state.
"""

from __future__ import annotations

import time

import numpy as np

from .refresh import refresh
from .store.files import sha256_bytes
from .store.index import RecordIndex, keyed_id_hashes
from .store.journal import Journal
from .store.rundir import RunDir
from .store.shardfile import ShardRows, content_hashes, slice_file, to_bytes

# slice files already read and verified in this process: (shard, slice) -> (rows, sha256 of the file's bytes)
Loaded = dict[tuple[int, int], tuple[ShardRows, str]]


def apply_entry(
    run: RunDir,
    entry: dict,
    index: RecordIndex | None = None,
    positions: np.ndarray | None = None,
    loaded: Loaded | None = None,
) -> dict:
    """Carry out a journaled request (idempotent). Caller holds the writer lock. ``loaded``: slice files the
    caller read and verified for this request (a replay reads them itself)."""
    t0 = time.perf_counter()
    secret = run.secret()
    shards = sorted(int(s) for s in entry["shards"])
    journal = Journal(run.journal_dir)
    if index is None:
        index = run.index()  # verified: the manifest's version, or the one this request staged
        positions = _positions_by_hash(index, secret, entry["id_hashes"], shards)
    slices = affected_slices(entry, run.config().sharding.slices)
    files: dict[str, bytes] = {}
    removed = positions is not None and len(positions) > 0
    if removed:
        index.remove(positions, secret, entry["request_id"], subject_hashes=entry.get("subject_hashes", []))
    loaded = dict(loaded or {})
    purged, contents = {}, []
    for s in shards:
        purged.update(_purged_slices(run, index, s, slices[s], loaded, contents, secret))
    index.tombstone(contents, "content", entry["request_id"])  # the suppression list (docs/design.md §4.1)
    if removed or contents:
        files.update(index.to_bytes(index.changed))
    files.update(purged)
    if files:  # write-ahead: the checksums go into the journal before the files change
        entry = journal.stage(entry, {rel: sha256_bytes(data) for rel, data in files.items()})
        run.write_files(files)  # tombstones before the index files (see RecordIndex.to_bytes)
    report = refresh(
        run, shards, metrics=False, staged=entry.get("staged", {}), changed=slices, loaded=loaded
    )
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


def affected_slices(entry: dict, slices: int) -> dict[int, set[int]]:
    """Per shard, the slices whose rows a request removes: recorded when it was journaled (every slice from the
    earliest affected one for entries that did not record them)."""
    recorded = entry.get("slices")
    if recorded is not None:
        return {int(s): {int(k) for k in ks} for s, ks in recorded.items()}
    return {int(s): set(range(int(k), slices)) for s, k in entry["shards"].items()}


def _purged_slices(
    run: RunDir,
    index: RecordIndex,
    shard: int,
    slices: set[int],
    loaded: Loaded,
    contents: list[str],
    secret: bytes,
) -> dict[str, bytes]:
    """The shard's affected slice files without rows that are no longer in the index (the real erasure); only
    those that change. Each is read verified (the manifest's version, or the one this request staged) unless the
    caller already did; ``loaded`` is updated with the purged rows, ``contents`` extended with the keyed content
    hashes of the rows purged."""
    live = index.active.loc[index.active["shard"] == shard]
    out = {}
    for k in sorted(slices):
        rows = loaded[(shard, k)][0] if (shard, k) in loaded else run.shard_rows(shard, [k])
        keep = rows.ids.isin(live.loc[live["slice"] == k, "record_id"]).to_numpy()
        if not keep.all():
            contents += content_hashes(rows.take(~keep), secret)
            data = to_bytes(rows.take(keep))
            out[slice_file(shard, k)] = data
            loaded[(shard, k)] = (rows.take(keep), sha256_bytes(data))
    return out
