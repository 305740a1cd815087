"""Finding duplicates of deleted records: the same features and label under another record ID.

A copy of a deleted record under another ID would keep teaching the model what the requester asked it to forget.
Every shard data file keeps a 64-bit hash of each row's (features, label) in ``_row_hash``, so finding copies
reads one small column per shard and confirms candidates by comparing the actual bytes: no pairwise scan. The
duplicates' IDs are returned to the caller only; they are never written to the run directory.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .store.index import RecordIndex
from .store.rundir import RunDir

HASH_COLUMN = "_row_hash"


def row_hashes(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint64 hash of each row's float32 feature bytes and label (vectorised)."""
    frame = pd.DataFrame(np.ascontiguousarray(features, dtype=np.float32))
    frame["_label"] = np.asarray(labels, dtype=np.int64)
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(np.uint64)


def find_duplicates(run: RunDir, index: RecordIndex, positions: np.ndarray) -> list:
    """Record IDs of active records (outside ``positions``) whose features and label equal a record being deleted."""
    config = run.config()
    names = config.data.features
    doomed = index.active.iloc[positions]
    doomed_ids = set(doomed["record_id"].tolist())
    targets: dict[int, list[bytes]] = {}
    for shard in sorted(doomed["shard"].unique().tolist()):
        frame = run.shard_frame(int(shard))
        rows = frame.loc[frame["_record_id"].isin(doomed_ids)]
        for h, key in zip(rows[HASH_COLUMN].to_numpy(), _row_keys(rows, names), strict=True):
            targets.setdefault(int(h), []).append(key)
    found = []
    for shard in range(config.sharding.shards):
        path = run.data_path(shard)
        cols = pq.read_table(path, columns=["_record_id", HASH_COLUMN]).to_pandas()
        hit = (
            cols[HASH_COLUMN].isin(list(targets)).to_numpy() & ~cols["_record_id"].isin(doomed_ids).to_numpy()
        )
        if not hit.any():
            continue
        frame = run.shard_frame(shard)
        rows = frame.loc[hit]
        for rid, h, key in zip(
            rows["_record_id"], rows[HASH_COLUMN].to_numpy(), _row_keys(rows, names), strict=True
        ):
            if key in targets.get(int(h), []):
                found.append(rid.item() if isinstance(rid, np.generic) else rid)
    return sorted(found, key=str)


def _row_keys(rows: pd.DataFrame, names: list[str]) -> list[bytes]:
    feats = np.ascontiguousarray(rows[names].to_numpy(np.float32))
    labels = rows["_label"].to_numpy(np.int64)
    return [
        f.tobytes() + int(y).to_bytes(8, "little", signed=True) for f, y in zip(feats, labels, strict=True)
    ]
