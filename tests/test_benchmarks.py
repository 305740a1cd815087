"""The benchmark scripts run end to end (slow: `make test-all`); their numbers are checked by reading the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_throughput_sections_write_their_keys(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "scripts/bench_unlearning.py", "--quick", "--only", "overhead,parallel,inference"]
    proc = subprocess.run([*cmd, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for key in ("overhead_ratio", "parallel_speedup", "stacked_vs_looped", "stacked_train_speedup_cpu"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["stacked_equals_loop_cpu"] is True  # an actual bit-for-bit comparison of the two runs
    assert result["stacked_train_speedup_gpu"] is None or result["stacked_train_speedup_gpu"] > 0
    assert "stacked (" in proc.stdout and "lanes" in proc.stdout


@pytest.mark.slow
def test_quick_addition_benchmark_writes_its_keys(tmp_path):
    out = tmp_path / "additions.json"
    cmd = [sys.executable, "scripts/bench_additions.py", "--quick", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["additions"]) == {"1", "8", "100"}
    for K, res in result["additions"].items():
        assert res["samples_retrained_mean"] > 0 and res["samples_expected"] > 0, K
        assert 0.5 < res["samples_ratio"] < 1.5, (K, res)  # the cost follows the deletion formula
        assert res["speedup_measured"] > 0
    assert result["additions"]["1"]["shards_retrained_mean"] == 1.0  # one record: one shard retrains
    assert "additions vs full retrain" in proc.stdout
