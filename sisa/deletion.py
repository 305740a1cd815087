"""Carrying out one journaled deletion request (docs/design.md, "Deletion lifecycle", steps 3-5, and §4.2).

Two journaled steps. :func:`roll_back` (always, right after the journal write) tombstones the records in the
index, purges their rows from the affected slice files, swaps in a manifest generation in which each affected
shard names only its checkpoints before its earliest affected slice (they never saw the records: the shard serves
the last of them, or is out when slice 0 is hit), deletes every checkpoint trained on the records and marks the
entry ``rolled_back``: from then on the request is forgotten and erased. The catch-up retrain
(:func:`sisa.retraining.catch_up`) restores the shards' accuracy when the retrain policy says so and marks the
entry ``applied``. :func:`apply_entry` does both at once. Each step is idempotent, so replaying a request
interrupted at any point (even kill -9) gives the uninterrupted end state.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .exceptions import IntegrityError
from .refresh import EarlyRetrain
from .retraining import catch_up
from .store.checkpoints import checkpoint_name, fingerprint_chain
from .store.files import read_checked, sha256_bytes, sha256_file
from .store.garbage import collect_garbage, start_erasure
from .store.index import TOMBSTONES_FILE, RecordIndex, index_file, keyed_id_hashes
from .store.journal import PENDING, Journal
from .store.rundir import RunDir
from .store.shardfile import ShardRows, content_hashes, from_bytes, slice_digest, slice_file, to_bytes

# slice files already read and verified in this process: (shard, slice) -> (rows, sha256 of the file's bytes)
Loaded = dict[tuple[int, int], tuple[ShardRows, str]]


def apply_entry(
    run: RunDir,
    entry: dict,
    index: RecordIndex | None = None,
    positions: np.ndarray | None = None,
    loaded: Loaded | None = None,
) -> dict:
    """Roll back and catch up a journaled request at once (idempotent); return its receipt. Caller holds the
    writer lock."""
    loaded = dict(loaded or {})
    entry = roll_back(run, entry, index, positions, loaded)
    receipts = catch_up(run, sorted(int(s) for s in entry["shards"]), loaded=loaded)
    done = Journal(run.journal_dir).get(entry["request_id"]) or entry
    return next((r for r in receipts if r["request_id"] == entry["request_id"]), done.get("receipt", {}))


def roll_back(
    run: RunDir,
    entry: dict,
    index: RecordIndex | None = None,
    positions: np.ndarray | None = None,
    loaded: Loaded | None = None,
    deferred: bool = False,
    background: bool = False,
    early: EarlyRetrain | None = None,
) -> dict:
    """Erase a journaled request's records and roll its shards back (idempotent); return the journal entry,
    now ``rolled_back``. ``deferred``: the caller asked for no retrain now (``delete --defer``): the retrain
    policy alone decides when. Caller holds the writer lock; ``loaded`` as in :func:`apply_entry`, updated with
    the purged slices. ``background``: the stale checkpoints are renamed away now and removed on a thread
    (:mod:`sisa.store.garbage`); the caller calls :func:`~sisa.store.garbage.finish_erasure` before it returns.
    ``early``: started on the purged slices before anything is written, so the catch-up trains while the rollback
    persists; the stale checkpoints are then those the shards' folders held before it started."""
    if entry["status"] != PENDING:
        return entry
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
    loaded = {} if loaded is None else loaded  # updated in place: the catch-up trains on these bytes
    purged, contents = {}, []
    for s in shards:
        purged.update(_purged_slices(run, index, s, slices[s], loaded, contents, secret))
    only = None
    if early is not None:  # the folders' names first: the early retrain adds its own, which are not garbage
        only = {s: _entries(run.shard_checkpoints(s)) for s in shards}
        early.start(run.require_manifest(), loaded, slices)
        only = {s: names - early.names(s) for s, names in only.items()}  # nor is a leftover it trusts
    index.tombstone(contents, "content", entry["request_id"])  # the suppression list (docs/design.md §4.1)
    if removed or contents:
        files.update(index.to_bytes(index.changed))
    files.update(purged)
    if files:  # write-ahead: the checksums go into the journal before the files change
        entry = journal.stage(entry, {rel: sha256_bytes(data) for rel, data in files.items()})
        run.write_files(files)  # tombstones before the index files (see RecordIndex.to_bytes)
    manifest, rolled = _rolled_back_manifest(run, entry, slices, loaded)
    collect_garbage(run, manifest, shards, background, only)  # every checkpoint trained on the records: gone
    entry = journal.roll_back(
        entry,
        {
            "shards": {str(s): k for s, k in rolled.items()},
            "shards_out": sorted(s for s, k in rolled.items() if k == 0),
            "generation": manifest["generation"],
            "deferred": deferred or bool(entry.get("deferred")),
            "seconds": round(time.perf_counter() - t0, 4),
        },
    )
    start_erasure()  # the background removals, if any, now that the journal write is durable
    return entry


