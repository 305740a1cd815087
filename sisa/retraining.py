"""When a rolled-back shard is retrained: the retrain policy, in one place (docs/design.md §4.2).

A deletion is forgotten and erased at rollback (:func:`sisa.deletion.roll_back`); the catch-up retrain only restores
accuracy. ``unlearning.retrain`` decides when: ``immediate`` (right after the rollback; the rolled-back checkpoint
serves meanwhile), ``batched`` (each rolled-back shard once, when its oldest rollback has waited
``unlearning.max_delay`` or its rollback cost more than ``unlearning.max_accuracy_drop`` of test accuracy) or
``manual`` (``sisa retrain``). Whatever the policy, a retrain starts at the latest when a tenth of
``unlearning.deadline`` is left after the oldest request it covers, so it finishes inside the deadline.

:func:`due` says which shards to retrain now and why; :func:`catch_up` retrains them (one
:func:`sisa.refresh.refresh` for all, each from its first missing checkpoint) and marks every request whose shards
are all caught up ``applied``. The CLI, recovery and the server's deletion worker call these two and nothing else.
"""

from __future__ import annotations

import time

from .config import duration_s
from .evaluation import evaluate
from .refresh import EarlyRetrain, refresh
from .store.journal import ROLLED_BACK, Journal
from .store.rundir import RunDir

DEADLINE_MARGIN = 0.1  # start a retrain when this fraction of the deadline is left, at the latest


def rolled_back_shards(manifest: dict) -> dict[int, dict]:
    """Shard -> its rollback record, for every shard serving an earlier checkpoint (or out) until caught up."""
    return {e["shard"]: e["rolled_back"] for e in manifest["shards"] if e.get("rolled_back")}


def deadlines(run: RunDir, manifest: dict | None = None) -> dict[int, dict]:
    """Per rolled-back shard: when its oldest covered request was made, the retrain deadline, the policy's own due
    time (batched: since + max_delay; immediate: now; manual: none) — all Unix times."""
    manifest = manifest or run.require_manifest()
    u = run.config().unlearning
    created = {e["request_id"]: e["created"] for e in Journal(run.journal_dir).open_entries()}
    out = {}
    for s, rb in rolled_back_shards(manifest).items():
        oldest = min((created[r] for r in rb["requests"] if r in created), default=rb["since"])
        deadline = oldest + duration_s(u.deadline)
        out[s] = {
            "oldest_request": oldest,
            "deadline": deadline,
            "start_by": deadline - DEADLINE_MARGIN * duration_s(u.deadline),
            "policy_due": {
                "immediate": rb["since"],
                "batched": rb["since"] + duration_s(u.max_delay),
                "manual": None,
            }[u.retrain],
        }
    return out


def due(run: RunDir, now: float | None = None) -> dict[int, str]:
    """Shards to retrain now and why (``immediate``, ``max_delay``, ``accuracy``, ``deadline``).

    Under ``immediate`` a shard is due unless every request it covers was deferred (``delete --defer``); the
    accuracy rule evaluates the test table only when ``unlearning.max_accuracy_drop`` is set."""
    now = time.time() if now is None else now
    manifest = run.require_manifest()
    rolled = rolled_back_shards(manifest)
    if not rolled:
        return {}
    u = run.config().unlearning
    entries = {e["request_id"]: e for e in Journal(run.journal_dir).rolled_back()}
    out: dict[int, str] = {}
    for s, d in deadlines(run, manifest).items():
        covered = [entries[r] for r in rolled[s]["requests"] if r in entries]
        if now >= d["start_by"]:
            out[s] = "deadline"
        elif u.retrain == "immediate" and any(not e["rollback"].get("deferred") for e in covered):
            out[s] = "immediate"
        elif u.retrain == "batched" and now >= d["policy_due"]:
            out[s] = "max_delay"
    if u.retrain == "batched" and u.max_accuracy_drop is not None and len(out) < len(rolled):
        for s, drop in accuracy_drops(run, manifest).items():
            if s not in out and drop is not None and drop > u.max_accuracy_drop:
                out[s] = "accuracy"
    return dict(sorted(out.items()))


def accuracy_drops(run: RunDir, manifest: dict) -> dict[int, float | None]:
    """Per rolled-back shard: its test accuracy before the rollback minus now (None without a test table)."""
    now = evaluate(run, run.config(), manifest).get("shard_accuracy", {})
    out = {}
    for s, rb in rolled_back_shards(manifest).items():
        before = rb.get("accuracy_before")
        current = now.get(str(s), 0.0)  # a shard out of the ensemble has no accuracy: all of it is lost
        out[s] = None if before is None or not now else before - current
    return out


def next_due(run: RunDir, now: float | None = None) -> float | None:
    """Seconds until the policy next makes a shard due (0: now), None when no shard is rolled back."""
    now = time.time() if now is None else now
    times = []
    for d in deadlines(run).values():
        times.append(d["start_by"])
        if d["policy_due"] is not None and run.config().unlearning.retrain == "batched":
            times.append(d["policy_due"])
    return max(0.0, min(times) - now) if times else None


