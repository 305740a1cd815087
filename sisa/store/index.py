"""The persistent record index: where every active record lives, and tombstones for deleted ones.

Stored as ``index/shard-SSS.arrow`` (each shard's active records) and ``tombstones.arrow`` (deleted ones), Arrow
IPC files replaced atomically; a deletion rewrites the index files of the shards it touched only. Active rows carry
``record_id`` (and ``subject_id`` when subjects are configured), ``slice`` and the in-shard ``order`` key. Deleted records keep only a keyed hash (HMAC-SHA256 with the run's secret) of their ID and
the deletion request id, so "already deleted" can be answered without keeping the ID.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ..sharding import canonical_keys
from .files import atomic_write_bytes, ipc_bytes, parse_ipc, sha256_bytes

ACTIVE_COLUMNS = ["record_id", "subject_id", "shard", "slice", "order"]
SHARD_COLUMNS = ["record_id", "subject_id", "slice", "order"]  # a shard's file: its number is in the name
TOMBSTONE_COLUMNS = ["id_hash", "kind", "request_id"]
TOMBSTONES_FILE = "tombstones.arrow"


def index_file(shard: int) -> str:
    """One shard's index file, relative to the run directory."""
    return f"index/shard-{shard:03d}.arrow"


def _table(frame: pd.DataFrame, types: dict[str, pa.DataType]) -> pa.Table:
    return pa.table(
        {c: pa.array(frame[c].to_numpy(), type=types[c], from_pandas=True) for c in frame.columns}
    )


def keyed_id_hashes(ids, secret: bytes, kind: str = "record") -> list[str]:
    """HMAC-SHA256 (hex) of each ID under the run's secret; ``kind`` separates record and subject IDs."""
    prefix = f"{kind}:".encode()
    return [hmac.new(secret, prefix + b, hashlib.sha256).hexdigest() for b in canonical_keys(ids)]


def coerce_ids(requested: list, like: pd.Series) -> list:
    """Convert requested IDs (often strings from a CLI or JSON) to the index's ID type where they parse."""
    if pd.api.types.is_integer_dtype(like):
        out = []
        for v in requested:
            if isinstance(v, (bool, np.bool_)) or (isinstance(v, float) and not v.is_integer()):
                out.append(str(v))  # True or 3.7 is no integer ID (int() would turn them into 1 and 3)
                continue
            try:
                out.append(int(v))
            except (TypeError, ValueError):
                out.append(str(v))
        return out
    return [str(v) for v in requested]


