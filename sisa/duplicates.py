"""Finding duplicates of deleted records: the same features and label under another record ID.

A copy of a deleted record under another ID would keep teaching the model what the requester asked it to forget.
Every shard data file keeps a 64-bit hash of each row's (features, label) (:mod:`sisa.store.shardfile`), so finding copies
reads one small column per shard and confirms candidates by comparing the actual bytes: no pairwise scan. The
duplicates' IDs are returned to the caller only; they are never written to the run directory.
"""

from __future__ import annotations

import numpy as np

from .store.index import RecordIndex
from .store.rundir import RunDir
from .store.shardfile import row_keys


def find_duplicates(run: RunDir, index: RecordIndex, positions: np.ndarray) -> list:
    """Record IDs of active records (outside ``positions``) whose features and label equal a record being deleted.

    Every shard file is read through the checksum-verified read; candidates by row hash, confirmed by bytes."""
    config = run.config()
    doomed = index.active.iloc[positions]
    doomed_ids = set(doomed["record_id"].tolist())
    targets: dict[int, list[bytes]] = {}
    for shard in sorted(doomed["shard"].unique().tolist()):
        rows = run.shard_rows(int(shard))
        rows = rows.take(rows.ids.isin(doomed_ids).to_numpy())
        for h, key in zip(rows.row_hashes, row_keys(rows), strict=True):
            targets.setdefault(int(h), []).append(key)
    found = []
    for shard in range(config.sharding.shards):
        rows = run.shard_rows(shard)
        hit = (
            np.isin(rows.row_hashes, np.array(list(targets), dtype=np.uint64))
            & ~rows.ids.isin(doomed_ids).to_numpy()
        )
        if not hit.any():
            continue
        rows = rows.take(hit)
        for rid, h, key in zip(rows.ids, rows.row_hashes, row_keys(rows), strict=True):
            if key in targets.get(int(h), []):
                found.append(rid.item() if isinstance(rid, np.generic) else rid)
    return sorted(found, key=str)
