"""Shared set-up of the unlearning benchmark (``scripts/bench_unlearning.py``): the full and quick sizes, the
Purchase-like config, timing helpers and the table printer."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sisa.config import Config  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setup:
    n: int  # training records
    n_test: int
    epochs: float  # accuracy grid, overhead, parallel, stacked, aware
    grid_shards: tuple[int, ...]
    grid_slices: tuple[int, ...]
    shards: int  # speedup section (the paper's Purchase setting: S=20, R=50)
    slices: int
    speed_epochs: float
    k1_deletions: int  # one per slice, spread over the slices
    k8_batches: int
    par_shards: int  # parallel / stacked sections
    par_epochs: float
    aware_shards: int
    aware_slices: int
    aware_batches: int
    reps: int


FULL = Setup(
    n=100_000, n_test=10_000, epochs=10, grid_shards=(1, 5, 10, 20), grid_slices=(1, 10, 50),
    shards=20, slices=50, speed_epochs=10, k1_deletions=50, k8_batches=8,
    par_shards=20, par_epochs=10, aware_shards=20, aware_slices=10, aware_batches=6, reps=3,
)  # fmt: skip
QUICK = Setup(
    n=20_000, n_test=4_096, epochs=4, grid_shards=(1, 5, 10, 20), grid_slices=(1, 10),
    shards=10, slices=10, speed_epochs=8, k1_deletions=10, k8_batches=3,
    par_shards=10, par_epochs=10, aware_shards=10, aware_slices=10, aware_batches=3, reps=2,
)  # fmt: skip
TINY = Setup(  # a smoke test of the script itself (tests/test_benchmarks.py): its numbers mean nothing
    n=1_600, n_test=256, epochs=1, grid_shards=(1, 2), grid_slices=(1, 2),
    shards=4, slices=4, speed_epochs=2, k1_deletions=2, k8_batches=1,
    par_shards=2, par_epochs=1, aware_shards=2, aware_slices=2, aware_batches=1, reps=1,
)  # fmt: skip
HIDDEN = [128]


def config(shards: int, slices: int, epochs: float, **training) -> Config:
    t = {"epochs": epochs, "batch_size": 128, "lr": 1e-3, "seed": 0, "device": "cpu", "progress": False}
    return Config.from_dict(
        {
            "data": {"deletion_prob_column": training.pop("prob_column", None)},
            "sharding": {"shards": shards, "slices": slices, "strategy": training.pop("strategy", "uniform")},
            "model": {"hidden": HIDDEN},
            "training": {**t, **training},
        }
    )


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def best_of(reps: int, fn) -> float:
    return min(timed(fn)[1] for _ in range(reps))


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n== {title}")
    for j, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))
