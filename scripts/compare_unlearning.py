"""Exact (retrain, SISA) versus APPROXIMATE unlearning on the same forget requests.

Same arguments as ``sisa compare``:

    python scripts/compare_unlearning.py --config configs/adult.yaml --forget random:100 --forget class:1 \
        [--set training.epochs=4] [--methods approx-finetune ...] [--json] [--out results/compare]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sisa.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
