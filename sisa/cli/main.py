"""``sisa`` command line: a thin typed shell over the library.

Every command exits 0 on success and non-zero with a one-line reason on stderr on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from ..config import Config
from ..exceptions import SisaError, UsageError
from .arguments import RUNTIME_HELP, read_ids, runtime_option, shard_option
from .audit import HANDLERS as AUDIT_HANDLERS
from .audit import add_parsers as add_audit_parsers
from .durability import HANDLERS as DURABILITY_HANDLERS
from .durability import add_parsers as add_durability_parsers
from .intake import HANDLERS as INTAKE_HANDLERS
from .intake import add_parsers as add_intake_parsers
from .retraining import HANDLERS as RETRAIN_HANDLERS
from .retraining import add_parsers as add_retrain_parsers
from .retraining import shard_line, utc
from .tables import HANDLERS as TABLE_HANDLERS
from .tables import add_parsers as add_table_parsers

# The library names a wrong argument by its parameter (UsageError); the CLI shows the flag that set it.
FLAGS = {
    "record_ids": "IDS",
    "subject_ids": "--subject",
    "subjects": "--subjects-file",
    "duplicates": "--check-duplicates/--delete-duplicates",
    "shards": "--shard",
    "out": "--out",
    "fmt": "--format",
    "token_file": "--token-file",
    "port": "--port",
    "max_records": "--max-records",
    "bootstrap": "--bootstrap",
    "holdout": "--holdout",
    "methods": "--methods",
    "specs": "--forget",
    "min_count": "--min-count",
    "allow_returning": "--allow-returning",
}

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    **AUDIT_HANDLERS,
    **DURABILITY_HANDLERS,
    **TABLE_HANDLERS,
    **INTAKE_HANDLERS,
    **RETRAIN_HANDLERS,
}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sisa", description="Exact machine unlearning by SISA training.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a sharded, sliced ensemble into a run directory")
    t.add_argument("config", nargs="?", help="YAML config file (not needed with --resume)")
    t.add_argument("--run", required=True, help="run directory to create")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set sharding.shards=8 (repeatable; with --resume only "
        f"{RUNTIME_HELP})",
    )
    t.add_argument("--resume", action="store_true", help="finish an interrupted training of --run")
    t.add_argument("--json", action="store_true", help="print a machine-readable summary")

    add_table_parsers(sub, runtime_option)  # schema, predict, evaluate

    d = sub.add_parser("delete", help="forget records (by ID) or data subjects and retrain what saw them")
    d.add_argument("--run", required=True)
    d.add_argument("ids", nargs="*", help="record IDs to delete")
    d.add_argument("--ids-file", help="file with one record ID per line")
    d.add_argument(
        "--subject",
        dest="subjects",
        nargs="+",
        default=[],
        metavar="ID",
        help="data-subject IDs: delete every row of these people",
    )
    d.add_argument("--subjects-file", help="file with one subject ID per line")
    d.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another writer to finish instead of failing",
    )
    dup = d.add_mutually_exclusive_group()
    dup.add_argument(
        "--check-duplicates",
        action="store_true",
        help="report other active records with identical features and label (IDs printed only)",
    )
    dup.add_argument(
        "--delete-duplicates", action="store_true", help="delete such duplicates in the same request"
    )
    d.add_argument(
        "--defer",
        action="store_true",
        help="journal, roll the shards back and erase now; leave the retrain to the policy or `sisa retrain`",
    )
    d.add_argument("--json", action="store_true", help="print the receipt as JSON")
    runtime_option(d)

    add_retrain_parsers(sub, shard_option, runtime_option)  # retrain

    s = sub.add_parser("status", help="shards, slices, records, generation, accuracy")
    s.add_argument("--run", required=True)
    s.add_argument("--json", action="store_true")
    s.add_argument(
        "--no-accuracy",
        action="store_true",
        help="do not score a generation no training scored (after deletions) on the test table",
    )

    add_durability_parsers(sub)  # verify, history, repair
    # -- serving parsers: serve --
    sv = sub.add_parser("serve", help="serve predictions over HTTP; deletions applied live (strict mode)")
    sv.add_argument("--run", required=True)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (printed at start)")
    sv.add_argument("--token-file", help="file holding the bearer token for deletions (default: $SISA_TOKEN)")
    sv.add_argument("--max-batch", type=int, default=1024, help="most instances per /predict request")
    sv.add_argument(
        "--max-body-bytes", type=int, default=8 << 20, help="largest request body accepted (else 413)"
    )
    runtime_option(sv)
    add_audit_parsers(sub)  # audit, compare, report
    add_intake_parsers(sub)  # add
    return p


@command("train")
def _train(a: argparse.Namespace) -> int:
    from ..fitting import train

    if a.resume:
        from ..store.rundir import RunDir

        if a.config:
            raise SisaError("train --resume continues the run's frozen config; drop the config file")
        RunDir(a.run).require()
        run, report = train(a.run, None, resume=True, runtime=a.overrides)  # type: ignore[arg-type]
    else:
        if not a.config:
            raise SisaError("train: give a config file (or --resume for an existing run)")
        cfg = Config.load(a.config, a.overrides)
        run, report = train(a.run, cfg)
    manifest = run.manifest() or {}
    summary = {
        "run": str(run.root),
        "generation": report.generation,
        "shards_trained": len(report.jobs),
        "seconds": round(report.seconds, 2),
        **manifest.get("metrics", {}),
    }
    summary.pop("shard_accuracy", None)
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        acc = summary.get("test_accuracy")
        print(
            f"trained {summary['shards_trained']} shard(s) into {run.root} in {summary['seconds']} s"
            + (f"; ensemble test accuracy {acc:.4f}" if acc is not None else "")
        )
    return 0


@command("delete")
def _delete(a: argparse.Namespace) -> int:
    from ..unlearning import delete

    ids = list(a.ids) + read_ids(a.ids_file)
    subjects = list(a.subjects) + read_ids(a.subjects_file)
    dupes = "delete" if a.delete_duplicates else "report" if a.check_duplicates else "ignore"
    receipt = delete(a.run, ids, subjects, wait_s=a.wait, duplicates=dupes, runtime=a.runtime, defer=a.defer)
    if a.json:
        print(json.dumps(receipt, indent=1, default=str))
    elif receipt["status"] == "already_deleted":
        print(f"already deleted, nothing retrained: {', '.join(map(str, receipt['already_deleted']))}")
    else:
        _print_receipt(receipt)
        if receipt.get("already_deleted"):
            print(f"already deleted before: {', '.join(map(str, receipt['already_deleted']))}")
        if receipt.get("subject_rows"):
            print("rows per subject: " + ", ".join(f"{s}: {n}" for s, n in receipt["subject_rows"].items()))
        for key, what in (
            ("duplicates_found", "duplicates still active"),
            ("duplicates_deleted", "duplicates deleted"),
        ):
            if key in receipt:
                print(f"{what}: {', '.join(map(str, receipt[key])) or 'none'}")
    return 0


def _print_receipt(r: dict) -> None:
    if r["status"] == "rolled_back":
        print(
            f"deletion receipt {r['request_id']}: {r['records_deleted']} record(s) forgotten and erased "
            f"(rolled back, retrain pending), generation {r['generation']}, {r['rollback_seconds']} s"
        )
        for s, k in r["shards_rolled_back"].items():
            print(
                f"  shard {s}: "
                + (f"serving slice {int(k) - 1} (rolled back to slice {k})" if int(k) else "out")
            )
        print(f"  retrain deadline {utc(r['retrain_deadline'])}")
        return
    print(
        f"deletion receipt {r['request_id']}: {r['records_deleted']} record(s) forgotten, "
        f"generation {r['generation']}, {r['seconds']} s"
    )
    for s, k in r["shards_retrained"].items():
        before, after = r["fingerprints_before"].get(s, "")[:12], r["fingerprints_after"].get(s, "")[:12]
        print(f"  shard {s}: retrained from slice {k}; fingerprint {before} -> {after}")
    print(f"  retraining cost: {r['samples_retrained']} samples, {r['optimizer_steps']} optimizer steps")


@command("status")
def _status(a: argparse.Namespace) -> int:
    from ..estimator import run_status
    from ..session import reader_session

    reader_session(a.run)
    st = run_status(a.run, accuracy=not a.no_accuracy)
    if a.json:
        print(json.dumps(st, indent=1, default=str))
        return 0
    acc = st["test_accuracy"]
    print(
        f"run {st['run']}  generation {st['generation']}  model {st['model']}  executor {st['executor']}  "
        f"device {st['device']}"
    )
    print(
        f"shards {st['shards']} x slices {st['slices']} ({st['strategy']}); records active {st['records_active']}, "
        f"deleted {st['records_deleted']}; deletion requests {st['deletion_requests']} "
        f"({st['deletions_pending']} pending)"
        + (
            f"; addition requests {st['addition_requests']} ({st['additions_pending']} pending)"
            if st["addition_requests"]
            else ""
        )
    )
    print(
        f"shard sizes {st['shard_records']} (imbalance {st['shard_imbalance']:.1%}); "
        f"serving {len(st['shards_serving'])}/{st['shards']}"
    )
    if acc is not None:
        print(f"ensemble test accuracy {acc:.4f} (generation {st['test_accuracy_generation']})")
    for e in st["shard_states"]:
        if e["state"] != "latest":
            print(f"  shard {e['shard']}: {shard_line(e)}")
    return 0


# -- serving handlers --


@command("serve")
def _serve(a: argparse.Namespace) -> int:
    from ..serving.app import resolve_token, serve
    from ..serving.schema import ServerSettings

    token = resolve_token(a.token_file)
    settings = ServerSettings(token=token, max_batch=a.max_batch, max_body_bytes=a.max_body_bytes)
    return serve(a.run, host=a.host, port=a.port, settings=settings.validate(), runtime=a.runtime)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="sisa: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except SisaError as exc:
        text = exc.render(FLAGS) if isinstance(exc, UsageError) else str(exc)
        reason = text.replace("\n  - ", "; ").replace("\n", " ")
        print(f"sisa: error: {reason}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        print("sisa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
