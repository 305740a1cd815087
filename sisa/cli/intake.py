"""``sisa add``: new rows into a trained run, exactly (docs/design.md §4.1). Parser and handler; :mod:`sisa.cli.main`
runs it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable


def add_parsers(sub) -> None:
    ad = sub.add_parser(
        "add", help="add new rows (run's schema) and retrain only the shards that receive them"
    )
    ad.add_argument("--run", required=True)
    ad.add_argument("--data", required=True, help="CSV or Parquet table of new rows, columns as in training")
    ad.add_argument(
        "--allow-returning",
        action="store_true",
        help="admit rows matching a deleted record, subject or row content (a person who came back and consented "
        "again); the receipt and history record it",
    )
    ad.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait for another writer")
    ad.add_argument("--json", action="store_true", help="print the receipt as JSON")
    ad.add_argument(
        "--set",
        dest="runtime",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="for this process only, what does not change the models (runtime keys; repeatable)",
    )


def _add(a: argparse.Namespace) -> int:
    from ..intake import add

    r = add(a.run, a.data, allow_returning=a.allow_returning, wait_s=a.wait, runtime=a.runtime)
    if a.json:
        print(json.dumps(r, indent=1, default=str))
        return 0
    print(
        f"addition receipt {r['request_id']}: {r['records_added']} record(s) added, "
        f"generation {r['generation']}, {r['seconds']} s"
        + (
            f"; {r['returning_rows']} returning row(s) admitted (--allow-returning)"
            if r["returning_allowed"]
            else ""
        )
    )
    for s, k in r["shards_retrained"].items():
        before, after = r["fingerprints_before"].get(s, "")[:12], r["fingerprints_after"].get(s, "")[:12]
        print(f"  shard {s}: retrained from slice {k}; fingerprint {before} -> {after}")
    print(f"  retraining cost: {r['samples_retrained']} samples, {r['optimizer_steps']} optimizer steps")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {"add": _add}
