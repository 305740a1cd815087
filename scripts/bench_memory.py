#!/usr/bin/env python
"""Peak memory of `sisa train` (issue 14): the CLI in a subprocess on a Purchase-like table, next to the size of
its float32 feature matrix (target: peak RSS < 3x the matrix).

    python scripts/bench_memory.py                  # 40,000 x 600 (a 96 MB matrix), S=20, R=10, 1 epoch
    python scripts/bench_memory.py --records 4000   # smaller

Peak RSS is the child's ``ru_maxrss`` (``resource.getrusage(RUSAGE_CHILDREN)``, read in a fresh helper process so
that no earlier child counts). Importing torch, pandas and pyarrow alone takes a few hundred MB whatever the data,
so the baseline (a child that only imports ``sisa.cli.main``) is reported too, and the peak above it.
Also a section of ``scripts/bench_unlearning.py`` (``--sections memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from bench_setup import Setup, table  # noqa: E402

TARGET = 3.0  # peak RSS / feature-matrix bytes
MEASURE = """import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"""  # ru_maxrss: KiB on Linux


def child_peak_rss(cmd: list[str]) -> int:
    """Peak resident bytes of ``cmd`` run as a child of a fresh process (only that child is counted)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return int(proc.stdout.split()[-1])


def measure(work: Path, records: int = 40_000, shards: int = 20, slices: int = 10) -> dict:
    from sisa.tables.datasets import write_purchase

    data = write_purchase(records, 0, work / "memory-data")
    n_features = data["columns"] - 2  # record_id, label
    cfg = work / "memory.yaml"
    cfg.write_text(
        f"data: {{train: {data['path']}}}\nsharding: {{shards: {shards}, slices: {slices}}}\nmodel: {{hidden: [128]}}\n"
        "training: {epochs: 1, batch_size: 128, seed: 0, device: cpu, progress: false}\n"
    )
    train = [sys.executable, "-m", "sisa.cli.main", "train", str(cfg), "--run", str(work / "memory-run")]
    peak = child_peak_rss(train)
    baseline = child_peak_rss([sys.executable, "-c", "import sisa.cli.main, torch, pandas, pyarrow.parquet"])
    matrix = records * n_features * 4
    res = {
        "records": records, "features": n_features, "shards": shards, "slices": slices, "epochs": 1,
        "feature_matrix_bytes": matrix, "peak_rss_bytes": peak, "imports_rss_bytes": baseline,
        "peak_rss_vs_features": peak / matrix, "peak_rss_above_imports_vs_features": (peak - baseline) / matrix,
        "target": TARGET,
    }  # fmt: skip
    res["target_met"] = res["peak_rss_vs_features"] < TARGET
    res["target_met_above_imports"] = res["peak_rss_above_imports_vs_features"] < TARGET
    return res


def memory(s: Setup, work: Path, out: dict) -> None:
    """The bench_unlearning section: the issue's 40k x 600 table (the tiny setup: 2,000 rows)."""
    res = measure(work, records=40_000 if s.n >= 10_000 else 2_000)
    out["memory"] = res
    _print(res)


def _print(res: dict) -> None:
    mb = 2**20
    table(
        f"peak RSS of `sisa train` ({res['records']} x {res['features']} float32 = "
        f"{res['feature_matrix_bytes'] / mb:.0f} MB of features; target < {TARGET}x)",
        ["what", "MB", "x feature matrix"],
        [
            ["sisa train (CLI), peak", res["peak_rss_bytes"] / mb, res["peak_rss_vs_features"]],
            ["importing sisa.cli.main, torch, pandas, pyarrow", res["imports_rss_bytes"] / mb,
             res["imports_rss_bytes"] / res["feature_matrix_bytes"]],
            ["peak above the imports", (res["peak_rss_bytes"] - res["imports_rss_bytes"]) / mb,
             res["peak_rss_above_imports_vs_features"]],
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=40_000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--json", type=Path, help="write the numbers to this JSON file")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sisa-memory-") as work:
        res = measure(Path(work), a.records, a.shards, a.slices)
    _print(res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
