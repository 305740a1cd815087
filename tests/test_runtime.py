"""Runtime keys: `--set` on an existing run changes where and how fast it retrains (workers, cluster, lanes,
progress, inference), never what — and nothing else can be changed there."""

from __future__ import annotations

import shutil

import pytest

from sisa.config import RUNTIME_KEYS
from sisa.exceptions import ConfigError
from sisa.fitting import train
from sisa.serving import worker as serving_worker
from sisa.serving.server import Server
from sisa.store.rundir import RunDir
from sisa.tables.datasets import make_tabular
from sisa.unlearning import delete
from tests.conftest import assert_runs_identical, small_config, train_run
from tests.test_cli import one_line_error, run_cli

CONFIG = small_config(sharding={"shards": 3, "slices": 2}, training={"epochs": 1, "executor": "stacked"})


@pytest.fixture
def base(tmp_path):
    df = make_tabular(240, seed=4, n_features=5, n_classes=3)
    return train_run(tmp_path / "base", df, CONFIG)


def copy(run: RunDir, path) -> RunDir:
    shutil.copytree(run.root, path)
    return RunDir(path)


def test_runtime_keys_leave_the_digest_alone_and_other_keys_are_refused_all_at_once():
    cfg = CONFIG
    fast = cfg.with_runtime(["training.n_jobs=2", "training.stack_threads=3", "aggregation.inference=loop"])
    assert (fast.training.n_jobs, fast.training.stack_threads, fast.aggregation.inference) == (2, 3, "loop")
    assert fast.digest() == cfg.digest()
    with pytest.raises(ConfigError) as err:
        cfg.with_runtime(["training.epochs=3", "training.n_jobs=2", "sharding.shards=4"])
    allowed = ", ".join(RUNTIME_KEYS)
    assert err.value.problems == [
        f"training.epochs: cannot be changed on an existing run (it shapes the trained models); --set here takes "
        f"only {allowed}",
        f"sharding.shards: cannot be changed on an existing run (it shapes the trained models); --set here takes "
        f"only {allowed}",
    ]
    with pytest.raises(ConfigError, match="training.n_jobs: expected an integer >= 1, got 0"):
        cfg.with_runtime(["training.n_jobs=0"])  # still validated


@pytest.mark.parametrize(
    "override",
    [
        "training.n_jobs=3",
        "training.backend=dask",
        "training.scheduler=tcp://10.0.0.9:8786",
        "training.progress=true",
        "training.memory_budget_mb=7",
        "training.stack_threads=5",
        "aggregation.inference=stacked",
        "aggregation.method=hard",
        "aggregation.weights=[1, 2, 3]",
        "unlearning.retrain=batched",
        "unlearning.max_delay=6h",
        "unlearning.max_accuracy_drop=0.02",
        "unlearning.deadline=14d",
    ],
)
def test_every_runtime_key_is_outside_the_digest(override):
    assert override.partition("=")[0] in RUNTIME_KEYS
    changed = CONFIG.with_runtime([override])
    assert changed.to_dict() != CONFIG.to_dict() and changed.digest() == CONFIG.digest()


def test_the_runtime_key_list_is_covered_by_the_digest_test():
    keys = {o.partition("=")[0] for o in test_every_runtime_key_is_outside_the_digest.pytestmark[0].args[1]}
    assert keys == set(RUNTIME_KEYS)


def test_cli_delete_with_runtime_keys_equals_a_plain_delete_and_keeps_the_frozen_config(
    base, tmp_path, capsys
):
    plain, tuned = copy(base, tmp_path / "plain"), copy(base, tmp_path / "tuned")
    frozen = tuned.config_path.read_bytes()
    ids = ["3", "100", "201"]
    delete(plain.root, ids)
    argv = [
        "delete",
        "--run",
        tuned.root,
        *ids,
        "--set",
        "training.stack_threads=1",
        "--set",
        "training.n_jobs=2",
    ]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and "3 record(s) forgotten" in out
    assert_runs_identical(plain, tuned)
    assert tuned.config_path.read_bytes() == frozen  # the run's own config never changes


def test_cli_refuses_result_keys_on_an_existing_run(base, capsys):
    code, _, err = run_cli(capsys, "delete", "--run", base.root, "3", "--set", "model.hidden=[4]")
    allowed = ", ".join(RUNTIME_KEYS)
    one_line_error(
        code,
        err,
        2,
        "invalid configuration: model.hidden: cannot be changed on an existing run (it shapes the trained "
        f"models); --set here takes only {allowed}",
    )
    assert base.index().active["record_id"].astype(str).eq("3").any()  # nothing deleted


def test_repair_and_resume_take_runtime_keys(base, capsys):
    code, _, _ = run_cli(capsys, "repair", "--run", base.root, "--set", "training.progress=false")
    assert code == 0
    code, _, _ = run_cli(capsys, "train", "--run", base.root, "--resume", "--set", "training.stack_threads=1")
    assert code == 0
    with pytest.raises(ConfigError, match="runtime overrides are for resuming a run"):
        train(base.root.parent / "new", CONFIG, make_tabular(50, seed=1), runtime=["training.n_jobs=2"])


def test_the_server_retrains_with_its_runtime_keys(base, monkeypatch):
    seen = []
    real = serving_worker.delete
    monkeypatch.setattr(serving_worker, "delete", lambda *a, **k: seen.append(k["runtime"]) or real(*a, **k))
    server = Server(base.root, runtime=["training.stack_threads=1"])
    try:
        assert server.state.config.training.stack_threads == 1
        job = serving_worker.DeletionJob(["3"], [])
        server.worker.submit(job)
        assert job.decided.wait(60) and job.error is None
    finally:
        server.close()
    assert seen == [("training.stack_threads=1",)]


def test_serve_and_repair_parse_runtime_keys():
    from sisa.cli.main import build_parser

    p = build_parser()
    a = p.parse_args(["serve", "--run", "r", "--set", "training.backend=local", "--set", "training.n_jobs=1"])
    assert a.runtime == ["training.backend=local", "training.n_jobs=1"]
    assert p.parse_args(["repair", "--run", "r"]).runtime == []
