"""``sisa schema``, ``predict`` and ``evaluate``: the commands that read a user's table as it comes (raw columns,
no IDs needed). Parsers and handlers; :mod:`sisa.cli.main` runs them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ..exceptions import SisaError, UsageError
from ..tables.drafting import DEFAULT_MIN_COUNT


def add_parsers(sub, runtime_option: Callable[[argparse.ArgumentParser], None]) -> None:
    sc = sub.add_parser(
        "schema",
        help="draft a data.schema YAML from a table (types, frequent categories) to review and commit",
        description="Draft data.schema from a table. Categories held by fewer than --min-count rows are not "
        "written (they go to the column's __unknown__ bucket): a value one person holds identifies them and "
        "would outlive their deletion in the config. Numeric columns are scaled by each shard's first slice.",
    )
    sc.add_argument("table", help="the training table (.parquet, .csv, .npz)")
    sc.add_argument("--id-column", required=True, help="the record-ID column (never a feature)")
    sc.add_argument("--label-column", required=True, help="the label column (never a feature)")
    sc.add_argument("--subject-column", help="the data-subject column, if any (never a feature)")
    sc.add_argument(
        "--min-count",
        type=int,
        default=DEFAULT_MIN_COUNT,
        metavar="K",
        help=f"list a category only if at least K rows hold it (default {DEFAULT_MIN_COUNT}: no single person's "
        "value is written, and deleting one holder still leaves nine)",
    )
    sc.add_argument("--out", help="write the YAML here (default: stdout)")

    pr = sub.add_parser("predict", help="predict with the live ensemble (raw columns, as in training)")
    pr.add_argument("--run", required=True)
    pr.add_argument("--data", required=True, help="table of instances (.parquet, .csv, .npz); no IDs needed")
    pr.add_argument("--out", required=True, help="output file: .parquet or .csv")
    _aggregation_option(pr)
    runtime_option(pr)

    ev = sub.add_parser("evaluate", help="score the live ensemble on a labelled table, without retraining")
    ev.add_argument("--run", required=True)
    ev.add_argument("--data", required=True, help="labelled table (.parquet, .csv, .npz); no IDs needed")
    ev.add_argument("--json", action="store_true", help="print the scores as JSON")
    _aggregation_option(ev)
    runtime_option(ev)


def _aggregation_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--aggregation",
        choices=["soft", "hard"],
        help="soft: mean probability; hard: majority vote (default: the run's aggregation.method)",
    )


def _classifier(a: argparse.Namespace):
    from ..estimator import SisaClassifier

    runtime = list(a.runtime) + ([f"aggregation.method={a.aggregation}"] if a.aggregation else [])
    return SisaClassifier.load(a.run, runtime)


def _schema(a: argparse.Namespace) -> int:
    from ..tables.drafting import draft_schema
    from ..tables.table import read_table

    if a.min_count < 1:
        raise UsageError([("min_count", f"expected an integer >= 1, got {a.min_count}")])
    df = read_table(a.table)
    draft = draft_schema(df, a.id_column, a.label_column, a.subject_column, a.min_count, Path(a.table).name)
    for w in draft.warnings:
        print(f"sisa: warning: {w}", file=sys.stderr)
    if a.out:
        Path(a.out).write_text(draft.text)
        print(f"wrote a schema draft to {a.out}; review it, then set data.schema: {a.out} in the config")
    else:
        sys.stdout.write(draft.text)
    return 0


def _predict(a: argparse.Namespace) -> int:
    import pandas as pd

    from ..store.files import write_parquet
    from ..tables.table import read_table

    path = Path(a.out)
    if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise SisaError(f"predict --out: expected a .parquet or .csv file name, got {a.out!r}")
    if not path.parent.is_dir():
        raise SisaError(f"predict --out: folder {str(path.parent)!r} does not exist")
    clf = _classifier(a)
    df = read_table(a.data)
    proba = clf.predict_proba(df)
    out = pd.DataFrame()
    id_col = clf.config.data.id_column
    if id_col in df.columns:
        out[id_col] = df[id_col].to_numpy()
    else:  # row numbers stand in for IDs
        out["row"] = range(len(df))
    out["prediction"] = [clf.classes_[i] for i in proba.argmax(axis=1)]
    for j, c in enumerate(clf.classes_):
        out[f"proba_{c}"] = proba[:, j]
    if path.suffix.lower() == ".csv":
        out.to_csv(path, index=False)
    else:
        write_parquet(path, out)
    print(f"wrote {len(out)} predictions to {path}")
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from ..tables.table import read_table

    clf = _classifier(a)
    result = clf.evaluate(read_table(a.data))
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    print(
        f"{result['rows']} rows, aggregation {result['aggregation']}: accuracy {result['accuracy']:.4f}, "
        f"log-loss {result['log_loss']:.4f}"
    )
    for c, s in result["per_class"].items():
        p = "n/a" if s["precision"] is None else f"{s['precision']:.4f}"
        r = "n/a" if s["recall"] is None else f"{s['recall']:.4f}"
        print(f"  class {c}: precision {p}, recall {r}, support {s['support']}")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "schema": _schema,
    "predict": _predict,
    "evaluate": _evaluate,
}
