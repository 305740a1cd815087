"""The command line, in-process (``sisa.cli.main.main``) and once as a real ``python -m sisa.cli`` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sisa.cli.main import main
from sisa.tables.datasets import make_tabular

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path):
    """Train/test tables with e-mail IDs and string labels, and a YAML config naming them."""
    df = make_tabular(180, seed=2, n_features=4, n_classes=3, id_kind="email", string_labels=True)
    df.iloc[:150].to_parquet(tmp_path / "train.parquet", index=False)
    df.iloc[150:].to_csv(tmp_path / "test.csv", index=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "# test config\n"
        f"data:\n  train: {tmp_path / 'train.parquet'}\n  test: {tmp_path / 'test.csv'}\n"
        "sharding:\n  shards: 2\n  slices: 2\n"
        "model:\n  hidden: [8]\n"
        "training:\n  epochs: 1\n  batch_size: 16\n  progress: false\n"
    )
    return tmp_path, df


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train(capsys, tmp, *extra: str):
    return run_cli(capsys, "train", tmp / "cfg.yaml", "--run", tmp / "run", *extra)


def test_train_with_overrides_and_json(project, capsys):
    tmp, _ = project
    code, out, err = train(capsys, tmp, "--set", "sharding.shards=3", "--set", "training.seed=5", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["generation"] == 1 and summary["shards_trained"] == 3
    assert summary["test_rows"] == 30 and 0.0 <= summary["test_accuracy"] <= 1.0
    frozen = (tmp / "run" / "config.yaml").read_text()
    assert "shards: 3" in frozen and "seed: 5" in frozen and "classes:\n  - a\n  - b\n  - c" in frozen


def test_train_plain_output(project, capsys):
    tmp, _ = project
    code, out, _ = train(capsys, tmp)
    assert code == 0
    assert out.startswith(f"trained 2 shard(s) into {tmp / 'run'} in ")
    assert "; ensemble test accuracy 0." in out


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_predict_writes_ids_predictions_and_probabilities(project, capsys, suffix):
    tmp, df = project
    assert train(capsys, tmp)[0] == 0
    out_file = tmp / f"preds{suffix}"
    code, out, err = run_cli(
        capsys, "predict", "--run", tmp / "run", "--data", tmp / "test.csv", "--out", out_file
    )
    assert code == 0, err
    assert out == f"wrote 30 predictions to {out_file}\n"
    preds = pd.read_parquet(out_file) if suffix == ".parquet" else pd.read_csv(out_file)
    assert list(preds.columns) == ["record_id", "prediction", "proba_a", "proba_b", "proba_c"]
    assert preds["record_id"].tolist() == df["record_id"].iloc[150:].tolist()
    assert set(preds["prediction"]) <= {"a", "b", "c"}
    probs = preds[["proba_a", "proba_b", "proba_c"]].to_numpy()
    assert (abs(probs.sum(axis=1) - 1) < 1e-5).all()
    assert (preds["prediction"] == pd.Series(["a", "b", "c"])[probs.argmax(axis=1)].to_numpy()).all()


def test_predict_without_id_column(project, capsys):
    tmp, df = project
    assert train(capsys, tmp)[0] == 0
    df.iloc[150:][["x0", "x1", "x2", "x3"]].to_parquet(tmp / "bare.parquet")
    code, _, err = run_cli(
        capsys, "predict", "--run", tmp / "run", "--data", tmp / "bare.parquet", "--out", tmp / "p.parquet"
    )
    assert code == 0, err
    preds = pd.read_parquet(tmp / "p.parquet")
    assert list(preds.columns) == [
        "row",
        "prediction",
        "proba_a",
        "proba_b",
        "proba_c",
    ]  # row numbers for IDs
    assert preds["row"].tolist() == list(range(30))


def test_delete_by_ids_and_file_with_json_receipt_and_status(project, capsys):
    tmp, df = project
    assert train(capsys, tmp)[0] == 0
    run = tmp / "run"
    code, out, err = run_cli(capsys, "delete", "--run", run, "user3@example.com", "--json")
    assert code == 0, err
    receipt = json.loads(out)
    assert receipt["status"] == "applied" and receipt["records_deleted"] == 1
    assert receipt["request_id"].startswith("del-") and receipt["generation"] == 3
    assert len(receipt["shards_retrained"]) == 1
    (tmp / "ids.txt").write_text("user4@example.com\n\nuser5@example.com\n")
    code, out, err = run_cli(capsys, "delete", "--run", run, "--ids-file", tmp / "ids.txt")
    assert code == 0, err
    assert "2 record(s)" in out and "del-" in out
    code, out, _ = run_cli(capsys, "delete", "--run", run, "user4@example.com")
    assert (code, out) == (0, "already deleted, nothing retrained: user4@example.com\n")
    code, out, _ = run_cli(capsys, "status", "--run", run, "--json")
    assert code == 0
    st = json.loads(out)
    assert (st["records_active"], st["records_deleted"], st["deletion_requests"]) == (147, 3, 2)
    assert (st["shards"], st["slices"], st["generation"]) == (2, 2, 5)
    assert sum(st["shard_records"]) == 147 and st["deletions_pending"] == 0
    assert 0.0 <= st["test_accuracy"] <= 1.0
    code, out, _ = run_cli(capsys, "status", "--run", run)
    assert code == 0 and "records active 147, deleted 3; deletion requests 2 (0 pending)" in out


def test_a_deletion_never_scores_status_scores_the_new_generation_lazily(project, capsys, monkeypatch):
    """Test-set evaluation is off a deletion's critical path: ``status`` scores the new generation once, keeps it
    in metrics.json tagged with the generation, and ``--no-accuracy`` switches it off."""
    import sisa.evaluation

    tmp, _ = project
    assert train(capsys, tmp)[0] == 0
    run = tmp / "run"
    calls = []
    real = sisa.evaluation.evaluate
    monkeypatch.setattr(sisa.evaluation, "evaluate", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr("sisa.refresh.evaluate", lambda *a: pytest.fail("a deletion scored the test table"))
    assert run_cli(capsys, "delete", "--run", run, "user3@example.com")[0] == 0
    assert not (run / "metrics.json").exists()
    code, out, _ = run_cli(capsys, "status", "--run", run, "--json", "--no-accuracy")
    st = json.loads(out)
    assert code == 0 and st["test_accuracy"] is None and calls == []
    for _ in range(2):  # scored once, then read back
        code, out, _ = run_cli(capsys, "status", "--run", run, "--json")
        st = json.loads(out)
        assert 0.0 <= st["test_accuracy"] <= 1.0 and st["test_accuracy_generation"] == 3  # rollback, catch-up
    assert calls == [1]
    kept = json.loads((run / "metrics.json").read_text())
    assert kept["generation"] == 3 and kept["test_accuracy"] == st["test_accuracy"]
    code, out, _ = run_cli(capsys, "status", "--run", run)
    assert f"ensemble test accuracy {st['test_accuracy']:.4f} (generation 3)" in out


def one_line_error(code: int, err: str, expected_code: int, message: str) -> None:
    assert code == expected_code
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err == f"sisa: error: {message}\n"


def test_unknown_id_fails_with_one_line(project, capsys):
    tmp, _ = project
    assert train(capsys, tmp)[0] == 0
    code, out, err = run_cli(capsys, "delete", "--run", tmp / "run", "user1@example.com", "ghost@example.com")
    one_line_error(code, err, 3, "unknown record IDs, nothing was changed: 'ghost@example.com'")
    assert out == ""


def test_bad_config_key_fails_with_one_line(project, capsys):
    tmp, _ = project
    code, _, err = train(capsys, tmp, "--set", "training.lrr=0.1", "--set", "sharding.shards=0")
    one_line_error(
        code,
        err,
        2,
        "invalid configuration (2 problems):; "
        "training.lrr: unknown key (known keys: epochs, batch_size, optimizer, lr, momentum, weight_decay, seed, "
        "device, deterministic, threads, executor, stack_size, stack_threads, memory_budget_mb, n_jobs, backend, scheduler, "
        "progress); sharding.shards: expected an integer >= 1, got 0",
    )
    assert not (tmp / "run").exists()


def test_missing_run_fails_with_one_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    msg = f"{missing} is not a sisa run (no config.yaml); create one with `sisa train`"
    for argv in (
        ["status", "--run", missing],
        ["delete", "--run", missing, "7"],
        ["predict", "--run", missing, "--data", tmp_path / "x.csv", "--out", tmp_path / "p.csv"],
    ):
        code, _, err = run_cli(capsys, *argv)
        one_line_error(code, err, 1, msg)


def test_missing_ids_file_and_bad_out_fail_with_one_line(project, capsys):
    tmp, _ = project
    assert train(capsys, tmp)[0] == 0
    code, _, err = run_cli(capsys, "delete", "--run", tmp / "run", "--ids-file", tmp / "none.txt")
    one_line_error(code, err, 1, f"cannot read ID file {str(tmp / 'none.txt')!r}: No such file or directory")
    data = ["--data", tmp / "test.csv"]
    code, _, err = run_cli(capsys, "predict", "--run", tmp / "run", *data, "--out", tmp / "p.txt")
    one_line_error(
        code, err, 1, f"predict --out: expected a .parquet or .csv file name, got {str(tmp / 'p.txt')!r}"
    )
    code, _, err = run_cli(capsys, "predict", "--run", tmp / "run", *data, "--out", tmp / "no" / "p.csv")
    one_line_error(code, err, 1, f"predict --out: folder {str(tmp / 'no')!r} does not exist")


def test_real_subprocess_end_to_end(project):
    """`python -m sisa.cli` as a user runs it: train, delete (JSON receipt), a failing delete."""
    tmp, _ = project
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def sisa(*argv):
        return subprocess.run(
            [sys.executable, "-m", "sisa.cli", *map(str, argv)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    run = tmp / "run"
    p = sisa("train", tmp / "cfg.yaml", "--run", run, "--set", "training.seed=1")
    assert p.returncode == 0, p.stderr
    p = sisa("delete", "--run", run, "user7@example.com", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["records_deleted"] == 1
    p = sisa("delete", "--run", run, "ghost@example.com")
    assert p.returncode == 3
    assert p.stderr == "sisa: error: unknown record IDs, nothing was changed: 'ghost@example.com'\n"
    st = json.loads(subprocess_free_status(run))
    assert (st["records_deleted"], st["records_active"]) == (1, 149)


def subprocess_free_status(run: Path) -> str:
    """status in-process (each extra subprocess costs ~4 s of torch start-up on this machine)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["status", "--run", str(run), "--json"]) == 0
    return buf.getvalue()


