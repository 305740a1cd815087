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
def test_quick_forgetting_benchmark_writes_its_keys_and_plot(tmp_path):
    out = tmp_path / "forgetting.json"
    cmd = [
        sys.executable,
        "scripts/bench_forgetting.py",
        "--quick",
        "--json",
        str(out),
        "--work",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert 0 < result["time_to_forget_p50_ms"] <= result["time_to_forget_p99_ms"]
    assert (
        result["stale_answers_after_ack"] <= 2
    )  # strict mode, measured: only a same-instant re-check can count
    assert result["retrains_immediate"] == result["sizes"]["requests"]  # one retrain per request
    assert 0 < result["retrains_batched"] <= result["sizes"]["shards"]  # at most one per shard
    assert result["samples_batched"] < result["samples_immediate"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "time to forget under load" in proc.stdout and "simulated day" in proc.stdout
