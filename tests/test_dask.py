"""Training and retraining on Dask distributed workers (a real loopback LocalCluster) equals local training.

Every cluster call runs under an alarm: when the job's code is not importable on the workers, Dask only logs a
deserialization error and the caller would wait forever (docs/design.md §7).
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

import pytest

from sisa.exceptions import ClusterError
from sisa.fitting import train
from sisa.train.executors import _require_visible, dask_client, shutdown_dask
from sisa.train.shard import ShardResult, TrainSpec
from sisa.unlearning import delete

from .conftest import assert_runs_identical, small_config

distributed = pytest.importorskip("distributed")


@contextmanager
def deadline(seconds: int):
    def expired(signum, frame):
        raise TimeoutError(f"Dask call did not return within {seconds} s (workers cannot run the task?)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def cluster():
    with deadline(60):
        c = distributed.LocalCluster(
            processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None, host="127.0.0.1"
        )
    yield c
    shutdown_dask()
    c.close()


@pytest.mark.parametrize("executor", ["loop", "stacked"])
def test_dask_training_and_deletion_equal_local(tmp_path, tabular, cluster, executor):
    local, _ = train(tmp_path / "local", small_config(training={"executor": executor}), tabular)
    cfg = small_config(
        training={"executor": executor, "backend": "dask", "scheduler": cluster.scheduler_address}
    )
    tasks_before = _tasks_run(cluster)
    with deadline(120):
        remote, report = train(tmp_path / "dask", cfg, tabular)
    assert [r.shard for r in report.results] == [0, 1, 2]
    # the shards really ran on the workers: loop, one task per shard; stacked, one unit per worker
    assert len(_tasks_run(cluster) - tasks_before) == (3 if executor == "loop" else 2)
    assert_runs_identical(local, remote)

    ids = tabular["record_id"].iloc[[3, 250, 511]].tolist()
    receipt_local = delete(local.root, ids)
    with deadline(120):
        receipt_dask = delete(remote.root, ids)  # the run's frozen config sends the retrain to the cluster
    assert receipt_dask["slices_retrained"] == receipt_local["slices_retrained"]
    assert receipt_dask["fingerprints_after"] == receipt_local["fingerprints_after"]
    assert_runs_identical(local, remote)


def test_without_scheduler_a_local_cluster_trains_the_run(tmp_path, tabular):
    cfg = small_config(training={"executor": "loop", "backend": "dask", "scheduler": None, "n_jobs": 2})
    try:
        with deadline(120):
            remote, _ = train(tmp_path / "dask", cfg, tabular)
            client = dask_client(None, 2)
            assert len(client.scheduler_info()["workers"]) == 2
            assert client.cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    finally:
        shutdown_dask()
    local, _ = train(tmp_path / "local", small_config(training={"executor": "loop"}), tabular)
    assert_runs_identical(local, remote)


def _tasks_run(cluster) -> set:
    return {t[0] for t in cluster.scheduler.transition_log if str(t[0]).startswith("_train_in_worker-")}


def test_client_is_reused_and_workers_are_checked(cluster, monkeypatch):
    with deadline(60):
        first = dask_client(cluster.scheduler_address)
        assert dask_client(cluster.scheduler_address) is first
        monkeypatch.setattr("sisa.train.executors.WORKER_MODULE", "sisa_not_installed_anywhere")
        shutdown_dask()
        with pytest.raises(ClusterError) as err:
            dask_client(cluster.scheduler_address)
    assert str(err.value).startswith(
        "Dask workers cannot import sisa_not_installed_anywhere (ModuleNotFoundError: No module named "
        "'sisa_not_installed_anywhere'); install this project on every worker"
    )


def test_unreachable_scheduler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("sisa.train.executors.CONNECT_TIMEOUT", "1s")
    with (
        deadline(60),
        pytest.raises(ClusterError, match=r"^cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9 "),
    ):
        dask_client("tcp://127.0.0.1:9")


def test_checkpoints_not_visible_here_mean_no_shared_filesystem(tmp_path):
    spec = TrainSpec(small_config(), 6, 3, "d" * 64, str(tmp_path / "checkpoints"), "cpu")
    result = ShardResult(shard=1, from_slice=0, checkpoints=["slice-000-0123456789abcdef"])
    with pytest.raises(ClusterError) as err:
        _require_visible(spec, result)
    assert str(err.value) == (
        f"a Dask worker wrote 1 checkpoint(s) of shard 1 under {tmp_path}/checkpoints/shard-001 that this "
        "process cannot see; put the run directory on a filesystem every worker mounts at the same path"
    )