def catch_up(
    run: RunDir,
    shards: list[int] | None = None,
    reason: str = "manual",
    loaded: dict | None = None,
    early: EarlyRetrain | None = None,
) -> list[dict]:
    """Retrain ``shards`` (default: every rolled-back one) from their first missing checkpoint, then mark every
    request whose shards are all caught up ``applied``; returns their receipts. Idempotent. Caller holds the
    writer lock. ``loaded``: slice files this process already read and verified (see :func:`sisa.refresh.plan`);
    ``early``: the training a deletion started during its rollback (:class:`sisa.refresh.EarlyRetrain`)."""
    t0 = time.perf_counter()
    manifest = run.require_manifest()
    rolled = rolled_back_shards(manifest)
    shards = sorted(rolled) if shards is None else sorted(set(shards))
    changed = {s: set() for s in shards}  # the rolled-back manifest already describes the purged data
    report = (
        refresh(run, shards, metrics=False, changed=changed, loaded=loaded, early=early) if shards else None
    )
    jobs = {j.shard: j for j in report.jobs} if report else {}
    samples = {r.shard: r.samples for r in report.results} if report else {}
    steps = {r.shard: r.optimizer_steps for r in report.results} if report else {}
    return settle(
        run,
        {
            "reason": reason,
            "jobs": jobs,
            "samples": samples,
            "steps": steps,
            "seconds": round(time.perf_counter() - t0, 4),
            "batch": sorted({r for s in shards if s in rolled for r in rolled[s]["requests"]}),
        },
    )


def settle(run: RunDir, retrain: dict | None = None) -> list[dict]:
    """Mark ``applied`` every rolled-back request none of whose shards is still rolled back (e.g. after a crash
    between the catch-up's manifest swap and its journal writes); returns their receipts."""
    manifest = run.require_manifest()
    still = {r for rb in rolled_back_shards(manifest).values() for r in rb["requests"]}
    journal = Journal(run.journal_dir)
    fps = {str(e["shard"]): e["fingerprint"] for e in manifest["shards"]}
    retrain = retrain or {
        "reason": "caught up earlier",
        "jobs": {},
        "samples": {},
        "steps": {},
        "seconds": None,
        "batch": [],
    }
    receipts = []
    for entry in journal.rolled_back():
        if entry["request_id"] in still or entry["status"] != ROLLED_BACK:
            continue
        shards = sorted(int(s) for s in entry["shards"])
        jobs = [retrain["jobs"][s] for s in shards if s in retrain["jobs"]]
        receipt = {
            "request_id": entry["request_id"],
            "status": "applied",
            "records_deleted": entry["records"],
            "subjects_deleted": len(entry.get("subject_hashes", [])),
            "shards_retrained": {str(s): int(k) for s, k in entry["shards"].items()},
            "shards_rolled_back": entry["rollback"]["shards"],
            "slices_retrained": {str(j.shard): list(range(j.from_slice, len(j.fingerprints))) for j in jobs},
            "fingerprints_before": entry["before"],
            "fingerprints_after": {str(s): fps[str(s)] for s in shards},
            "optimizer_steps": sum(retrain["steps"].get(s, 0) for s in shards),
            "samples_retrained": sum(retrain["samples"].get(s, 0) for s in shards),
            "generation": manifest["generation"],
            "rollback_generation": entry["rollback"]["generation"],
            "forgotten_at": entry["rolled_back"],  # erased, served by models that never saw the records
            "rollback_seconds": entry["rollback"]["seconds"],
            "caught_up_at": time.time(),  # accuracy restored
            "catch_up_reason": retrain["reason"],
            "catch_up_batch": retrain["batch"],
            "catch_up_samples": sum(retrain["samples"].values()),  # the whole batch's retrain, shared
            "seconds": retrain["seconds"],
        }
        journal.complete(entry, receipt)
        receipts.append(receipt)
    return receipts


def shard_states(run: RunDir, manifest: dict, pending: set[int], accuracy: bool = True) -> list[dict]:
    """Per shard, what answers: ``latest`` (its last slice), ``rolled_back`` (checkpoint k-1: since when, test
    accuracy before and now when the run has a test table, the retrain's deadline), ``out`` (rolled back before
    its first slice), ``retraining`` (a request acknowledged, rollback not yet done) or ``empty``."""
    rolled = rolled_back_shards(manifest)
    limits = deadlines(run, manifest) if rolled else {}
    now = evaluate(run, run.config(), manifest).get("shard_accuracy", {}) if rolled and accuracy else {}
    u = run.config().unlearning
    out = []
    for e in manifest["shards"]:
        s, rb = e["shard"], rolled.get(e["shard"])
        state = {"shard": s, "records": e["records"]}
        if s in pending:
            state["state"] = "retraining"
        elif e["records"] == 0:
            state["state"] = "empty"
        elif rb is None:
            state["state"] = "latest"
        else:
            state.update(
                state="rolled_back" if rb["slice"] > 0 else "out",
                slice=rb["slice"],
                since=rb["since"],
                requests=len(rb["requests"]),
                accuracy_before=rb.get("accuracy_before"),
                accuracy_now=now.get(str(s)) if now else None,
                retrain_policy=u.retrain,
                retrain_due=limits[s]["policy_due"],
                retrain_deadline=limits[s]["deadline"],
            )
        out.append(state)
    return out
