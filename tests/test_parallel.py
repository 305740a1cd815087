"""Parallel shard training through joblib (loky worker processes) is bit-identical to sequential training."""

from __future__ import annotations

import os

import pytest
import torch

from sisa.fitting import train
from sisa.refresh import plan, train_spec
from sisa.train.executors import run_jobs, work_units
from sisa.unlearning import delete

from .conftest import assert_runs_identical, small_config


def _two_shard_ids(run) -> list:
    """One record from a late slice of shard 0 and one from slice 0 of shard 2."""
    active = run.index().active
    a = active[(active["shard"] == 0) & (active["slice"] == 2)]["record_id"].tolist()[:1]
    b = active[(active["shard"] == 2) & (active["slice"] == 0)]["record_id"].tolist()[:1]
    return a + b


@pytest.mark.parametrize("executor", ["loop", "stacked"])
def test_n_jobs_2_trains_and_retrains_bit_identical_to_sequential(tmp_path, tabular, executor):
    seq_cfg = small_config(training={"executor": executor})
    seq_run, seq_report = train(tmp_path / "seq", seq_cfg, tabular)
    cfg = small_config(training={"n_jobs": 2, "executor": executor})
    assert cfg.digest() == seq_cfg.digest()  # n_jobs changes how fast, never what is computed
    par_run, par_report = train(tmp_path / "par", cfg, tabular)
    assert par_run.config().training.executor == executor
    assert_runs_identical(seq_run, par_run)
    # results come back in job order whatever order the pool finished them in
    assert [r.shard for r in par_report.results] == [j.shard for j in par_report.jobs] == [0, 1, 2]
    assert [r.checkpoints for r in par_report.results] == [r.checkpoints for r in seq_report.results]

    ids = _two_shard_ids(seq_run)
    r_seq, r_par = delete(seq_run.root, ids), delete(par_run.root, ids)
    assert r_par["slices_retrained"] == r_seq["slices_retrained"] == {"0": [2], "2": [0, 1, 2]}
    assert_runs_identical(seq_run, par_run)

    # ... and equal to training from scratch (in parallel) without those records
    rest = tabular[~tabular["record_id"].isin(ids)]
    fresh, _ = train(tmp_path / "fresh", cfg, rest)
    assert_runs_identical(fresh, par_run)


def test_warm_workers_starts_the_pool_a_retrain_would_use_and_only_then(tmp_path, tabular):
    from joblib import Parallel, delayed

    from sisa.train.executors import _ready, warm_workers

    assert warm_workers(small_config()) == 0  # n_jobs=1: the retrain runs in this process
    assert warm_workers(small_config(training={"backend": "dask", "n_jobs": 2})) == 0
    assert warm_workers(small_config(training={"n_jobs": 2})) == 2
    pids = set(Parallel(n_jobs=2, backend="loky", max_nbytes=None)(delayed(_ready)() for _ in range(4)))
    assert pids and os.getpid() not in pids  # worker processes, with the training code imported


def test_work_units_split_jobs_without_changing_them(tmp_path, tabular):
    cfg = small_config(training={"executor": "loop"}, sharding={"shards": 5})
    run, _ = train(tmp_path / "run", cfg, tabular)
    config = run.config()
    for shard in range(5):  # drop the checkpoints of every shard from slice 1 on: every shard has a job again
        for folder in sorted(run.shard_checkpoints(shard).iterdir())[1:]:
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
    jobs, data, _ = plan(run, config, list(range(5)))
    assert [(j.shard, j.from_slice) for j in jobs] == [(s, 1) for s in range(5)]
    spec = train_spec(run, config)
    sizes = {j.shard: int(data[j.shard].slice_ends[-1]) for j in jobs}

    loop_units = work_units(spec, jobs, data, "loop", workers=2)
    assert all(len(u) == 1 for u in loop_units)
    assert [sizes[u[0].shard] for u in loop_units] == sorted(sizes.values(), reverse=True)  # largest first
    assert work_units(spec, jobs, data, "loop", workers=1) == [[j] for j in jobs]

    stacked_units = work_units(spec, jobs, data, "stacked", workers=2)
    assert len(stacked_units) == 2
    assert sorted(j.shard for u in stacked_units for j in u) == [0, 1, 2, 3, 4]
    assert work_units(spec, jobs, data, "stacked", workers=1) == [jobs]

    seen = []
    results = run_jobs(spec, jobs, data, "loop", on_done=lambda r: seen.append(r.shard))
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert [r.shard for r in results] == [0, 1, 2, 3, 4]
    assert all(len(r.checkpoints) == 2 for r in results)  # slices 1 and 2 retrained


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_is_deterministic_and_deletion_exact(tmp_path, tabular):
    cfg = small_config(training={"device": "cuda", "executor": "loop"})
    a, _ = train(tmp_path / "a", cfg, tabular)
    assert a.config().training.device == "cuda"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # set before CUDA started (resolve_device)
    b, _ = train(tmp_path / "b", cfg, tabular)
    assert_runs_identical(a, b)
    ids = _two_shard_ids(a)
    delete(a.root, ids)
    fresh, _ = train(tmp_path / "fresh", cfg, tabular[~tabular["record_id"].isin(ids)])
    assert_runs_identical(fresh, a)
