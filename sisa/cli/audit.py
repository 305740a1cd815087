"""``sisa audit``, ``compare`` and ``report``: the commands that produce evidence about forgetting (membership
inference, exact vs approximate unlearning, an HTML report). Parsers and handlers; :mod:`sisa.cli.main` runs them."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from ..config import Config


def add_parsers(sub) -> None:
    au = sub.add_parser("audit", help="membership-inference audit: deleted records vs never-seen ones")
    au.add_argument("--run", required=True)
    au.add_argument("--holdout", help="table of never-seen records (default: the config's data.test)")
    au.add_argument("--deleted", help="the deleted records' rows (kept by the requester; never stored)")
    au.add_argument("--no-reference", action="store_true", help="skip the retrained-from-scratch reference")
    au.add_argument("--max-records", type=int, default=5000, help="sample each group down to this many rows")
    au.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for TPR intervals")
    au.add_argument("--seed", type=int, default=0, help="seed of sampling and bootstrap")
    au.add_argument("--out", help="also write the JSON result to this file (outside the run directory)")
    au.add_argument("--json", action="store_true", help="print the full result as JSON")
    co = sub.add_parser("compare", help="exact (retrain, SISA) vs APPROXIMATE unlearning on forget requests")
    co.add_argument("--config", required=True, help="YAML config with data.train and data.test")
    co.add_argument("--forget", action="append", default=[], metavar="random:N|class:L", help="repeatable")
    co.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    co.add_argument("--methods", nargs="+", help="approximate baselines to run (default: all)")
    co.add_argument("--seed", type=int, default=0, help="seed of the random forget sets and the baselines")
    co.add_argument("--out", help="folder for compare.json and compare.md")
    co.add_argument("--json", action="store_true")
    rp = sub.add_parser("report", help="HTML report: shard accuracy, deletion cost, MIA ROC curves")
    rp.add_argument("--run", required=True)
    rp.add_argument("--out", required=True, help="a .html file, or a folder (gets report.html and the PNGs)")
    rp.add_argument("--deleted", help="table of the deleted records' rows, for the deleted-vs-unseen audit")
    rp.add_argument("--holdout", help="table of never-seen records (default: the config's data.test)")
    rp.add_argument("--no-reference", action="store_true", help="skip the retrained-from-scratch reference")


def _audit(a: argparse.Namespace) -> int:
    from ..evidence.audit import check_outside_run, describe, run_audit

    if a.out and a.deleted:
        check_outside_run(a.run, a.out)
    result = run_audit(
        a.run, a.holdout, a.deleted, reference=not a.no_reference, max_records=a.max_records,
        bootstrap=a.bootstrap, seed=a.seed,
    )  # fmt: skip
    if a.out:
        Path(a.out).write_text(json.dumps(result.summary, indent=1) + "\n")
    print(json.dumps(result.summary, indent=1) if a.json else describe(result.summary))
    return 0


def _compare(a: argparse.Namespace) -> int:
    from ..evidence.comparison import compare, markdown, write_outputs

    result = compare(Config.load(a.config, a.overrides), a.forget, methods=a.methods, seed=a.seed)
    if a.out:
        write_outputs(result, a.out)
    print(json.dumps(result, indent=1) if a.json else markdown(result))
    return 0


def _report(a: argparse.Namespace) -> int:
    from ..evidence.report import build_report

    path = build_report(a.run, a.out, deleted=a.deleted, holdout=a.holdout, reference=not a.no_reference)
    print(f"wrote {path}")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "audit": _audit,
    "compare": _compare,
    "report": _report,
}
