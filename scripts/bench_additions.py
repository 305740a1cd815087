"""Cost of additions (issue 15): K = 1, 8 and 100 new records added to a trained run, against the expected-cost
formula of docs/design.md §1 (the same as for K batched deletions) and against a full retrain.

    python scripts/bench_additions.py --json bench-results/additions.json   # S=20, R=50, 100k records, e=10
    python scripts/bench_additions.py --quick --json /tmp/additions.json     # reduced sizes, about a minute

Purchase-like data (600 binary features, 100 classes, MLP 600-128-100), loop executor, in-process (a long-lived
process, as the server is). K=1 additions are spread over the slices (one new record landing in each chosen slice),
so their mean estimates the expectation for a uniformly placed record; K=8 and K=100 are random new records.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sisa import costs  # noqa: E402
from sisa.fitting import train  # noqa: E402
from sisa.intake import add  # noqa: E402
from sisa.sharding import place  # noqa: E402
from sisa.tables.datasets import PURCHASE_BENCH_FLIP, make_purchase  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import HIDDEN, config, table, timed  # noqa: E402

FULL = {"n": 100_000, "shards": 20, "slices": 50, "epochs": 10.0, "k1": 10, "k8": 3, "k100": 1}
QUICK = {"n": 20_000, "shards": 10, "slices": 10, "epochs": 4.0, "k1": 5, "k8": 2, "k100": 1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced sizes (20k records, S=10, R=10)")
    ap.add_argument("--json", type=Path, help="write every number to this JSON file")
    ap.add_argument("--work", type=Path, help="scratch folder for the run (default: a temp folder)")
    a = ap.parse_args(argv)
    s = QUICK if a.quick else FULL
    N, S, R, e = s["n"], s["shards"], s["slices"], s["epochs"]
    work = Path(a.work or tempfile.mkdtemp(prefix="sisa-bench-add-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_new = s["k1"] + 8 * s["k8"] + 100 * s["k100"]
    pool_size = max(20 * n_new, 2000)
    data = make_purchase(N + pool_size, seed=0, flip=PURCHASE_BENCH_FLIP)
    base, pool = data.iloc[:N].reset_index(drop=True), data.iloc[N:].reset_index(drop=True)
    print(f"Purchase-like data: {N} training records + new ones, 600 features, 100 classes; MLP 600-{HIDDEN[0]}-100; "
          f"S={S}, R={R}, e={e}{'; QUICK' if a.quick else ''}")  # fmt: skip
    cfg = config(S, R, e, executor="loop")
    train(work / "warmup", config(2, 2, 1, executor="loop"), base.iloc[:500])  # imports, first Adam step
    shutil.rmtree(work / "warmup")
    root = work / "run"
    (run, report), t_full = timed(train, root, cfg, base)
    full_samples = sum(r.samples for r in report.results)
    where = place(pool["record_id"], pool["record_id"], shards=S, slices=R, seed=cfg.training.seed)
    rng = np.random.Generator(np.random.PCG64(11))
    used: set[int] = set()

    def take(positions) -> list[int]:
        picked = [int(p) for p in positions if int(p) not in used]
        used.update(picked)
        return picked

    runs: dict[int, list[tuple[float, int, int]]] = {1: [], 8: [], 100: []}
    for j in np.unique(np.linspace(0, R - 1, s["k1"]).round().astype(int)):
        (p,) = take(rng.permutation(np.flatnonzero(where["slice"].to_numpy() == j))[:1])
        receipt, secs = timed(add, root, pool.iloc[[p]])
        runs[1].append((secs, receipt["samples_retrained"], len(receipt["shards_retrained"])))
    for K, times in ((8, s["k8"]), (100, s["k100"])):
        for _ in range(times):
            free = np.array(sorted(set(range(len(pool))) - used))
            ps = take(rng.choice(free, K, replace=False))
            receipt, secs = timed(add, root, pool.iloc[ps])
            runs[K].append((secs, receipt["samples_retrained"], len(receipt["shards_retrained"])))
    shutil.rmtree(work / "run")
    t_again = timed(train, work / "again", cfg, base)[
        1
    ]  # again at the end: the faster of the two (a shared machine)
    shutil.rmtree(work / "again")
    t_first, t_full = t_full, min(t_full, t_again)

    out: dict = {
        "quick": a.quick,
        "records": N,
        "shards": S,
        "slices": R,
        "epochs": e,
        "executor": "loop",
        "full_retrain_seconds": t_full,
        "full_retrain_seconds_runs": [t_first, t_again],
        "full_retrain_samples": full_samples,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "additions": {},
    }
    rows = []
    for K, got in runs.items():
        secs = float(np.mean([g[0] for g in got]))
        samples = float(np.mean([g[1] for g in got]))
        expected_samples = costs.batched_requests_cost(N, S, R, e, K)
        expected_speedup = costs.expected_speedup(S, R, K)
        res = {
            "requests": len(got),
            "seconds_mean": secs,
            "samples_retrained_mean": samples,
            "shards_retrained_mean": float(np.mean([g[2] for g in got])),
            "samples_expected": expected_samples,
            "samples_ratio": samples / expected_samples,
            "speedup_measured": t_full / secs,
            "speedup_samples": full_samples / samples,
            "speedup_expected": expected_speedup,
            "speedup_ratio": t_full / secs / expected_speedup,
        }
        out["additions"][str(K)] = res
        rows.append([K, res["requests"], secs, samples, expected_samples, res["samples_ratio"],
                     res["speedup_measured"], expected_speedup, res["speedup_ratio"]])  # fmt: skip
    table(
        f"additions vs full retrain ({t_full:.1f} s, {full_samples} samples; S={S}, R={R}, in-process)",
        ["K", "requests", "s/request", "samples", "expected", "ratio", "speedup", "expected", "ratio"],
        rows,
    )
    out["seconds_total"] = time.perf_counter() - t0
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