def test_resume_finishes_an_interrupted_training(project, capsys):
    import shutil

    from sisa.store.rundir import RunDir
    from tests.conftest import assert_runs_identical

    tmp, _ = project
    assert train(capsys, tmp)[0] == 0
    shutil.copytree(tmp / "run", tmp / "whole")
    run = RunDir(tmp / "run")
    last = run.manifest()["shards"][1]["checkpoints"][-1]
    shutil.rmtree(run.shard_checkpoints(1) / last)  # as if killed before shard 1's last slice was saved
    code, out, err = run_cli(capsys, "train", "--run", run.root, "--resume", "--json")
    assert code == 0, err
    assert json.loads(out)["shards_trained"] == 1
    assert_runs_identical(run, RunDir(tmp / "whole"))
    code, out, _ = run_cli(capsys, "train", "--run", run.root, "--resume", "--json")
    assert (code, json.loads(out)["shards_trained"]) == (0, 0)


def test_resume_errors(project, capsys):
    tmp, _ = project
    code, _, err = run_cli(capsys, "train", "--run", tmp / "none", "--resume")
    one_line_error(
        code, err, 1, f"{tmp / 'none'} is not a sisa run (no config.yaml); create one with `sisa train`"
    )
    code, _, err = run_cli(capsys, "train", tmp / "cfg.yaml", "--run", tmp / "none", "--resume")
    one_line_error(code, err, 1, "train --resume continues the run's frozen config; drop the config file")
    code, _, err = run_cli(capsys, "train", "--run", tmp / "none")
    one_line_error(code, err, 1, "train: give a config file (or --resume for an existing run)")
