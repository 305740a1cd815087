"""The write-ahead journal of deletions and additions.

A deletion request is written (status ``pending``) and fsynced before anything else changes: from then on it is
acknowledged and can never be lost. It is replayed to completion by the next sisa command after a crash, then
marked ``applied`` with its receipt. Entries hold keyed hashes (HMAC-SHA256 with the run's secret) of the
record and subject IDs, never the IDs or any record data.

An applied entry is then filed away into ``journal/applied/`` (one rename): the questions asked on every
deletion and every served snapshot (what is pending, what is rolled back) list the open requests alone, so their
cost does not grow with the run's history (docs/design.md §3). An entry reads the same in either place; one left
applied in the open folder (a crash before the rename, or a run from before the folder) is filed away by the next
writer's replay (:meth:`Journal.unfiled`, :meth:`Journal.file_away`).
"""

from __future__ import annotations

import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

from .files import atomic_write_json, read_json, replace_path

PENDING, APPLIED = "pending", "applied"
ROLLED_BACK = "rolled_back"  # erased and served by the checkpoint before its slice; retrain to come (§4.2)
APPLIED_FOLDER = "applied"  # journal/applied/<request>.json: finished requests, out of the open folder


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
        """Where a request's entry is written, and read while it is open."""
        return self.folder / f"{request_id}.json"

    def filed_path(self, request_id: str) -> Path:
        """Where an applied request's entry is filed away."""
        return self.folder / APPLIED_FOLDER / f"{request_id}.json"

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
        """Record (durably) that the request is applied, then file its entry away."""
        done = {**entry, "status": APPLIED, "applied": time.time(), "receipt": receipt}
        atomic_write_json(self.path(entry["request_id"]), done)
        self.file_away(done)
        return done

    def file_away(self, entry: dict) -> None:
        """Move an applied entry into ``applied/``. Not fsynced: the entry reads the same in either place (a
        rename lost to a power cut leaves it to the next replay's sweep)."""
        (self.folder / APPLIED_FOLDER).mkdir(exist_ok=True)
        replace_path(self.path(entry["request_id"]), self.filed_path(entry["request_id"]), sync=False)

    def get(self, request_id: str) -> dict | None:
        # the open place first: an entry filed away meanwhile is then found in applied/
        for p in (self.path(request_id), self.filed_path(request_id)):
            try:
                return read_json(p)
            except FileNotFoundError:
                continue
        return None

    def entries(self) -> list[dict]:
        """Every request, open and filed away, in arrival order (the history)."""
        seen = {e["request_id"]: e for e in self._listed(self.folder)}  # open first: see get()
        seen.update({e["request_id"]: e for e in self._listed(self.folder / APPLIED_FOLDER)})
        return _in_order(seen.values())

    def open_entries(self) -> list[dict]:
        """The requests not yet applied, in arrival order: one stat per open request, none per finished one."""
        return _in_order(e for e in self._listed(self.folder) if e["status"] != APPLIED)

    def unfiled(self) -> list[dict]:
        """Applied entries still in the open folder (see the module docstring)."""
        return [e for e in self._listed(self.folder) if e["status"] == APPLIED]

    def pending(self) -> list[dict]:
        return [e for e in self.open_entries() if e["status"] == PENDING]

    def rolled_back(self) -> list[dict]:
        """Requests forgotten (rolled back, erased) whose catch-up retrain has not finished."""
        return [e for e in self.open_entries() if e["status"] == ROLLED_BACK]

    @staticmethod
    def _listed(folder: Path) -> list[dict]:
        try:
            names = [
                d.path for d in os.scandir(folder) if d.name.startswith(_KINDS) and d.name.endswith(".json")
            ]
        except FileNotFoundError:
            return []
        out = []
        for path in names:
            try:
                out.append(_read_entry(path))
            except FileNotFoundError:  # filed away since the listing: applied, and listed there after this
                continue
        return out

    def pending_shards(self) -> set[int]:
        """Shards that must not serve: some acknowledged deletion touching them is not yet applied (a pending
        addition does not count: the live models never saw its rows)."""
        return {int(s) for e in self.pending() if kind_of(e) == "delete" for s in e["shards"]}


# Parsed entries keyed by path and (inode, mtime, size): every write replaces the file (new inode), so a hit is
# the same bytes. Serving checks pending deletions on every request; this keeps that O(files) stat calls.
_CACHE: dict[str, tuple[tuple[int, int, int], dict]] = {}
_MAX_CACHED = 50_000  # entries (a few KB each): a long-lived server drops them all past this and starts again


_KINDS = ("del-", "add-")  # entry file names (see new_request_id)


def _in_order(entries) -> list[dict]:
    return sorted(entries, key=lambda e: (e["created"], e["request_id"]))


def _read_entry(path: str) -> dict:
    st = os.stat(path)
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    entry = read_json(Path(path))
    if len(_CACHE) >= _MAX_CACHED:
        _CACHE.clear()
    _CACHE[path] = (key, entry)
    return entry
