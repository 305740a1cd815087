"""Serve aggregated predictions over HTTP (FastAPI + uvicorn) while deletions are applied live.

Strict mode: once a deletion is accepted, no answer is computed by a sub-model that saw a deleted record. The
server keeps its serving state as one immutable :class:`Snapshot` (sub-models, generation, excluded shards) that is
swapped atomically under a lock; ``/predict`` takes one snapshot reference and computes only from it, so no
request sees a mix of generations (predictions run in parallel on an :class:`EnsemblePool`, copies of the
snapshot's ensemble). Deletions run in ONE background thread, in order, through
:func:`sisa.unlearning.delete`; its ``on_ack`` hook (called right after the journal fsync) swaps in a snapshot
without the affected shards *before* the 202 answer is sent, so "accepted" implies "excluded". Each shard
returns once its retrained generation is in the manifest and its journal entry is applied.

Deletions made by another process (``sisa delete``) are honoured too: before answering, a request stats the
manifest and the journal folder (cheap) and rebuilds the snapshot from disk when either changed. File times are
coarse (a clock tick), so a snapshot read within ``RACY_NS`` of a change is re-checked on the next request, the
way git treats "racily clean" index entries.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from ..aggregation import Ensemble
from ..exceptions import SisaError
from ..retraining import rolled_back_shards, shard_states
from ..session import recover
from ..store.checkpoints import load_checkpoint
from ..store.journal import PENDING, Journal, kind_of
from ..store.rundir import RunDir
from ..tables.encoder import Encoder
from ..tables.schema import schema_of
from ..train.models import shard_model
from .schema import ApiError, ServerSettings

log = logging.getLogger("sisa.serving.state")
RACY_NS = 50_000_000  # a file time this close to "now" may hide a second change in the same clock tick
REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

__all__ = ["EnsemblePool", "ServingState", "Snapshot"]


class EnsemblePool:
    """Up to ``size`` copies of one ensemble, each with its own stacked (vmap) state, lent one per prediction.

    ``torch.func.functional_call`` swaps module attributes while it runs, so one stacked ensemble cannot serve two
    threads at once; a few copies (sharing the read-only shard modules) let predictions run in parallel."""

    def __init__(self, ensemble: Ensemble, size: int):
        self.base, self.size, self.made = ensemble, max(1, size), 1
        self._free: queue.SimpleQueue[Ensemble] = queue.SimpleQueue()
        self._free.put(ensemble)
        self._lock = threading.Lock()

    @contextmanager
    def lend(self) -> Iterator[Ensemble]:
        try:
            ensemble = self._free.get_nowait()
        except queue.Empty:
            with self._lock:
                grow = self.made < self.size
                self.made += grow
            b = self.base
            ensemble = Ensemble(b.models, b.config, b.generation, b.device) if grow else self._free.get()
        try:
            yield ensemble
        finally:
            self._free.put(ensemble)


@dataclass(frozen=True)
class Snapshot:
    """What one prediction is computed from: never mutated, only replaced."""

    ensemble: Ensemble
    generation: int
    excluded: frozenset[int]  # shards retraining after an acknowledged deletion
    manifest: dict
    stamp: tuple
    recheck: bool = False  # a shard failed to load, or the stamp is racy: re-read the disk next request
    pool_size: int = 1  # how many predictions may run at once
    _pool: EnsemblePool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pool", EnsemblePool(self.ensemble, self.pool_size))

    @property
    def shards(self) -> list[int]:
        return self.ensemble.shards

    def predict_proba(self, X):
        """Probabilities computed from this snapshot only (its own sub-models, generation and exclusions)."""
        if not self.ensemble.shards:
            raise ApiError(
                503,
                "no shard is serving: every shard is retraining after an accepted deletion (or is empty); "
                "retry once the retrain finishes",
                headers={"Retry-After": "1"},
                shards_retraining=sorted(self.excluded),
            )
        if float(self.ensemble.weights().sum()) <= 0:
            raise ApiError(
                503,
                f"the serving shards {self.shards} all have aggregation weight 0; retry once the others return",
                headers={"Retry-After": "1"},
                shards_retraining=sorted(self.excluded),
            )
        with self._pool.lend() as ensemble:
            return ensemble.predict_proba(X)


def served_names(snap: Snapshot) -> dict[int, str]:
    entries = {e["shard"]: e for e in snap.manifest["shards"]}
    return {s: entries[s]["checkpoints"][-1] for s in snap.shards}


class ServingState:
    """The run directory as the server sees it: the current snapshot, the model cache, acknowledged deletions."""

    def __init__(
        self,
        root: str | Path,
        settings: ServerSettings | None = None,
        runtime: list[str] | tuple[str, ...] = (),
    ):
        # runtime: the retrains' workers, cluster, lanes (Config.with_runtime)
        self.run = RunDir(root, runtime)
        self.run.require_manifest()
        self.settings = (settings or ServerSettings()).validate()
        self.config = self.run.config()
        self.feature_names = list(self.config.data.features or [])
        schema = schema_of(self.config.data)  # the run's frozen schema: /predict takes raw records
        self.encoder = Encoder(schema) if schema is not None else None
        self.classes = list(self.config.data.classes or [])
        self.journal = Journal(self.run.journal_dir)
        self.recovered = recover(self.run)  # replay acknowledged deletions a crash left pending
        self._lock = threading.Lock()
        self._models: dict[int, tuple[str, nn.Module]] = {}  # shard -> (checkpoint name, model)
        self._acked: dict[str, frozenset[int]] = {}  # accepted here, not yet applied
        self._states: tuple | None = None  # (generation, excluded) -> shard states
        self._snapshot = self._build()

    # ---- snapshots ----------------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The current snapshot, rebuilt first when the manifest or the journal changed on disk."""
        snap = self._snapshot
        if not snap.recheck and self._stamp() == snap.stamp:
            return snap
        return self.reload()

    def reload(self, force: bool = False) -> Snapshot:
        """Rebuild the snapshot from disk when it changed (or ``force``). Not :func:`sisa.refresh.refresh`: the
        server never trains here, it re-reads what a writer made."""
        with self._lock:
            snap = self._snapshot
            if force or snap.recheck or self._stamp() != snap.stamp:
                self._snapshot = self._build()
            return self._snapshot

    def predict(self, X) -> tuple[Snapshot, object]:
        """Probabilities and the snapshot they come from, recomputed (at most twice more) when a deletion
        acknowledged meanwhile took a model it used out of serving: an answer finished after an acknowledgement
        never comes from a model that saw the deleted records, even one that was computing at that moment."""
        for _ in range(3):
            snap = self.snapshot()
            proba = snap.predict_proba(X)
            if self.still_serves(snap):
                return snap, proba
        return self.predict_strict(X)

    def predict_strict(self, X) -> tuple[Snapshot, object]:
        """Under the lock, so no exclusion can land while it computes (the last resort of :meth:`predict`)."""
        with self._lock:
            snap = self._snapshot
            return snap, snap.predict_proba(X)

    def still_serves(self, snap: Snapshot) -> bool:
        """Every model of ``snap`` is still one the current snapshot serves (same shard, same checkpoint)."""
        cur = self._snapshot
        if cur is snap:
            return True
        names = served_names(cur)
        return all(names.get(s) == n for s, n in served_names(snap).items())

    def exclude(self, request_id: str, shards: set[int]) -> None:
        """Stop the shards voting now (called from ``on_ack``, after the journal fsync)."""
        with self._lock:
            self._acked[request_id] = frozenset(shards)
            snap = self._snapshot
            self._snapshot = replace(
                snap, ensemble=snap.ensemble.without(set(shards)), excluded=snap.excluded | frozenset(shards)
            )

    def applied(self, request_id: str) -> None:
        with self._lock:
            self._acked.pop(request_id, None)
        self.reload(force=True)

    def _stamp(self) -> tuple:
        out = []
        for p in (self.run.manifest_path, self.run.journal_dir):
            try:
                st = p.stat()
                out.append((st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def _build(self) -> Snapshot:
        """Read manifest + journal and assemble a snapshot. Caller holds ``_lock`` (or is ``__init__``)."""
        now = time.time_ns()
        stamp = self._stamp()
        # the journal before the manifest: a request is marked rolled back only after its rolled-back manifest is
        # in place, so a shard whose request reads as rolled back is never served from an older generation
        entries = self.journal.open_entries()  # the open requests alone: not the whole history
        manifest = self.run.require_manifest()
        # a request acknowledged here is in the journal from its ack on: not pending there = rolled back or applied
        pending = {e["request_id"] for e in entries if e["status"] == PENDING}
        self._acked = {r: s for r, s in self._acked.items() if r in pending}
        excluded = {  # strict mode: a pending deletion's shards; a pending addition's shards never saw its rows
            int(s) for e in entries if e["status"] == PENDING and kind_of(e) == "delete" for s in e["shards"]
        }
        excluded |= {s for shards in self._acked.values() for s in shards}
        models, failed = {}, False
        for entry in manifest["shards"]:
            s = entry["shard"]
            if s in excluded or entry["records"] == 0 or not entry["checkpoints"]:
                continue  # retraining, empty, or rolled back to before its first slice (out until caught up)
            try:
                models[s] = self._model(entry)
            except (SisaError, OSError) as exc:  # e.g. a writer replaced the generation while we read it
                log.warning("shard %d not served for now: %s", s, exc)
                failed = True
        racy = any(t is not None and now - max(t[0], t[1]) < RACY_NS for t in stamp)
        return Snapshot(
            ensemble=Ensemble(models, self.config, manifest["generation"]),
            generation=manifest["generation"],
            excluded=frozenset(excluded),
            manifest=manifest,
            stamp=stamp,
            recheck=failed or racy,
            pool_size=self.settings.pool_size,
        )

    def _model(self, entry: dict) -> nn.Module:
        """The shard's last named checkpoint (its last slice; for a rolled-back shard the one before its earliest
        affected slice), loaded (and verified) once per checkpoint."""
        s, name = entry["shard"], entry["checkpoints"][-1]
        cached = self._models.get(s)
        if cached is not None and cached[0] == name:
            return cached[1]
        ck = load_checkpoint(self.run.shard_checkpoints(s) / name, entry["fingerprint"])
        model = shard_model(self.config, 0)
        model.load_state_dict(ck.model)
        model = model.eval()
        self._models[s] = (name, model)
        return model

    # ---- views --------------------------------------------------------------------------------------------
    def status(self) -> dict:
        snap = self.snapshot()
        entries = self.journal.entries()
        additions = [e for e in entries if kind_of(e) == "add"]
        entries = [e for e in entries if kind_of(e) == "delete"]
        shards = snap.manifest["shards"]
        return {
            "run": str(self.run.root),
            "generation": snap.generation,
            "shards": len(shards),
            "shards_serving": snap.shards,  # rolled back or not: every shard that answers
            "shards_retraining": sorted(snap.excluded),
            "shards_rolled_back": sorted(rolled_back_shards(snap.manifest)),
            "shard_states": self._shard_states(snap),
            "shards_empty": [e["shard"] for e in shards if e["records"] == 0],
            "records_active": sum(e["records"] for e in shards),
            "shard_records": [e["records"] for e in shards],
            "records_deleted": sum(e["records"] for e in entries if e["status"] != PENDING),
            "deletion_requests": len(entries),
            "deletions_pending": sum(e["status"] == PENDING for e in entries),
            "addition_requests": len(additions),
            "additions_pending": sum(e["status"] == PENDING for e in additions),
            "deletions_enabled": self.settings.token is not None,
            "model": self.config.model.name,
            "aggregation": self.config.aggregation.method,
            "features": self.feature_names,
            "classes": self.classes,
            "max_batch": self.settings.max_batch,
        }

    def _shard_states(self, snap: Snapshot) -> list[dict]:
        """Per shard: latest / rolled back (test accuracy before and now) / out; computed once per generation."""
        key = (snap.generation, snap.excluded)
        if self._states is None or self._states[0] != key:
            self._states = (key, shard_states(self.run, snap.manifest, set(snap.excluded)))
        return self._states[1]

    def deletion(self, request_id: str, error: str | None = None, kind: str = "delete") -> dict:
        """A request's status; ``error``: why its retrain failed so far (pending requests only). ``kind``:
        ``delete`` (GET /deletions/...) or ``add`` (GET /records/...)."""
        entry = self.journal.get(request_id) if REQUEST_ID.match(request_id) else None
        if entry is None or kind_of(entry) != kind:
            what = "deletion" if kind == "delete" else "addition"
            raise ApiError(404, f"unknown {what} request {request_id!r}")
        out = {
            "request_id": entry["request_id"],
            "status": entry["status"],
            "shards": sorted(int(s) for s in entry["shards"]),
            "records": entry["records"],
            "created": entry["created"],
        }
        if entry["status"] != PENDING:
            out["forgotten"] = entry.get("rolled_back")  # erased; answered only by models that never saw it
            out["applied"] = entry.get("applied")  # caught up (None while the retrain is to come)
            out["receipt"] = entry.get("receipt") or entry.get("rollback")
        elif error is not None:
            out["error"] = error
        return out
