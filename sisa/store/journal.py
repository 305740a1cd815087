"""The write-ahead journal of deletions and additions.

A deletion request is written (status ``pending``) and fsynced before anything else changes: from then on it is
acknowledged and can never be lost. It is replayed to completion by the next sisa command after a crash, then
marked ``applied`` with its receipt. Entries hold keyed hashes (HMAC-SHA256 with the run's secret) of the
record and subject IDs, never the IDs or any record data.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

from .files import atomic_write_json, read_json

PENDING, APPLIED = "pending", "applied"
ROLLED_BACK = "rolled_back"  # erased and served by the checkpoint before its slice; retrain to come (§4.2)


def new_request_id(prefix: str = "del") -> str:
    """``del-...`` for a deletion, ``add-...`` for an addition (UTC time and 8 random hex digits)."""
    return f"{prefix}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


def kind_of(entry: dict) -> str:
    """``delete`` or ``add``; entries written before additions existed have no kind and are deletions."""
    return entry.get("kind", "delete")


class Journal:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, request_id: str) -> Path:
        return self.folder / f"{request_id}.json"

    def begin(
        self,
        request_id: str,
        id_hashes: list[str],
        subject_hashes: list[str],
        shards: dict[int, int],
        records: int,
        before: dict[int, str],
        extra: dict | None = None,
        kind: str = "delete",
    ) -> dict:
        """Write the pending entry durably; returns it. This is the moment of acknowledgement."""
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = {
            "request_id": request_id,
            "kind": kind,
            "status": PENDING,
            "created": time.time(),
            "id_hashes": sorted(id_hashes),
            "subject_hashes": sorted(subject_hashes),
            "shards": {str(s): int(k) for s, k in sorted(shards.items())},
            "records": int(records),
            "before": {str(s): fp for s, fp in before.items()},
            **(extra or {}),
        }
        atomic_write_json(self.path(request_id), entry)
        return entry

    def stage(self, entry: dict, files: dict[str, str]) -> dict:
        """Record (durably, still pending) the SHA-256 of files this request is about to write, before writing them.

        A file read while the request is pending is then accepted only as the manifest's version or the staged
        one, so a torn or corrupted file is never mistaken for the result of an interrupted deletion."""
        staged = {**entry, "staged": {**entry.get("staged", {}), **files}}
        atomic_write_json(self.path(entry["request_id"]), staged)
        return staged

    def staged(self) -> dict[str, set[str]]:
        """Checksums staged by pending requests, per run-relative file name."""
        out: dict[str, set[str]] = {}
        for e in self.pending():
            for name, sha in e.get("staged", {}).items():
                out.setdefault(name, set()).add(sha)
        return out

    def roll_back(self, entry: dict, rollback: dict) -> dict:
        """Record (durably) that the request is erased and its shards rolled back: it is forgotten now."""
        done = {**entry, "status": ROLLED_BACK, "rolled_back": time.time(), "rollback": rollback}
        atomic_write_json(self.path(entry["request_id"]), done)
        return done

    def complete(self, entry: dict, receipt: dict) -> dict:
        done = {**entry, "status": APPLIED, "applied": time.time(), "receipt": receipt}
        atomic_write_json(self.path(entry["request_id"]), done)
        return done

    def get(self, request_id: str) -> dict | None:
        p = self.path(request_id)
        return read_json(p) if p.is_file() else None

    def entries(self) -> list[dict]:
        if not self.folder.is_dir():
            return []
        paths = [*self.folder.glob("del-*.json"), *self.folder.glob("add-*.json")]
        out = [_read_entry(p) for p in paths]
        return sorted(out, key=lambda e: (e["created"], e["request_id"]))

    def pending(self) -> list[dict]:
        return [e for e in self.entries() if e["status"] == PENDING]

    def rolled_back(self) -> list[dict]:
        """Requests forgotten (rolled back, erased) whose catch-up retrain has not finished."""
        return [e for e in self.entries() if e["status"] == ROLLED_BACK]

    def pending_shards(self) -> set[int]:
        """Shards that must not serve: some acknowledged deletion touching them is not yet applied (a pending
        addition does not count: the live models never saw its rows)."""
        return {int(s) for e in self.pending() if kind_of(e) == "delete" for s in e["shards"]}


# Parsed entries keyed by path and (inode, mtime, size): every write replaces the file (new inode), so a hit is
# the same bytes. Serving checks pending deletions on every request; this keeps that O(files) stat calls.
_CACHE: dict[str, tuple[tuple[int, int, int], dict]] = {}


def _read_entry(path: Path) -> dict:
    st = path.stat()
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    entry = read_json(path)
    _CACHE[str(path)] = (key, entry)
    return entry
