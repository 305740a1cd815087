"""`sisa retrain` (catch up rolled-back shards) and how a shard's rollback state is shown (docs/design.md §4.2)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime


def add_parsers(sub, shard_option: Callable, runtime_option: Callable) -> None:
    rt = sub.add_parser(
        "retrain", help="catch up rolled-back shards now (restore the accuracy deletions cost)"
    )
    rt.add_argument("--run", required=True)
    rt.add_argument("--due", action="store_true", help="only the shards the retrain policy says are due")
    shard_option(rt, "retrain")
    rt.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait for another writer")
    rt.add_argument("--json", action="store_true")
    runtime_option(rt)


def _retrain(a: argparse.Namespace) -> int:
    from ..unlearning import retrain

    report = retrain(a.run, a.shards or None, due_only=a.due, wait_s=a.wait, runtime=a.runtime)
    if a.json:
        print(json.dumps(report, indent=1, default=str))
    elif report["shards_retrained"]:
        print(
            f"caught up shard(s) {report['shards_retrained']}: {report['samples_retrained']} samples retrained; "
            f"{len(report['requests_applied'])} request(s) applied; generation {report['generation']}"
        )
    else:
        print("nothing to retrain: no shard " + ("is due" if a.due else "is rolled back"))
    return 0


def utc(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def shard_line(e: dict) -> str:
    if e["state"] not in ("rolled_back", "out"):
        return {
            "latest": "serving the latest",
            "retraining": "out (deletion acknowledged)",
            "empty": "empty",
        }[e["state"]]
    acc = ""
    if e.get("accuracy_before") is not None:
        now = e.get("accuracy_now")
        acc = f", test accuracy {e['accuracy_before']:.4f} -> " + ("-" if now is None else f"{now:.4f}")
    what = f"rolled back to slice {e['slice']}" if e["state"] == "rolled_back" else "out (slice 0 hit)"
    return (
        f"{what} since {utc(e['since'])}{acc}; retrain {e['retrain_policy']}, "
        f"due {utc(e['retrain_due'])}, deadline {utc(e['retrain_deadline'])}"
    )


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {"retrain": _retrain}
