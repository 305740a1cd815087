"""The shard-data file format: one Parquet file per shard, rows in training order (docs/design.md, "Run directory").

Columns, in this order::

    _record_id   the record's ID (the user's type)
    _label       class index into config.data.classes (int64)
    _slice       the record's slice (int32)
    _order       in-shard order key (uint64): rows are sorted by (_slice, _order, _record_id)
    _row_hash    uint64 hash of (float32 features, label), to find copies of a deleted record
    <features>   config.data.features, float32 values as trained on

This module is the only place that names these columns; every reader goes through :class:`ShardData` or the
helpers below, and every file is read through the checksum-verified :meth:`sisa.store.rundir.RunDir.shard_frame`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .checkpoints import fingerprint_chain, shard_folder

RECORD_ID, LABEL, SLICE, ORDER, ROW_HASH = "_record_id", "_label", "_slice", "_order", "_row_hash"
META_COLUMNS = [RECORD_ID, LABEL, SLICE, ORDER, ROW_HASH]


def data_file(shard: int) -> str:
    """The shard's data file, relative to the run directory (named like its checkpoint folder)."""
    return f"data/{shard_folder('', shard).name}.parquet"


@dataclass
class ShardData:
    """A shard's rows in training order; rows of slices 0..k are ``[0:slice_ends[k]]``."""

    features: np.ndarray  # float32 [n, F]
    labels: np.ndarray  # int64 [n]
    slice_ends: np.ndarray  # int64 [R]


def build_frame(
    ids: pd.Series,
    labels: np.ndarray,
    features: np.ndarray,
    feature_names: list[str],
    placement: pd.DataFrame,
) -> pd.DataFrame:
    """All rows of a new run in the file format (``placement``: shard/slice/order per row), unsorted."""
    frame = pd.DataFrame(np.ascontiguousarray(features, dtype=np.float32), columns=feature_names)
    meta = pd.DataFrame(
        {
            RECORD_ID: ids.to_numpy(),
            LABEL: np.asarray(labels, dtype=np.int64),
            SLICE: placement["slice"].to_numpy(np.int32),
            ORDER: placement["order"].to_numpy(np.uint64),
            ROW_HASH: row_hashes(features, labels),
        }
    )
    return pd.concat([meta, frame], axis=1)


def training_order(frame: pd.DataFrame) -> pd.DataFrame:
    """One shard's rows sorted as they are stored and trained on."""
    return frame.sort_values([SLICE, ORDER, RECORD_ID], kind="stable").reset_index(drop=True)


def shard_data(frame: pd.DataFrame, feature_names: list[str], slices: int) -> ShardData:
    """Arrays for training from a shard frame already in training order."""
    slice_col = frame[SLICE].to_numpy(np.int64)
    return ShardData(
        features=np.ascontiguousarray(frame[feature_names].to_numpy(np.float32)),
        labels=frame[LABEL].to_numpy(np.int64),
        slice_ends=np.searchsorted(slice_col, np.arange(slices), side="right").astype(np.int64),
    )


def record_ids(frame: pd.DataFrame) -> pd.Series:
    return frame[RECORD_ID]


def labels_of(frame: pd.DataFrame) -> np.ndarray:
    return frame[LABEL].to_numpy(np.int64)


def slices_of(frame: pd.DataFrame) -> np.ndarray:
    return frame[SLICE].to_numpy(np.int64)


def fingerprints(config_digest: str, shard: int, frame: pd.DataFrame, data: ShardData) -> list[str]:
    """The shard's checkpoint chain as its stored rows give it (``data``: ``shard_data(frame, ...)``)."""
    ids = frame[RECORD_ID].to_numpy()
    return fingerprint_chain(config_digest, shard, ids, data.labels, data.features, data.slice_ends)


def row_hashes(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint64 hash of each row's float32 feature bytes and label (vectorised)."""
    frame = pd.DataFrame(np.ascontiguousarray(features, dtype=np.float32))
    frame[LABEL] = np.asarray(labels, dtype=np.int64)
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(np.uint64)


def row_keys(frame: pd.DataFrame, feature_names: list[str]) -> list[bytes]:
    """Each row's exact (float32 features, label) bytes, to confirm a row-hash match."""
    feats = np.ascontiguousarray(frame[feature_names].to_numpy(np.float32))
    labels = frame[LABEL].to_numpy(np.int64)
    return [
        f.tobytes() + int(y).to_bytes(8, "little", signed=True) for f, y in zip(feats, labels, strict=True)
    ]
