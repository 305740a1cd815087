"""Per-subject deletion cost with and without co-location (issue 9), expected and measured.

Data: `make_subjects` rows owned by people with a skewed (Zipf-like) distribution, one person holding ~5 % of the
rows. Two runs on the same rows: placement by subject (`data.subject_column`, co-located) and placement by record.
For each, forget the same random people one request at a time and compare the samples retrained and wall time
with the expectation: the paper's formulas (one request for co-location; a batch of K = the person's row count for
record placement) and the exact expectation for the run's actual placement.

    python scripts/bench_subjects.py [--rows 20000] [--subjects 1000] [--requests 6] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sisa.config import Config  # noqa: E402
from sisa.costs import batched_requests_cost, full_retrain_cost, single_request_cost  # noqa: E402
from sisa.estimator import SisaClassifier, run_status  # noqa: E402
from sisa.tables.datasets import make_subjects  # noqa: E402
from sisa.train.shard import epochs_per_slice  # noqa: E402
from sisa.unlearning import delete  # noqa: E402


def subject_cost(index, subject: str, shards: int, slices: int, epochs: float) -> float:
    """Samples a deletion of every row of ``subject`` retrains under this exact placement (on the rows that remain)."""
    mine = (index["subject_id"] == subject).to_numpy()
    counts = np.zeros((shards, slices))
    np.add.at(counts, (index["shard"].to_numpy()[~mine], index["slice"].to_numpy()[~mine]), 1.0)
    upto = counts.cumsum(axis=1)
    first = index.loc[mine].groupby("shard")["slice"].min()
    eps = epochs_per_slice(epochs, slices)
    return float(sum(eps * upto[s, k:].sum() for s, k in first.items()))


def run_mode(name: str, train, test, cfg: Config, victims: list[str], root: Path) -> dict:
    colocated = cfg.data.subject_column is not None
    t0 = time.perf_counter()
    clf = SisaClassifier(cfg, run_dir=root / name).fit(
        train if colocated else train.drop(columns=["subject_id"])
    )
    train_s = time.perf_counter() - t0
    feats = [c for c in test.columns if c.startswith("x")]
    acc = float((clf.predict(test[feats]) == test["label"].to_numpy()).mean())
    owner = dict(zip(train["record_id"], train["subject_id"], strict=True))
    S, R, e = cfg.sharding.shards, cfg.sharding.slices, cfg.training.epochs
    n, sizes = len(train), train["subject_id"].value_counts()
    exact = []
    formula = [
        single_request_cost(n, S, R, e) if colocated else batched_requests_cost(n, S, R, e, int(sizes[v]))
        for v in victims
    ]
    measured, seconds, shards_hit = [], [], []
    for v in victims:
        index = clf._run().index().active
        index = index.assign(subject_id=[owner[r] for r in index["record_id"]])
        exact.append(subject_cost(index, v, S, R, e))
        t1 = time.perf_counter()
        if colocated:
            r = delete(clf.run_dir, subject_ids=[v])
        else:
            r = delete(clf.run_dir, record_ids=train.loc[train["subject_id"] == v, "record_id"].tolist())
        seconds.append(time.perf_counter() - t1)
        measured.append(r["samples_retrained"])
        shards_hit.append(len(r["shards_retrained"]))
    return {
        "placement": name,
        "train_seconds": round(train_s, 2),
        "test_accuracy": round(acc, 4),
        "shard_imbalance": run_status(clf.run_dir)["shard_imbalance"],
        "expected_samples_formula": float(np.mean(formula)),
        "expected_samples_placement": float(np.mean(exact)),
        "measured_samples": float(np.mean(measured)),
        "measured_seconds": float(np.mean(seconds)),
        "shards_per_request": float(np.mean(shards_hit)),
        "full_retrain_samples": full_retrain_cost(n, e),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--subjects", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=6, help="people forgotten, one request each")
    ap.add_argument("--json", help="write results to this JSON file")
    a = ap.parse_args()
    df = make_subjects(a.rows, a.subjects, seed=0, top_share=0.05)
    people = df["subject_id"].unique()
    rng = np.random.default_rng(0)
    held_out = set(rng.choice(people, size=len(people) // 5, replace=False))
    test = df[df["subject_id"].isin(held_out)]
    train = df[~df["subject_id"].isin(held_out)].reset_index(drop=True)
    victims = [
        "person-00000",
        *rng.choice(
            sorted(set(train["subject_id"]) - {"person-00000"}), a.requests - 1, replace=False
        ).tolist(),
    ]
    base = {
        "sharding": {"shards": 10, "slices": 5},
        "model": {"hidden": [32]},
        "training": {"epochs": 4, "progress": False},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, data_cfg in (
            ("by subject (co-located)", {"subject_column": "subject_id"}),
            ("by record", {}),
        ):
            cfg = Config.from_dict({**base, "data": data_cfg})
            rows.append(run_mode(name.split()[1], train, test, cfg, victims, Path(tmp)))
            shutil.rmtree(Path(tmp) / rows[-1]["placement"], ignore_errors=True)
    print(
        f"{len(train)} rows, {train['subject_id'].nunique()} people; forgetting {a.requests} people "
        f"(incl. the largest, {int((train['subject_id'] == 'person-00000').sum())} rows), one request each"
    )
    cols = [
        "placement",
        "test_accuracy",
        "shard_imbalance",
        "shards_per_request",
        "expected_samples_formula",
        "expected_samples_placement",
        "measured_samples",
        "measured_seconds",
    ]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    ratio = rows[1]["measured_samples"] / rows[0]["measured_samples"]
    print(f"co-location makes forgetting a person {ratio:.2f}x cheaper in samples retrained")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"modes": rows, "colocation_cost_ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