def _rolled_back_manifest(
    run: RunDir, entry: dict, slices: dict[int, set[int]], loaded: Loaded
) -> tuple[dict, dict[int, int]]:
    """Swap in (once) the generation where each affected shard names only the checkpoints whose fingerprints the
    purged data still gives: 0..k-1, k its earliest slice changed by any request not yet caught up. Their names
    are unchanged (slices 0..k-1 did not change), so nothing is trained or copied. Returns it and k per shard."""
    config, old = run.config(), run.require_manifest()
    staged = entry.get("staged", {})
    entries = {e["shard"]: dict(e) for e in old["shards"]}
    files = dict(old["files"])
    rolled = {}
    for s in sorted(slices):
        e = entries[s]
        digests, counts = list(e["digests"]), list(e["slice_records"])
        for k in sorted(slices[s]):
            rel = slice_file(s, k)
            if (s, k) in loaded:
                rows, sha = loaded[(s, k)]
            else:  # a replay: the file is already purged (or never changed)
                raw, sha = read_checked(run.root / rel, {old["files"].get(rel), staged.get(rel)} - {None})
                rows = from_bytes(raw, run.root / rel, len(config.data.features))
            digests[k], counts[k], files[rel] = slice_digest(rows), len(rows), sha
        fps = fingerprint_chain(config.digest(), s, digests)
        named = set(e["checkpoints"])
        k = next((j for j, fp in enumerate(fps) if checkpoint_name(j, fp) not in named), len(fps))
        rolled[s] = k
        prior = e.get("rolled_back") or {}
        requests = list(prior.get("requests", []))
        if entry["request_id"] not in requests:
            requests.append(entry["request_id"])
        metrics = old.get("metrics", {})
        e.update(
            records=int(sum(counts)),
            digests=digests,
            slice_records=[int(n) for n in counts],
            checkpoints=e["checkpoints"][:k],
            fingerprint=fps[k - 1] if k else None,
        )
        if k < len(fps):
            e["rolled_back"] = {
                "slice": k,
                "since": prior.get("since", time.time()),
                "requests": requests,
                "accuracy_before": prior.get(
                    "accuracy_before", metrics.get("shard_accuracy", {}).get(str(s))
                ),
                "ensemble_accuracy_before": prior.get(
                    "ensemble_accuracy_before", metrics.get("test_accuracy")
                ),
            }
        entries[s] = e
    for rel in (TOMBSTONES_FILE, *(index_file(s) for s in slices)):
        sha = sha256_file(run.root / rel)
        if sha not in {old["files"].get(rel), staged.get(rel)}:
            raise IntegrityError(run.root / rel, "checksum mismatch (file changed or truncated)")
        files[rel] = sha
    manifest = {**old, "shards": [entries[s] for s in sorted(entries)], "files": files}
    if any(old.get(key) != manifest[key] for key in ("shards", "files")):
        manifest["generation"] = old["generation"] + 1
        run.write_manifest(manifest)
    return manifest, rolled


def _entries(folder) -> set[str]:
    return set(os.listdir(folder)) if folder.is_dir() else set()


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
