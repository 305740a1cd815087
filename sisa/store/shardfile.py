"""The shard-data format: one Arrow IPC file per shard slice (docs/design.md §3).

``data/shard-SSS/slice-KKK.arrow`` holds the rows of one slice of one shard, in training order, with columns::

    _record_id   the record's ID (the user's type: int64 or string)
    _label       class index into config.data.classes (int64)
    _slice       the slice (int32; the same for every row of the file)
    _order       in-shard order key (uint64): rows are sorted by (_order, _record_id)
    _row_hash    uint64 hash of (float32 features, label), to find copies of a deleted record
    features     the feature vector, fixed_size_list<float32>[len(config.data.features)], in that order

Arrow IPC, uncompressed: ``pandas.read_feather(path)`` opens it, a plain ``grep`` sees every stored ID, and reading
one costs a copy, so a deletion rewrites only the slices it changed and a retrain reads its shard's slices fast.
This module is the only place that names these columns; readers use :class:`ShardRows`.

Each slice also has a **content digest** (:func:`slice_digest`: IDs, labels and feature bytes) that the manifest
keeps, so the fingerprint chain of a shard (:func:`sisa.store.checkpoints.fingerprint_chain`) is recomputed from the
bytes only for the slices a change touched; ``verify`` and ``repair`` recompute every digest from the bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from ..exceptions import IntegrityError
from ..sharding import canonical_keys
from .checkpoints import fingerprint_chain, shard_folder
from .files import ipc_bytes, parse_ipc

RECORD_ID, LABEL, SLICE, ORDER, ROW_HASH, FEATURES = (
    "_record_id",
    "_label",
    "_slice",
    "_order",
    "_row_hash",
    "features",
)
COLUMNS = [RECORD_ID, LABEL, SLICE, ORDER, ROW_HASH, FEATURES]


def shard_dir(shard: int) -> str:
    """The shard's data folder, relative to the run directory (named like its checkpoint folder)."""
    return f"data/{shard_folder('', shard).name}"


def slice_file(shard: int, slice_idx: int) -> str:
    """One slice's data file, relative to the run directory."""
    return f"{shard_dir(shard)}/slice-{slice_idx:03d}.arrow"


def shard_files(shard: int, slices: int) -> list[str]:
    return [slice_file(shard, k) for k in range(slices)]


@dataclass
class ShardData:
    """A shard's rows in training order as training needs them; rows of slices 0..k are ``[0:slice_ends[k]]``."""

    features: np.ndarray  # float32 [n, F]
    labels: np.ndarray  # int64 [n]
    slice_ends: np.ndarray  # int64 [R]


@dataclass
class ShardRows:
    """Rows of one slice (or of several, concatenated in slice order), column by column."""

    id_column: (
        pd.Series | pa.ChunkedArray
    )  # the record IDs; read from a file: Arrow until ``ids`` is first used
    labels: np.ndarray  # int64
    slices: np.ndarray  # int32
    orders: np.ndarray  # uint64
    row_hashes: np.ndarray  # uint64
    features: np.ndarray  # float32 [n, F]

    @property
    def ids(self) -> pd.Series:
        """The record IDs (converted once: a retrain reads every slice of a shard but the IDs of few)."""
        if not isinstance(self.id_column, pd.Series):
            self.id_column = self.id_column.to_pandas()
        return self.id_column

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, keep: np.ndarray) -> ShardRows:
        """The rows where ``keep`` (a boolean mask or positions) selects."""
        return ShardRows(
            self.ids[keep].reset_index(drop=True) if isinstance(keep, np.ndarray) else self.ids.iloc[keep],
            self.labels[keep],
            self.slices[keep],
            self.orders[keep],
            self.row_hashes[keep],
            np.ascontiguousarray(self.features[keep]),
        )

    def slice(self, k: int) -> ShardRows:
        return self.take(self.slices == k)


