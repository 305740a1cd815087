"""`make demo`: train on UCI Adult, predict, forget three people's records, show the receipt, verify the result.

Every step is a real `sisa` command (run in this process through `sisa.cli.main.main`), echoed as you would type it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sisa.cli.main import main  # noqa: E402

RUN = Path("runs/demo")
PREDICTIONS = Path("runs/demo-predictions.csv")
FORGET = ["adult-train-00042", "adult-train-01234", "adult-train-20000"]


def sisa(*args: str) -> None:
    print(f"\n$ sisa {' '.join(args)}", flush=True)
    code = main(list(args))
    if code != 0:
        raise SystemExit(f"demo: `sisa {' '.join(args)}` failed with exit code {code}")


def show_predictions(title: str) -> None:
    df = pd.read_csv(PREDICTIONS)
    print(f"  {title}: first 5 of {len(df)} test rows")
    print("  " + df.head(5).to_string(index=False, float_format=lambda v: f"{v:.4f}").replace("\n", "\n  "))


def grep_run(ids: list[str]) -> list[str]:
    """Files in the run directory whose bytes contain any of the IDs (an auditor's `grep -r`)."""
    hits = []
    for path in sorted(RUN.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {i}" for i in ids if i.encode() in data]
    return hits


def main_demo() -> None:
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.parent.mkdir(exist_ok=True)
    sisa("train", "configs/adult.yaml", "--run", str(RUN))
    sisa("predict", "--run", str(RUN), "--data", "data/adult/test.parquet", "--out", str(PREDICTIONS))
    show_predictions("predictions")
    print(f"\n  before deletion, the run directory mentions the IDs {len(grep_run(FORGET))} times")
    sisa("delete", "--run", str(RUN), *FORGET)
    sisa("delete", "--run", str(RUN), FORGET[0])
    sisa("status", "--run", str(RUN))
    sisa("verify", "--run", str(RUN))
    sisa("predict", "--run", str(RUN), "--data", "data/adult/test.parquet", "--out", str(PREDICTIONS))
    show_predictions("predictions after forgetting")
    hits = grep_run(FORGET)
    print(
        f"\n  after deletion, files in {RUN} containing a deleted ID: {len(hits)}"
        + (f" {hits}" if hits else "")
    )
    if hits:
        raise SystemExit("demo: deleted IDs survived on disk")


if __name__ == "__main__":
    main_demo()
