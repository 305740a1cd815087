"""The benchmark scripts run end to end (most slow: `make test-all`); their numbers are checked by reading the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from sisa.config import Config
from sisa.exceptions import DataError
from sisa.store.checkpoints import load_checkpoint
from sisa.tables.table import validate_table
from sisa.train.models import shard_model
from sisa.unlearning import delete
from tests.conftest import small_config, train_run

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
def test_tiny_deletion_sections_write_their_keys(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "scripts/bench_unlearning.py", "--tiny", "--sections", "speedup,handloop,memory"]
    proc = subprocess.run([*cmd, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for K in ("k1", "k8"):
        assert 0 < result[f"deletion_overhead_share_{K}"] < 1
        assert result[f"speedup_{K}_ratio"] > 0 and result[f"deletion_vs_hand_loop_{K}"] > 0
        for key in (f"deletion_overhead_share_{K}", f"speedup_{K}_ratio", f"deletion_vs_hand_loop_{K}"):
            assert isinstance(result[f"{key}_target_met"], bool), key
        hand = result["handloop"][K]
        assert 0 < hand["retrain_seconds"] < hand["deletion_seconds"]
    assert result["train_peak_rss_vs_features"] > result["train_peak_rss_above_imports_vs_features"] > 0
    assert "hand-written torch loop" in proc.stdout and "overhead share" in proc.stdout


def test_profile_delete_prints_the_share_and_the_timeline_of_one_deletion():
    cmd = [sys.executable, "scripts/profile_delete.py", "1600", "4", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "deletion_overhead_share (3 unprofiled deletions)" in proc.stdout
    timeline = proc.stdout.split("timeline of the third deletion")[1].split("\n\n")[0]
    labels = [line.split("  ")[-1] for line in timeline.splitlines()[1:]]
    assert labels[:3] == ["read index", "find the IDs", "verified reads"]
    assert "catch-up training (its thread)" in labels and labels[-1] == "journal: applied"


# ---- the pieces the deletion and memory sections are built from (fast) -----------------------------------------
sys.path.insert(0, str(ROOT / "scripts"))


def test_retrain_clock_times_the_training_jobs_of_a_deletion(tmp_path, tabular):
    from bench_deletion import overhead_share, retrain_clock, timed_deletion

    import sisa.refresh

    run = train_run(tmp_path / "run", tabular, small_config())
    inner = sisa.refresh.run_jobs
    receipt, wall, retrain = timed_deletion(run.root, [int(tabular["record_id"].iloc[0])])
    assert sisa.refresh.run_jobs is inner  # put back
    assert receipt["samples_retrained"] > 0 and 0 < retrain < wall
    assert 0 < overhead_share([wall], [retrain]) < 1
    with retrain_clock() as calls:
        again = delete(run.root, [int(tabular["record_id"].iloc[0])])
    assert again["status"] == "already_deleted" and calls == []  # nothing retrained, nothing timed
    assert overhead_share([2.0, 2.0], [1.0, 2.0]) == 0.25


def test_hand_loop_resumes_from_the_runs_checkpoint_and_writes_one_per_slice(tmp_path, tabular):
    from bench_deletion import _torch_adam, hand_retrain, shard_tensors

    run = train_run(tmp_path / "run", tabular, small_config())
    config, entry = run.config(), run.manifest()["shards"][1]
    ck = load_checkpoint(run.shard_checkpoints(1) / entry["checkpoints"][0])
    data = shard_tensors(run, config, 1)
    assert data.features.shape == (entry["records"], 6) and data.slice_ends[-1] == entry["records"]
    secs = hand_retrain(run, config, 1, 1, data, tmp_path / "hand")
    written = sorted(p.name for p in (tmp_path / "hand" / "shard-001").iterdir())
    assert secs > 0 and len(written) == 2  # slices 1 and 2
    for name in written:
        model = load_file(tmp_path / "hand" / "shard-001" / name / "model.safetensors")
        assert model.keys() == ck.model.keys()
        assert (tmp_path / "hand" / "shard-001" / name / "optimizer.safetensors").stat().st_size > 0
    model = shard_model(config, 0)
    model.load_state_dict(ck.model)
    opt = _torch_adam(model, config.training.lr, ck.optimizer)
    for (
        name,
        p,
    ) in model.named_parameters():  # the moments and step count of sisa's optimizer, in torch's Adam
        assert torch.equal(opt.state[p]["exp_avg"], ck.optimizer[f"exp_avg.{name}"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], ck.optimizer[f"exp_avg_sq.{name}"])
        assert int(opt.state[p]["step"]) == int(ck.optimizer["step"])


def test_child_peak_rss_counts_only_that_child():
    from bench_memory import child_peak_rss

    small = child_peak_rss([sys.executable, "-c", "pass"])
    big = child_peak_rss([sys.executable, "-c", "import numpy; a = numpy.ones(200 * 2**20 // 8)"])
    assert small < 100 * 2**20 and big > small + 190 * 2**20


def test_feature_matrix_built_column_by_column_equals_the_frame_conversion():
    cfg = Config().data
    df = pd.DataFrame({
        "record_id": [1, 2, 3], "label": [0, 1, 0],
        "f64": [0.1, 1e30, -2.5], "i64": [1, -7, 2**40], "i8": np.array([1, 2, 3], np.int8),
        "flag": [True, False, True], "f32": np.array([0.3, 0.7, 1.1], np.float32),
        "nullable": pd.array([1.25, 2.0, 3.5], dtype="Float64"),
    })  # fmt: skip
    table = validate_table(df, cfg, "mixed")
    names = ["f64", "i64", "i8", "flag", "f32", "nullable"]
    assert table.feature_names == names
    expected = df[names].to_numpy(dtype=np.float32)
    assert table.features.dtype == np.float32 and table.features.flags.c_contiguous
    assert table.features.tobytes() == expected.tobytes()
    df.loc[1, "f64"], df.loc[2, "f32"] = np.nan, np.inf
    with pytest.raises(DataError) as err:
        validate_table(df, cfg, "mixed")
    assert "columns ['f64', 'f32']: NaN or infinite feature values at rows 1, 2" in str(err.value)


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