def build_rows(ids: pd.Series, labels: np.ndarray, features: np.ndarray, slices, orders) -> ShardRows:
    """Rows in the file format (unsorted), with their row hashes."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    return ShardRows(
        ids.reset_index(drop=True),
        labels,
        np.asarray(slices, dtype=np.int32),
        np.asarray(orders, dtype=np.uint64),
        row_hashes(features, labels),
        features,
    )


def training_order(rows: ShardRows) -> ShardRows:
    """Rows sorted as they are stored and trained on: by (slice, order key, record ID)."""
    frame = pd.DataFrame({"s": rows.slices, "o": rows.orders, "i": rows.ids.to_numpy()})
    order = frame.sort_values(["s", "o", "i"], kind="stable").index.to_numpy()
    return rows.take(order)


def concat(parts: list[ShardRows], n_features: int) -> ShardRows:
    if not parts:
        return ShardRows(
            pd.Series([], dtype=object),
            np.zeros(0, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.uint64),
            np.zeros(0, np.uint64),
            np.zeros((0, n_features), np.float32),
        )
    ids = pd.concat([p.ids for p in parts], ignore_index=True) if len(parts) > 1 else parts[0].ids
    return ShardRows(
        ids,
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.slices for p in parts]),
        np.concatenate([p.orders for p in parts]),
        np.concatenate([p.row_hashes for p in parts]),
        np.concatenate([p.features for p in parts]),
    )


# ---- bytes ---------------------------------------------------------------------------------------------------
def to_bytes(rows: ShardRows) -> bytes:
    n, f = rows.features.shape
    features = pa.FixedSizeListArray.from_arrays(pa.array(rows.features.reshape(-1)), f)
    table = pa.table(
        {
            RECORD_ID: pa.array(rows.ids.to_numpy() if len(rows) else [], type=_id_type(rows.ids)),
            LABEL: pa.array(rows.labels, pa.int64()),
            SLICE: pa.array(rows.slices, pa.int32()),
            ORDER: pa.array(rows.orders, pa.uint64()),
            ROW_HASH: pa.array(rows.row_hashes, pa.uint64()),
            FEATURES: features,
        }
    )
    return ipc_bytes(table)


def from_bytes(data: bytes, path, n_features: int) -> ShardRows:
    """Parse a slice file's bytes (verified by the caller)."""
    table = parse_ipc(data, path)
    if table.column_names != COLUMNS:
        raise IntegrityError(path, f"unexpected columns {table.column_names}; expected {COLUMNS}")
    column = table.column(FEATURES)
    chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    flat = chunk.values.to_numpy(zero_copy_only=False)  # one file, one chunk: a view of ``data``, no copy
    features = np.asarray(flat, dtype=np.float32).reshape(table.num_rows, n_features)
    features.flags.writeable = False  # training gets its own copy (shard_data_of, concat)
    return ShardRows(
        table.column(RECORD_ID),
        table.column(LABEL).to_numpy().astype(np.int64, copy=False),
        table.column(SLICE).to_numpy().astype(np.int32, copy=False),
        table.column(ORDER).to_numpy().astype(np.uint64, copy=False),
        table.column(ROW_HASH).to_numpy().astype(np.uint64, copy=False),
        features,
    )


def _id_type(ids: pd.Series) -> pa.DataType:
    if pd.api.types.is_integer_dtype(ids):
        return pa.int64()
    return pa.string()


# ---- what training and fingerprints need ----------------------------------------------------------------------
def shard_data(rows: ShardRows, slices: int) -> ShardData:
    """Arrays for training from a shard's rows in training order."""
    return ShardData(
        features=rows.features,
        labels=rows.labels,
        slice_ends=np.searchsorted(rows.slices.astype(np.int64), np.arange(slices), side="right").astype(
            np.int64
        ),
    )


