#!/usr/bin/env python
"""Profile in-process one-record deletions (issue 14): where a deletion's time goes besides the retrain.

    python scripts/profile_delete.py 100000 20 50      # records, shards, slices (Purchase-like, e=10)

Trains a run, deletes 4 random records one by one (printing wall time, the retrain's share of it — the
``run_jobs`` calls, timed by ``bench_deletion.retrain_clock`` — the overhead share (wall - retrain) / wall, samples
retrained and the affected shard and slice), then prints a cProfile of the last deletion sorted by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import numpy as np  # noqa: E402
from bench_deletion import overhead_share, retrain_clock  # noqa: E402
from bench_setup import config  # noqa: E402

from sisa.fitting import train  # noqa: E402
from sisa.tables.datasets import make_purchase  # noqa: E402
from sisa.unlearning import delete  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=int)
    ap.add_argument("shards", type=int)
    ap.add_argument("slices", type=int)
    args = ap.parse_args()
    root = Path(tempfile.gettempdir()) / f"sisa-profile-{args.records}-{args.shards}-{args.slices}"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    run, _ = train(root, config(args.shards, args.slices, 10), make_purchase(args.records, seed=0))
    print(f"train {time.perf_counter() - t0:.2f} s, executor {run.config().training.executor}")
    ids = run.index().active["record_id"].to_numpy()
    rng = np.random.default_rng(0)
    profile = cProfile.Profile()
    walls, retrains = [], []
    for i in range(4):
        rid = ids[rng.integers(len(ids))]
        with retrain_clock() as calls:
            t0 = time.perf_counter()
            if i == 3:  # profiled: its times are inflated, it is left out of the share below
                profile.enable()
            receipt = delete(root, [rid])
            profile.disable()
            wall = time.perf_counter() - t0
        retrain = sum(calls)
        if i < 3:
            walls.append(wall), retrains.append(retrain)
        print(
            f"delete {wall:.3f} s, retrain {retrain:.3f} s, overhead share {overhead_share([wall], [retrain]):.3f}, "
            f"{receipt['samples_retrained']} samples, shard:slice {receipt['shards_retrained']}"
        )
    print(f"deletion_overhead_share (3 unprofiled deletions) {overhead_share(walls, retrains):.3f}")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(35)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
