"""``sisa`` command line: a thin typed shell over the library.

Every command exits 0 on success and non-zero with a one-line reason on stderr on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .exceptions import SisaError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


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
        help="override a config key, e.g. --set sharding.shards=8 (repeatable)",
    )
    t.add_argument("--resume", action="store_true", help="finish an interrupted training of --run")
    t.add_argument("--json", action="store_true", help="print a machine-readable summary")

    pr = sub.add_parser("predict", help="predict with the live ensemble")
    pr.add_argument("--run", required=True)
    pr.add_argument("--data", required=True, help="table of instances (.parquet, .csv, .npz)")
    pr.add_argument("--out", required=True, help="output file: .parquet or .csv")

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
    dup.add_argument("--check-duplicates", action="store_true",
                     help="report other active records with identical features and label (IDs printed only)")
    dup.add_argument("--delete-duplicates", action="store_true", help="delete such duplicates in the same request")
    d.add_argument("--json", action="store_true", help="print the receipt as JSON")

    s = sub.add_parser("status", help="shards, slices, records, generation, accuracy")
    s.add_argument("--run", required=True)
    s.add_argument("--json", action="store_true")

    # -- durability parsers: verify, history, repair --
    # -- serving parsers: serve --
    # -- audit parsers: audit, compare, report --
    return p


def _read_ids(path: str | None) -> list[str]:
    if not path:
        return []
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


@command("train")
def _train(a: argparse.Namespace) -> int:
    from .config import Config
    from .fitting import train

    if a.resume:
        run, report = train(a.run, None, resume=True)  # type: ignore[arg-type]
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


@command("predict")
def _predict(a: argparse.Namespace) -> int:
    import pandas as pd

    from .estimator import SisaClassifier
    from .storage import write_parquet
    from .tables import read_table

    clf = SisaClassifier.load(a.run)
    df = read_table(a.data)
    proba = clf.predict_proba(df)
    idx = proba.argmax(axis=1)
    out = pd.DataFrame()
    id_col = clf.config.data.id_column
    if id_col in df.columns:
        out[id_col] = df[id_col].to_numpy()
    out["prediction"] = [clf.classes_[i] for i in idx]
    for j, c in enumerate(clf.classes_):
        out[f"proba_{c}"] = proba[:, j]
    path = Path(a.out)
    if path.suffix.lower() == ".csv":
        out.to_csv(path, index=False)
    elif path.suffix.lower() in (".parquet", ".pq"):
        write_parquet(path, out)
    else:
        raise SisaError(f"predict --out: expected a .parquet or .csv file name, got {a.out!r}")
    print(f"wrote {len(out)} predictions to {path}")
    return 0


@command("delete")
def _delete(a: argparse.Namespace) -> int:
    from .unlearning import delete

    ids = list(a.ids) + _read_ids(a.ids_file)
    subjects = list(a.subjects) + _read_ids(a.subjects_file)
    dupes = "delete" if a.delete_duplicates else "report" if a.check_duplicates else "ignore"
    receipt = delete(a.run, ids, subjects, wait_s=a.wait, duplicates=dupes)
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
        for key, what in (("duplicates_found", "duplicates still active"), ("duplicates_deleted", "duplicates deleted")):
            if key in receipt:
                print(f"{what}: {', '.join(map(str, receipt[key])) or 'none'}")
    return 0


def _print_receipt(r: dict) -> None:
    print(f"deletion receipt {r['request_id']}: {r['records_deleted']} record(s) forgotten, "
          f"generation {r['generation']}, {r['seconds']} s")
    for s, k in r["shards_retrained"].items():
        before, after = r["fingerprints_before"].get(s, "")[:12], r["fingerprints_after"].get(s, "")[:12]
        print(f"  shard {s}: retrained from slice {k}; fingerprint {before} -> {after}")
    print(f"  retraining cost: {r['samples_retrained']} samples, {r['optimizer_steps']} optimizer steps")


@command("status")
def _status(a: argparse.Namespace) -> int:
    from .estimator import run_status
    from .rundir import RunDir
    from .unlearning import recover

    recover(RunDir(a.run))
    st = run_status(a.run)
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
    )
    print(
        f"shard sizes {st['shard_records']} (imbalance {st['shard_imbalance']:.1%}); "
        f"serving {len(st['shards_serving'])}/{st['shards']}"
    )
    if acc is not None:
        print(f"ensemble test accuracy {acc:.4f}")
    return 0


# -- durability handlers --

# -- serving handlers --

# -- audit handlers --


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="sisa: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except SisaError as exc:
        reason = str(exc).replace("\n  - ", "; ").replace("\n", " ")
        print(f"sisa: error: {reason}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        print("sisa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
