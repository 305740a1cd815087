#!/usr/bin/env python
"""Profile in-process one-record deletions (issue 14): where a deletion's time goes besides the retrain.

    python scripts/profile_delete.py 100000 20 50      # records, shards, slices (Purchase-like, e=10)

Trains a run, deletes 4 random records one by one (printing wall time, the retrain's share of it — the
``run_jobs`` calls, timed by ``bench_deletion.retrain_clock`` — the overhead share (wall - retrain) / wall, samples
retrained and the affected shard and slice), then prints a cProfile of the last deletion sorted by cumulative time:
the main thread's work, which is the overhead (the catch-up trains on its own thread, docs/design.md §4). Before
that, a timeline of the third deletion: when each part started and ended, in ms from the call (``--no-timeline``
to skip it).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
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

import sisa.deletion  # noqa: E402
import sisa.refresh  # noqa: E402
import sisa.unlearning  # noqa: E402
from sisa.fitting import train  # noqa: E402
from sisa.store.journal import Journal  # noqa: E402
from sisa.store.rundir import RunDir  # noqa: E402
from sisa.tables.datasets import make_purchase  # noqa: E402
from sisa.unlearning import delete  # noqa: E402

TIMELINE = [  # (owner, attribute, label), in the order a deletion reaches them
    (RunDir, "index", "read index"),
    (sisa.unlearning, "_resolve", "find the IDs"),
    (sisa.unlearning, "_require_retrainable", "verified reads"),
    (Journal, "begin", "journal: pending (the acknowledgement)"),
    (sisa.unlearning, "roll_back", "rollback"),
    (sisa.refresh.EarlyRetrain, "start", "start the catch-up early (plan)"),
    (sisa.refresh.EarlyRetrain, "_train", "catch-up training (its thread)"),
    (RunDir, "write_files", "rollback: write index, tombstones, slices"),
    (sisa.deletion, "collect_garbage", "rollback: stale checkpoints renamed away"),
    (Journal, "roll_back", "journal: rolled back"),
    (sisa.unlearning, "catch_up", "catch-up (waits for the training)"),
    (sisa.refresh, "barrier", "durability barrier"),
    (RunDir, "write_manifest", "write manifest"),
    (Journal, "complete", "journal: applied"),
]


@contextlib.contextmanager
def timeline(marks: list[tuple[str, float, float]], t0: list[float]):
    """Record (label, start ms, end ms) of every TIMELINE part called inside the block."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in TIMELINE]

    def timed(fn, label):
        @functools.wraps(fn)
        def inner(*args, **kw):
            start = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                marks.append((label, (start - t0[0]) * 1e3, (time.perf_counter() - t0[0]) * 1e3))

        return inner

    for (owner, name, label), (_, _, fn) in zip(TIMELINE, saved, strict=True):
        setattr(owner, name, timed(fn, label))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=int)
    ap.add_argument("shards", type=int)
    ap.add_argument("slices", type=int)
    ap.add_argument("--no-timeline", action="store_true", help="skip the timeline of the third deletion")
    args = ap.parse_args()
    root = Path(tempfile.gettempdir()) / f"sisa-profile-{args.records}-{args.shards}-{args.slices}"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    run, _ = train(root, config(args.shards, args.slices, 10), make_purchase(args.records, seed=0))
    print(f"train {time.perf_counter() - t0:.2f} s, executor {run.config().training.executor}")
    ids = run.index().active["record_id"].to_numpy()
    rng = np.random.default_rng(0)
    profile = cProfile.Profile()
    walls, retrains, marks, start = [], [], [], [0.0]
    for i in range(4):
        rid = ids[rng.integers(len(ids))]
        watch = timeline(marks, start) if i == 2 and not args.no_timeline else contextlib.nullcontext()
        with retrain_clock() as calls, watch:
            t0 = start[0] = time.perf_counter()
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
    if marks:
        print(f"\ntimeline of the third deletion (ms from the call; total {walls[2] * 1e3:.1f}):")
        for label, a, b in sorted(marks, key=lambda m: m[1]):
            print(f"  {a:8.1f} {b:8.1f}  {b - a:7.1f}  {label}")
        print()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(35)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