@dataclass
class RecordIndex:
    active: pd.DataFrame  # ACTIVE_COLUMNS, one row per live record
    tombstones: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TOMBSTONE_COLUMNS))
    has_subjects: bool = False
    changed: set[int] = field(default_factory=set)  # shards whose rows changed since the index was read

    @classmethod
    def build(cls, record_ids: pd.Series, placement: pd.DataFrame, subjects: pd.Series | None) -> RecordIndex:
        active = pd.DataFrame(
            {
                "record_id": record_ids.reset_index(drop=True),
                "subject_id": (
                    subjects.reset_index(drop=True)
                    if subjects is not None
                    else pd.Series([None] * len(record_ids), dtype="string")
                ),
                "shard": placement["shard"].to_numpy(np.int32),
                "slice": placement["slice"].to_numpy(np.int32),
                "order": placement["order"].to_numpy(np.uint64),
            }
        )
        return cls(active=active, tombstones=_empty_tombstones(), has_subjects=subjects is not None)

    # ---- persistence: one file per shard, and the tombstones (docs/design.md §3) ------------------------------
    def to_bytes(self, shards: Iterable[int]) -> dict[str, bytes]:
        """The tombstones' and the given shards' index files, in memory, tombstones first (the order they are
        written in: a crash in between leaves records both tombstoned and active, which the journal's replay
        resolves by removing them again)."""
        # converted column by column, as strings (no pandas copy first)
        tomb = self.tombstones[TOMBSTONE_COLUMNS]
        out = {TOMBSTONES_FILE: ipc_bytes(_table(tomb, {c: pa.string() for c in TOMBSTONE_COLUMNS}))}
        wanted = sorted(set(shards))
        column = self.active["shard"].to_numpy()
        if len(wanted) > 4:  # one pass for many shards; a mask each for a deletion's few
            by_shard = self.active.groupby("shard", sort=False).indices
        for s in wanted:
            at = by_shard.get(s, np.zeros(0, np.int64)) if len(wanted) > 4 else np.flatnonzero(column == s)
            rows = self.active.iloc[at]
            out[index_file(s)] = ipc_bytes(_table(rows[SHARD_COLUMNS], self._types()))
        return out

    def _types(self) -> dict[str, pa.DataType]:
        ids = pa.int64() if pd.api.types.is_integer_dtype(self.active["record_id"]) else pa.string()
        col = self.active["subject_id"]
        subjects = pa.int64() if self.has_subjects and pd.api.types.is_integer_dtype(col) else pa.string()
        return {"record_id": ids, "subject_id": subjects, "slice": pa.int32(), "order": pa.uint64()}

    def save(self, root: Path, shards: int) -> dict[str, str]:
        """Write every file of the index under ``root``; return their SHA-256s by run-relative name."""
        shas = {}
        for rel, data in self.to_bytes(range(shards)).items():
            path = Path(root) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            shas[rel] = sha256_bytes(data)
        return shas

    @classmethod
    def load(cls, read: Callable[[str], bytes], shards: int, has_subjects: bool = False) -> RecordIndex:
        """The index from its files; ``read(run-relative name)`` returns a file's (verified) bytes."""
        parts = []  # concatenated as Arrow and converted to pandas once (one conversion per file costs 4x)
        for s in range(shards):
            part = parse_ipc(read(index_file(s)), index_file(s))
            parts.append(part.append_column("shard", pa.array(np.full(part.num_rows, s, dtype=np.int32))))
        active = pa.concat_tables(parts, promote_options="default").to_pandas()
        for col, dt in (("shard", np.int32), ("slice", np.int32), ("order", np.uint64)):
            active[col] = active[col].astype(dt)
        tomb = parse_ipc(read(TOMBSTONES_FILE), TOMBSTONES_FILE).to_pandas()
        return cls(active=active[ACTIVE_COLUMNS], tombstones=tomb, has_subjects=has_subjects)

    # ---- lookups ----------------------------------------------------------------------------------------------
    def positions_of(self, ids: list, column: str = "record_id") -> np.ndarray:
        """Positions in ``active`` of each requested ID (vectorised; -1 when not active).

        For ``subject_id`` a subject has many rows: returns positions of every row of the requested subjects."""
        col = self.active[column]
        wanted = coerce_ids(ids, col)
        if column == "record_id":
            return pd.Index(col).get_indexer(pd.Index(wanted, dtype=object if not wanted else None))
        mask = col.isin(wanted).to_numpy()
        return np.flatnonzero(mask)

    def unknown(self, ids: list, column: str = "record_id") -> list:
        col = self.active[column]
        present = set(pd.unique(col[col.isin(coerce_ids(ids, col))]).tolist())
        return [i for i, c in zip(ids, coerce_ids(ids, col), strict=True) if c not in present]

    def already_deleted(self, ids: list, secret: bytes, kind: str = "record") -> list:
        if not ids or not len(self.tombstones):
            return []
        known = set(self.tombstones.loc[self.tombstones["kind"] == kind, "id_hash"])
        hashes = keyed_id_hashes(coerce_ids(ids, self.active[f"{kind}_id"]), secret, kind)
        return [i for i, h in zip(ids, hashes, strict=True) if h in known]

    # ---- mutation ---------------------------------------------------------------------------------------------
    def remove(
        self, positions: np.ndarray, secret: bytes, request_id: str, subject_hashes: list[str] | None = None
    ) -> None:
        """Drop the rows at ``positions`` and tombstone their IDs (and the given subject hashes) by keyed hash."""
        gone = self.active.iloc[positions]
        hashes = keyed_id_hashes(list(gone["record_id"]), secret, "record")
        rows = [pd.DataFrame({"id_hash": hashes, "kind": "record", "request_id": request_id})]
        if subject_hashes:
            rows.append(
                pd.DataFrame({"id_hash": list(subject_hashes), "kind": "subject", "request_id": request_id})
            )
        self._add_tombstones(pd.concat(rows, ignore_index=True))
        keep = np.ones(len(self.active), dtype=bool)
        keep[positions] = False
        self.changed |= {int(s) for s in gone["shard"].unique()}
        self.active = self.active.loc[keep].reset_index(drop=True)

    def tombstone(self, hashes: list[str], kind: str, request_id: str) -> None:
        """Add keyed hashes of another kind (``content``: a deleted row's features and label) to the tombstones."""
        if hashes:
            self._add_tombstones(
                pd.DataFrame({"id_hash": list(hashes), "kind": kind, "request_id": request_id})
            )

    def _add_tombstones(self, rows: pd.DataFrame) -> None:
        """Append the rows whose hash is not tombstoned yet (the first tombstone of a hash stays), checking the
        few new hashes against the many old ones rather than deduplicating the whole table again."""
        hashes, old = rows["id_hash"].tolist(), self.tombstones["id_hash"]
        seen = set(old[old.isin(hashes)].tolist()) if len(old) else set()  # isin the few: fast this way round
        fresh = []  # not tombstoned yet, and the first of its repeats in ``rows``
        for h in hashes:
            fresh.append(h not in seen)
            seen.add(h)
        rows = rows if all(fresh) else rows.loc[fresh]
        if len(rows):
            self.tombstones = pd.concat([self.tombstones, rows], ignore_index=True)

    def untombstone(self, hashes: list[str]) -> None:
        """Drop tombstones (a returning person readmitted with ``allow_returning``: the ID is active again)."""
        if hashes and len(self.tombstones):
            keep = ~self.tombstones["id_hash"].isin(list(hashes))
            self.tombstones = self.tombstones.loc[keep].reset_index(drop=True)

    def tombstoned(self, hashes: list[str], kind: str) -> np.ndarray:
        """Boolean mask: which of ``hashes`` the tombstones hold under ``kind``."""
        known = (
            self.tombstones.loc[self.tombstones["kind"] == kind, "id_hash"] if len(self.tombstones) else []
        )
        return pd.Index(list(hashes), dtype=object).isin(list(known)) if hashes else np.zeros(0, dtype=bool)

    def insert(self, rows: pd.DataFrame) -> None:
        """Append active records (ACTIVE_COLUMNS) that an addition placed; marks their shards changed."""
        rows = rows[ACTIVE_COLUMNS].astype({"shard": np.int32, "slice": np.int32, "order": np.uint64})
        self.changed |= {int(s) for s in rows["shard"].unique()}
        self.active = pd.concat([self.active, rows], ignore_index=True)

    def shard_rows(self, shard: int) -> pd.DataFrame:
        """The shard's active rows in training order: by (slice, order key, record ID)."""
        rows = self.active.loc[self.active["shard"] == shard]
        return rows.sort_values(["slice", "order", "record_id"], kind="stable").reset_index(drop=True)

    def counts(self, shards: int, slices: int) -> np.ndarray:
        """[shards, slices] matrix of active record counts."""
        m = np.zeros((shards, slices), dtype=np.int64)
        np.add.at(m, (self.active["shard"].to_numpy(), self.active["slice"].to_numpy()), 1)
        return m


def _empty_tombstones() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype="string") for c in TOMBSTONE_COLUMNS})
