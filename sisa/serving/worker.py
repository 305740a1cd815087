"""The server's deletion worker: ONE thread that applies accepted deletions and additions in arrival order.

Each :class:`DeletionJob` is one ``POST /deletions`` (or, with ``rows``, one ``POST /records``: an addition,
journaled by :func:`sisa.intake.add`; its shards keep serving, since the live models never saw the new rows). A
deletion is validated and journaled when its turn comes (through :func:`sisa.unlearning.delete`, whose ``on_ack``
hook excludes the affected shards from serving before the 202 goes out), then rolled back (the shards serve the
checkpoint before the records' slice from then on) and retrained when the retrain policy says
(:mod:`sisa.retraining`; the worker wakes up when the next rolled-back shard falls due). A retrain that fails
after the acknowledgement is replayed with backoff.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..intake import add
from ..retraining import next_due
from ..session import recover
from ..store.journal import Journal, new_request_id
from ..store.rundir import RunDir
from ..train.executors import warm_workers
from ..unlearning import delete

log = logging.getLogger("sisa.serving.state")
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0  # replaying an accepted deletion whose retrain failed: first wait, cap


@dataclass
class DeletionJob:
    """One POST /deletions, from the queue to its decision (accepted / already deleted / rejected)."""

    record_ids: list
    subject_ids: list
    request_id: str = field(default_factory=new_request_id)
    decided: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    cancelled: bool = False
    entry: dict | None = None  # the journal entry, once acknowledged
    result: dict | None = None  # the receipt when nothing was journaled (already deleted)
    error: Exception | None = None  # raised before the journal entry: nothing changed
    rows: Any = None  # an addition: the new rows (a DataFrame in the run's training schema)
    allow_returning: bool = False


class ShardGate(Protocol):
    """What the worker tells the serving side: shards to stop at once, requests applied (serve again)."""

    def exclude(self, request_id: str, shards: set[int]) -> None: ...

    def applied(self, request_id: str) -> None: ...


class DeletionWorker:
    """ONE thread that applies deletions in arrival order (the run has one writer; order is the contract).

    An accepted deletion whose retrain fails (a full disk, an unreachable cluster) stays journaled and its shards
    stay out; the worker replays it after RETRY_FIRST_S, doubling the wait up to RETRY_MAX_S while it keeps
    failing, so the shards come back without a restart or another deletion."""

    def __init__(self, run: RunDir, gate: ShardGate, wait_s: float = 0.0):
        self.run, self.gate, self.wait_s = run, gate, wait_s
        self.journal = Journal(run.journal_dir)
        self.errors: dict[str, str] = {}  # request id -> why its retrain failed (its shards stay excluded)
        self._queue: queue.Queue[DeletionJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._retry_at: float | None = None  # monotonic time of the next replay of failed deletions
        self._retry_delay = RETRY_FIRST_S
        self._policy_at: float | None = None  # monotonic time the retrain policy next makes a shard due

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="sisa-deletions", daemon=True)
                self._thread.start()

    def submit(self, job: DeletionJob) -> None:
        self.start()
        self._queue.put(job)

    def cancel(self, job: DeletionJob) -> bool:
        """Withdraw a job that has not started (nothing was changed); False when it already runs."""
        with self._lock:
            if job.started:
                return False
            job.cancelled = True
            return True

    def queued(self) -> int:
        return self._queue.qsize()

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def stop(self, timeout: float = 60.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _loop(self) -> None:
        _warm_up()
        try:  # a run retrained by worker processes (training.n_jobs > 1): start them now, not in a deletion
            warm_workers(self.run.config())
        except Exception as exc:  # only an optimisation: the first retrain starts them itself
            log.warning("could not start the retrain workers ahead: %s", exc)
        self._plan_policy()
        while True:
            times = [t for t in (self._retry_at, self._policy_at) if t is not None]
            wait = None if not times else max(0.0, min(times) - time.monotonic())
            try:
                job = self._queue.get(timeout=wait)
            except queue.Empty:
                if self._retry_at is not None and self._retry_at <= time.monotonic():
                    self._retry()
                else:
                    self._run_policy()
                continue
            if job is None:
                return
            with self._lock:
                if job.cancelled:
                    continue
                job.started = True
            try:
                self._run(job)
            except BaseException as exc:  # keep serving; the decision must never hang
                log.exception("deletion worker: unexpected failure")
                job.error = job.error or exc
            finally:
                job.decided.set()

    def _run(self, job: DeletionJob) -> None:
        def on_ack(entry: dict) -> None:
            job.entry = entry
            self.gate.exclude(entry["request_id"], {int(s) for s in entry["shards"]})
            job.decided.set()  # only now may the 202 go out: accepted implies excluded

        def on_add(entry: dict) -> None:
            job.entry = entry  # no shard stops: the live generation never saw the new rows
            job.decided.set()

        try:
            receipt = (
                add(
                    self.run.root,
                    job.rows,
                    allow_returning=job.allow_returning,
                    wait_s=self.wait_s,
                    on_ack=on_add,
                    request_id=job.request_id,
                    runtime=self.run.runtime,
                )
                if job.rows is not None
                else delete(
                    self.run.root,
                    job.record_ids,
                    job.subject_ids,
                    wait_s=self.wait_s,
                    on_ack=on_ack,
                    on_rollback=lambda entry: self.gate.applied(
                        entry["request_id"]
                    ),  # serve the rollback now
                    request_id=job.request_id,
                    runtime=self.run.runtime,
                )
            )
        except Exception as exc:
            if job.entry is None:
                job.error = exc  # validated and refused: nothing changed
                return
            self.errors[job.request_id] = f"{type(exc).__name__}: {exc}"
            log.exception("deletion %s accepted but not applied yet; its shards stay out", job.request_id)
            self._schedule_retry()
            return
        if job.entry is None:
            job.result = receipt
        else:
            self.errors.pop(job.request_id, None)
            self.gate.applied(job.request_id)
        self._settle()  # a deletion replays every earlier pending one first
        self._plan_policy()

    def _plan_policy(self) -> None:
        """When to wake up for the next rolled-back shard the retrain policy makes due (batched, deadline)."""
        try:
            wait = next_due(self.run)
        except Exception as exc:  # only a schedule: the next deletion plans again
            log.warning("could not plan the next catch-up retrain: %s", exc)
            wait = None
        self._policy_at = None if wait is None else time.monotonic() + max(wait, 0.05)

    def _run_policy(self) -> None:
        """Run the retrains the policy says are due (a recovery does exactly that), then plan the next."""
        self._policy_at = None
        try:
            recover(self.run)
        except Exception as exc:
            log.warning(
                "catch-up retrain failed (shards keep serving their rolled-back checkpoints): %s", exc
            )
            self._policy_at = time.monotonic() + RETRY_MAX_S
            return
        self.gate.applied("")  # re-read the run: caught-up shards serve their latest checkpoints
        self._plan_policy()

    def _schedule_retry(self) -> None:
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_S)

    def _retry(self) -> None:
        """Replay the deletions that were accepted but failed; back off while it keeps failing."""
        try:
            recover(self.run)
        except Exception as exc:
            for request_id in self.errors:
                self.errors[request_id] = f"{type(exc).__name__}: {exc} (retrying)"
            log.warning(
                "replaying failed deletions failed again (next try in %.0f s): %s", self._retry_delay, exc
            )
        self._retry_at = None
        if not self._settle():
            self._schedule_retry()

    def _settle(self) -> bool:
        """Forget the errors of requests the journal shows applied; True when none is left pending."""
        pending = {e["request_id"] for e in self.journal.pending()}
        for request_id in [r for r in self.errors if r not in pending]:
            del self.errors[request_id]
            self.gate.applied(request_id)
        if not pending:
            self._retry_at, self._retry_delay = None, RETRY_FIRST_S
        return not pending


def _warm_up() -> None:
    """Import what the first retrain would (deterministic mode pulls in torch._dynamo: 1.5-3 s here), so the
    first accepted deletion does not keep its shards out of serving for that long."""
    try:
        importlib.import_module("torch._inductor")
    except Exception as exc:  # only an optimisation
        log.debug("warm-up import failed: %s", exc)
