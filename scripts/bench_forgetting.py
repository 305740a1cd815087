"""Forget in milliseconds, retrain later (issue 16): time to forget under load, accuracy over time, retrain cost.

1. **Time to forget.** A run on the Purchase-like data (S=20, R=50; ``--quick``: smaller) is served in-process
   (:class:`sisa.serving.server.Server`, the same ServingState and deletion worker as ``sisa serve``) while
   ``--clients`` threads call ``predict_proba`` in a loop; a stream of deletion requests goes through the worker
   (retrain policy ``manual``: every request is rolled back and erased, none retrained). Time to forget of a
   request = from its acknowledgement (the journal fsync: ``on_ack``) until no model that saw the record answers
   any more: the later of the moment its shards leave the serving snapshot and the end of the last prediction that
   was computed from an older snapshot still holding them (in-flight answers count). Time to serve again = until
   the shard answers with its rolled-back checkpoint. Ensemble test accuracy is recorded after every request and
   after the final catch-up (``sisa retrain``).
2. **Retrain cost over a simulated day.** ``--requests`` deletions of random records spread uniformly over 24
   simulated hours (a fake clock), once under ``unlearning.retrain=immediate`` (every request retrains its shard)
   and once under ``batched`` with ``max_delay=1d`` (each rolled-back shard retrained once): shard retrains and
   samples retrained, beside the SISA cost formula (:mod:`sisa.costs`).

Prints two tables, writes ``--json FILE`` and a plot (``--plot FILE``, PNG). Usage (from the repo root):
    python scripts/bench_forgetting.py [--quick] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import config, table  # noqa: E402

from sisa import costs  # noqa: E402
from sisa.fitting import train  # noqa: E402
from sisa.retraining import next_due  # noqa: E402
from sisa.serving.schema import ServerSettings  # noqa: E402
from sisa.serving.server import Server  # noqa: E402
from sisa.serving.state import served_names  # noqa: E402
from sisa.serving.worker import DeletionJob  # noqa: E402
from sisa.store.rundir import RunDir  # noqa: E402
from sisa.tables.datasets import PURCHASE_BENCH_FLIP, make_purchase  # noqa: E402
from sisa.unlearning import delete, retrain  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
    n: int
    n_test: int
    shards: int
    slices: int
    epochs: float
    stream: int  # deletion requests under load
    requests: int  # requests of the simulated day


FULL = Sizes(n=20_000, n_test=2_000, shards=20, slices=50, epochs=10, stream=100, requests=100)
QUICK = Sizes(n=4_000, n_test=1_000, shards=10, slices=10, epochs=4, stream=20, requests=40)
DAY_S = 86_400.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (under 3 minutes on 2 cores)")
    ap.add_argument("--clients", type=int, default=2, help="prediction threads under load")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument(
        "--plot", type=Path, help="write the plot here (PNG; default next to --json or the work dir)"
    )
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    return ap.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def forgetting_under_load(root: Path, X: np.ndarray, y: np.ndarray, s: Sizes, clients: int) -> dict:
    server = Server(
        root, ServerSettings(token="bench", pool_size=max(1, clients)), ["unlearning.retrain=manual"]
    )
    state, acks, rollbacks, log, stop = server.state, {}, {}, [], threading.Event()
    real_exclude, real_applied = state.exclude, state.applied

    def exclude(request_id, shards):  # called by on_ack, right after the journal fsync
        t = time.perf_counter()
        before = served_names(state._snapshot)  # the models that saw the records
        real_exclude(request_id, shards)
        acks[request_id] = (t, time.perf_counter(), {s: before[s] for s in shards if s in before})

    def applied(request_id):  # the rollback is durable: the shard serves its rolled-back checkpoint
        real_applied(request_id)
        if request_id in acks and request_id not in rollbacks:
            t_ack, t_out, old = acks[request_id]
            after = served_names(state.reload(force=True))  # the rollback names only models that never saw it
            acks[request_id] = (t_ack, t_out, {s: n for s, n in old.items() if after.get(s) != n})
            rollbacks[request_id] = time.perf_counter()

    state.exclude, state.applied = exclude, applied
    batch = X[:64]

    def client():
        while not stop.is_set():  # what POST /predict does
            t0 = time.perf_counter()
            try:
                snap, _ = state.predict(batch)
            except Exception:  # every shard out: a 503 over HTTP
                continue
            log.append((t0, time.perf_counter(), served_names(snap), snap.generation))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(1)
    active = RunDir(root).index().active["record_id"].to_numpy()
    victims = rng.choice(active, size=s.stream, replace=False)
    timeline = [(0.0, accuracy(state.snapshot(), X, y), len(state.snapshot().shards))]
    start = time.perf_counter()
    try:
        for rid in victims:
            job = DeletionJob([int(rid)], [])
            server.worker.submit(job)
            job.decided.wait(60)
            while job.request_id not in rollbacks:
                time.sleep(0.001)
            snap = state.snapshot()
            timeline.append((time.perf_counter() - start, accuracy(snap, X, y), len(snap.shards)))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    forget, serve_again = [], []
    exclusion = []
    for request_id, (t_ack, t_out, old) in acks.items():
        # answers finished after the ack that were computed by a model that saw the records (in-flight ones too)
        stale = [
            end for _, end, names, _ in log if end > t_ack and any(names.get(s) == n for s, n in old.items())
        ]
        forget.append((max([t_out, *stale]) - t_ack) * 1000)
        exclusion.append((t_out - t_ack) * 1000)
        serve_again.append((rollbacks[request_id] - t_ack) * 1000)
    t0 = time.perf_counter()
    report = retrain(root)
    state.reload(force=True)
    timeline.append(
        (time.perf_counter() - start, accuracy(state.snapshot(), X, y), len(state.snapshot().shards))
    )
    server.close()
    return {
        "requests": len(acks),
        "predictions": len(log),
        "time_to_forget_p50_ms": percentile(forget, 50),
        "time_to_forget_p99_ms": percentile(forget, 99),
        "time_to_forget_max_ms": max(forget),
        "stale_answers_after_ack": stale_count(acks, log),
        "exclusion_p99_ms": percentile(exclusion, 99),
        "time_to_serve_again_p50_ms": percentile(serve_again, 50),
        "time_to_serve_again_p99_ms": percentile(serve_again, 99),
        "accuracy_before": timeline[0][1],
        "accuracy_rolled_back": timeline[-2][1],
        "accuracy_caught_up": timeline[-1][1],
        "catch_up_seconds": round(time.perf_counter() - t0, 3),
        "catch_up_shards": len(report["shards_retrained"]),
        "timeline": timeline,
    }


def stale_count(acks: dict, log: list) -> int:
    """Answers returned after the 202 could go out (the shards left the snapshot) by a model that saw the records:
    a prediction re-checks its models before it returns, so only one checked in that same instant can count."""
    return sum(
        end > t_out and any(names.get(s) == n for s, n in old.items())
        for _, t_out, old in acks.values()
        for _, end, names, _ in log
    )


def accuracy(snap, X: np.ndarray, y: np.ndarray) -> float:
    return float((snap.predict_proba(X).argmax(axis=1) == y).mean()) if snap.shards else 0.0


class FakeClock:
    """Simulated wall time for the journal, rollbacks and the policy (time.time only)."""

    def __init__(self, t: float):
        self.t, self.real = t, time.time

    def __enter__(self):
        time.time = lambda: self.t
        return self

    def __exit__(self, *exc):
        time.time = self.real


def simulated_day(base: Path, work: Path, s: Sizes) -> dict:
    rng = np.random.default_rng(2)
    active = RunDir(base).index().active["record_id"].to_numpy()
    victims = rng.choice(active, size=s.requests, replace=False)
    at = np.sort(rng.uniform(0, DAY_S, size=s.requests))
    out = {}
    for policy in ("immediate", "batched"):
        root = work / f"day-{policy}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(base, root)
        runtime = [f"unlearning.retrain={policy}", "unlearning.max_delay=1d"]
        retrains = samples = 0
        t0 = time.perf_counter()
        start = time.time()
        with FakeClock(start) as clock:
            for rid, t in zip(victims, at, strict=True):
                clock.t = start + float(t)
                r = delete(root, [int(rid)], runtime=runtime)
                if r["status"] == "applied":
                    retrains += len(r["slices_retrained"])
                    samples += r["catch_up_samples"]
            clock.t = start + float(at[-1])
            while True:  # the rest of the day and after: retrain what the policy makes due, when it does
                rb = retrain(root, due_only=True, runtime=runtime)
                retrains += len(rb["shards_retrained"])
                samples += rb["samples_retrained"]
                if not rb["still_rolled_back"]:
                    break
                clock.t += max(next_due(RunDir(root, runtime)) or 0.0, 1.0)
        out[policy] = {
            "retrains": retrains,
            "samples": samples,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    out["formula_immediate"] = s.requests * costs.single_request_cost(s.n, s.shards, s.slices, s.epochs)
    out["formula_batched"] = costs.batched_requests_cost(s.n, s.shards, s.slices, s.epochs, s.requests)
    return out


def plot(path: Path, load: dict, day: dict, s: Sizes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    t, acc, serving = zip(*load["timeline"], strict=True)
    a.plot(t, acc, marker=".", label="ensemble test accuracy")
    a2 = a.twinx()
    a2.step(t, serving, where="post", color="grey", alpha=0.5, label="shards answering")
    a.set_xlabel("seconds (deletion stream, then one catch-up)")
    a.set_ylabel("test accuracy")
    a2.set_ylabel("shards answering")
    a.set_title(f"S={s.shards}, R={s.slices}: rolled back, then caught up")
    names = ["immediate", "batched"]
    measured = [day[n]["samples"] for n in names]
    formula = [day["formula_immediate"], day["formula_batched"]]
    x = np.arange(2)
    b.bar(x - 0.2, measured, 0.4, label="measured")
    b.bar(x + 0.2, formula, 0.4, label="SISA formula")
    b.set_xticks(x, [f"{n}\n({day[n]['retrains']} retrains)" for n in names])
    b.set_ylabel(f"samples retrained, {s.requests} requests in a day")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    s = QUICK if a.quick else FULL
    work = Path(a.work or tempfile.mkdtemp(prefix="sisa-forget-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    full = make_purchase(s.n + s.n_test, seed=0, flip=PURCHASE_BENCH_FLIP)
    df, test = full.iloc[: s.n].reset_index(drop=True), full.iloc[s.n :]
    X, y = test.iloc[:, 2:].to_numpy(np.float32), test["label"].to_numpy(np.int64)
    base = work / "base"
    shutil.rmtree(base, ignore_errors=True)
    t0 = time.perf_counter()
    train(base, config(s.shards, s.slices, s.epochs), df)
    train_s = time.perf_counter() - t0
    print(f"Purchase-like data: {s.n} train + {s.n_test} test records, S={s.shards}, R={s.slices}, e={s.epochs}; "
          f"trained in {train_s:.1f} s{' (QUICK)' if a.quick else ''}")  # fmt: skip
    served = work / "served"
    shutil.rmtree(served, ignore_errors=True)
    shutil.copytree(base, served)
    load = forgetting_under_load(served, X, y, s, a.clients)
    table(
        f"time to forget under load ({load['requests']} requests, {a.clients} prediction threads, "
        f"{load['predictions']} predictions)",
        ["measure", "p50 ms", "p99 ms"],
        [
            ["forget (ack -> no model that saw it answers)",
             f"{load['time_to_forget_p50_ms']:.3f}", f"{load['time_to_forget_p99_ms']:.3f}"],
            ["serve again (ack -> rolled-back checkpoint answers)",
             f"{load['time_to_serve_again_p50_ms']:.1f}", f"{load['time_to_serve_again_p99_ms']:.1f}"],
        ],
    )  # fmt: skip
    print(f"answers returned after a 202 by a model that saw its records: {load['stale_answers_after_ack']}")
    print(
        f"test accuracy: before {load['accuracy_before']:.4f}, after {load['requests']} rollbacks "
        f"{load['accuracy_rolled_back']:.4f}, after the catch-up of {load['catch_up_shards']} shard(s) "
        f"({load['catch_up_seconds']} s) {load['accuracy_caught_up']:.4f}"
    )
    day = simulated_day(base, work, s)
    table(
        f"{s.requests} requests over a simulated day (batched: max_delay=1d)",
        ["policy", "shard retrains", "samples retrained", "SISA formula", "wall s"],
        [
            [p, day[p]["retrains"], day[p]["samples"], f"{day[f'formula_{p}']:.0f}", day[p]["seconds"]]
            for p in ("immediate", "batched")
        ],
    )
    result = {
        "quick": a.quick,
        "sizes": dataclasses.asdict(s),
        "clients": a.clients,
        "train_seconds": round(train_s, 2),
        **{k: v for k, v in load.items()},
        "retrains_immediate": day["immediate"]["retrains"],
        "retrains_batched": day["batched"]["retrains"],
        "samples_immediate": day["immediate"]["samples"],
        "samples_batched": day["batched"]["samples"],
        "formula_samples_immediate": day["formula_immediate"],
        "formula_samples_batched": day["formula_batched"],
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    plot_path = a.plot or (a.json.with_suffix(".png") if a.json else work / "forgetting.png")
    plot(plot_path, load, day, s)
    print(f"plot: {plot_path}; total {result['seconds']} s")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
