"""``sisa verify`` (and ``--erasure``), ``history`` and ``repair``: the commands that certify, log and mend a run
(docs/design.md §4, §6). Parsers and handlers; :mod:`sisa.cli.main` runs them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ..exceptions import SisaError
from .arguments import read_ids, runtime_option, shard_option


def add_parsers(sub) -> None:
    v = sub.add_parser("verify", help="certify the live models: retrain from scratch and compare bit for bit")
    v.add_argument("--run", required=True)
    shard_option(v, "verify")
    v.add_argument(
        "--erasure",
        action="store_true",
        help="check instead that nothing of deleted records survives in the run directory",
    )
    v.add_argument(
        "--ids-file", help="with --erasure: deleted record IDs (one per line) to search every file for"
    )
    v.add_argument(
        "--data", help="with --erasure: the original rows (table); their feature rows are searched too"
    )
    v.add_argument(
        "--subjects-file", help="with --erasure: forgotten data-subject IDs (one per line) to search for"
    )
    v.add_argument("--workdir", help="folder for the scratch retrain (default: the system temp folder)")
    v.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait for another writer")
    v.add_argument("--json", action="store_true")

    hi = sub.add_parser(
        "history", help="the request log: deletions and additions (time, records, retrained shards, status)"
    )
    hi.add_argument("--run", required=True)
    hi.add_argument("--format", choices=["table", "csv", "json"], default="table")
    hi.add_argument("--out", help="write to this file instead of stdout")

    rp = sub.add_parser("repair", help="rebuild corrupted or missing checkpoints from the run's own data")
    rp.add_argument("--run", required=True)
    shard_option(rp, "repair")
    rp.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait for another writer")
    rp.add_argument("--json", action="store_true")
    runtime_option(rp)


def _verify(a: argparse.Namespace) -> int:
    from ..evidence import verification

    if a.erasure:
        return _verify_erasure(a)
    if a.ids_file or a.data or a.subjects_file:
        raise SisaError("verify: --ids-file, --subjects-file and --data belong to --erasure")
    certs = verification.verify(a.run, a.shards or None, wait_s=a.wait, workdir=a.workdir)
    if a.json:
        print(json.dumps([c.to_dict() for c in certs], indent=1))
    for c in certs if not a.json else []:
        verdict = (
            "yes"
            if c.bit_identical
            else f"NO (max abs diff {c.max_abs_diff:.3g}, {len(c.differing)} tensors)"
        )
        chain = (
            ""
            if c.fingerprint == c.recomputed_fingerprint
            else f" != recomputed {(c.recomputed_fingerprint or '-')[:12]}"
        )
        rolled = (
            ""
            if c.rolled_back_to is None
            else f", rolled back to slice {c.rolled_back_to} (certified as trained on slices 0..{c.rolled_back_to - 1})"
            if c.rolled_back_to
            else ", out until caught up (rolled back before slice 0: no model)"
        )
        print(
            f"shard {c.shard}: {c.records} records, fingerprint {(c.fingerprint or '-')[:12]}{chain}, "
            f"{c.checkpoints_compared} checkpoints, bit-identical {verdict}{rolled} ({c.seconds:.2f} s)"
        )
    bad = [c.shard for c in certs if not c.ok]
    if bad:
        print(
            f"sisa: error: verify: shard(s) {', '.join(map(str, bad))} differ from a retrain from scratch",
            file=sys.stderr,
        )
        return 1
    if not a.json:
        print(
            f"verified {len(certs)} shard(s): every live checkpoint is bit-identical to a retrain from scratch"
        )
    return 0


def _verify_erasure(a: argparse.Namespace) -> int:
    from ..evidence.erasure import check_erasure

    ids = read_ids(a.ids_file) if a.ids_file else None
    subjects = read_ids(a.subjects_file) if a.subjects_file else None
    report = check_erasure(a.run, ids, a.data, subjects=subjects, wait_s=a.wait)
    if a.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        for c in report.checks:
            print(f"{'FAIL' if not c.ok else 'warn' if c.warning else 'ok  '} {c.name}: {c.detail}")
    if not report.ok:
        failed = ", ".join(c.name for c in report.checks if not c.ok)
        print(f"sisa: error: verify --erasure: failed checks: {failed}", file=sys.stderr)
        return 1
    return 0


def _history(a: argparse.Namespace) -> int:
    from ..evidence.history import deletion_log, format_log

    text = format_log(deletion_log(a.run), a.format)
    if a.out:
        Path(a.out).write_text(text)
        print(f"wrote the deletion log to {a.out}")
    else:
        sys.stdout.write(text)
    return 0


def _repair(a: argparse.Namespace) -> int:
    from ..repair import repair

    report = repair(a.run, a.shards or None, wait_s=a.wait, runtime=a.runtime)
    if a.json:
        print(json.dumps(report, indent=1))
    elif report["checkpoints_rebuilt"] or report["deletions_replayed"]:
        print(
            f"rebuilt {len(report['checkpoints_rebuilt'])} checkpoint(s): "
            f"{', '.join(report['checkpoints_rebuilt']) or 'none'}; retrained shard(s) "
            f"{report['shards_retrained']}; generation {report['generation']} ({report['seconds']} s)"
        )
    else:
        print(f"nothing to repair: every file of shard(s) {report['shards_checked']} verified")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "verify": _verify,
    "history": _history,
    "repair": _repair,
}
