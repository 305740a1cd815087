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
from .store.shardfile import ROW_HASH, record_ids, row_keys


def find_duplicates(run: RunDir, index: RecordIndex, positions: np.ndarray) -> list:
    """Record IDs of active records (outside ``positions``) whose features and label equal a record being deleted.

    Every shard file is read through the checksum-verified read; candidates by row hash, confirmed by bytes."""
    config = run.config()
    names = config.data.features
    doomed = index.active.iloc[positions]
    doomed_ids = set(doomed["record_id"].tolist())
    targets: dict[int, list[bytes]] = {}
    for shard in sorted(doomed["shard"].unique().tolist()):
        frame = run.shard_frame(int(shard))
        rows = frame.loc[record_ids(frame).isin(doomed_ids).to_numpy()]
        for h, key in zip(rows[ROW_HASH].to_numpy(), row_keys(rows, names), strict=True):
            targets.setdefault(int(h), []).append(key)
    found = []
    for shard in range(config.sharding.shards):
        frame = run.shard_frame(shard)
        ids = record_ids(frame)
        hit = frame[ROW_HASH].isin(list(targets)).to_numpy() & ~ids.isin(doomed_ids).to_numpy()
        if not hit.any():
            continue
        rows = frame.loc[hit]
        for rid, h, key in zip(
            record_ids(rows), rows[ROW_HASH].to_numpy(), row_keys(rows, names), strict=True
        ):
            if key in targets.get(int(h), []):
                found.append(rid.item() if isinstance(rid, np.generic) else rid)
    return sorted(found, key=str)