def shard_data_of(parts: list[ShardRows], slices: int) -> ShardData:
    """:func:`shard_data` of a shard's slices in order, without concatenating the columns training ignores."""
    slice_col = np.concatenate([p.slices for p in parts]).astype(np.int64)
    return ShardData(
        features=np.concatenate([p.features for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        slice_ends=np.searchsorted(slice_col, np.arange(slices), side="right").astype(np.int64),
    )


def slice_digest(rows: ShardRows) -> str:
    """SHA-256 of one slice's content as training sees it: canonical IDs, labels, float32 feature bytes."""
    h = hashlib.sha256()
    h.update(b"\x00".join(canonical_keys(rows.ids.to_numpy())))
    h.update(b"\x01")
    h.update(np.ascontiguousarray(rows.labels, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(rows.features, dtype=np.float32).tobytes())
    return h.hexdigest()


def fingerprints(config_digest: str, shard: int, rows: ShardRows, slices: int) -> list[str]:
    """The shard's checkpoint chain recomputed from its rows (every slice's digest from the content)."""
    return fingerprint_chain(config_digest, shard, [slice_digest(rows.slice(k)) for k in range(slices)])


def row_hashes(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint64 hash of each row's float32 feature bytes and label (vectorised)."""
    frame = pd.DataFrame(np.ascontiguousarray(features, dtype=np.float32))
    frame["_label"] = np.asarray(labels, dtype=np.int64)
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(np.uint64)


def row_keys(rows: ShardRows) -> list[bytes]:
    """Each row's exact (float32 features, label) bytes, to confirm a row-hash match."""
    feats = np.ascontiguousarray(rows.features, dtype=np.float32)
    return [
        f.tobytes() + int(y).to_bytes(8, "little", signed=True)
        for f, y in zip(feats, rows.labels, strict=True)
    ]


def content_hashes(rows: ShardRows, secret: bytes) -> list[str]:
    """Keyed hash (HMAC-SHA256 hex under the run's secret) of each row's content: its exact float32 feature bytes
    and label, never its ID or subject. The tombstones keep these for deleted rows (kind ``content``), so a later
    re-import of a forgotten row under a new surrogate ID is recognised without storing the row (docs/design.md §4.1)."""
    return [hmac.new(secret, b"content:" + key, hashlib.sha256).hexdigest() for key in row_keys(rows)]


# ---- an addition's staged rows: incoming/<request id>.arrow (docs/design.md §4.1) ------------------------------
SHARD, SUBJECT = "_shard", "_subject_id"


def incoming_file(request_id: str) -> str:
    """The file an acknowledged addition keeps its placed rows in until they are merged, relative to the run."""
    return f"incoming/{request_id}.arrow"


def incoming_bytes(rows: ShardRows, shards: np.ndarray, subjects: pd.Series | None) -> bytes:
    """The slice-file format plus each row's shard and subject ID (null without subjects)."""
    table = parse_ipc(to_bytes(rows), "incoming")
    table = table.append_column(SHARD, pa.array(np.asarray(shards, dtype=np.int32), pa.int32()))
    subj = subjects if subjects is not None else pd.Series([None] * len(rows), dtype="string")
    sub_type = pa.int64() if pd.api.types.is_integer_dtype(subj) else pa.string()
    table = table.append_column(SUBJECT, pa.array(subj.to_numpy(), type=sub_type, from_pandas=True))
    return ipc_bytes(table)


def incoming_from_bytes(data: bytes, path, n_features: int) -> tuple[ShardRows, np.ndarray, pd.Series]:
    """Rows, shard per row and subject per row of a staged addition (bytes verified by the caller)."""
    table = parse_ipc(data, path)
    if table.column_names != [*COLUMNS, SHARD, SUBJECT]:
        raise IntegrityError(path, f"unexpected columns {table.column_names}")
    shards = table.column(SHARD).to_numpy().astype(np.int32, copy=False)
    subjects = table.column(SUBJECT).to_pandas()
    rows = from_bytes(ipc_bytes(table.drop_columns([SHARD, SUBJECT])), path, n_features)
    return rows, shards, subjects
