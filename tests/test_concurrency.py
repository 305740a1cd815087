"""One writer at a time (the flock on run/lock), `--wait`, and readers that always see one whole generation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sisa.aggregation import Ensemble
from sisa.cli import main as cli
from sisa.store.journal import Journal
from sisa.store.rundir import RunDir
from sisa.tables.datasets import make_tabular
from sisa.unlearning import delete, retrain
from tests.conftest import assert_runs_identical, small_config, train_run

REPO = Path(__file__).resolve().parents[1]
CONFIG = small_config(sharding={"shards": 2, "slices": 3}, model={"hidden": [8]}, training={"epochs": 1})
HOLDER = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], "lock"), os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    df = make_tabular(200, seed=1, n_features=6, n_classes=3, string_labels=True)
    base = train_run(root / "base", df, CONFIG)
    both = root / "both"
    shutil.copytree(base.root, both)
    delete(both, [3, 17, 5])
    return base, RunDir(both), root


@pytest.fixture
def run(runs, tmp_path) -> RunDir:
    shutil.copytree(runs[0].root, tmp_path / "r")
    return RunDir(tmp_path / "r")


def hold_lock(run: RunDir, seconds: float) -> subprocess.Popen:
    """Another process holding the run's writer lock (as a running train/delete/repair does)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run.root), str(seconds)], stdout=subprocess.PIPE
    )
    assert proc.stdout.readline() == b"locked\n"
    return proc


def sisa(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "sisa.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def locked_message(run: RunDir, what: str) -> str:
    return (
        f"sisa: error: run {run.root} is locked by another sisa process (a train, delete or repair is in "
        f"progress); {what} was not started. Wait for it to finish, or pass --wait SECONDS\n"
    )


def test_a_second_writer_fails_with_exit_code_4_and_changes_nothing(run, runs, capsys, tmp_path):
    holder = hold_lock(run, 60)
    try:
        proc = sisa("delete", "--run", str(run.root), "3")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 4 and err.decode() == locked_message(run, "delete")
        assert cli.main(["repair", "--run", str(run.root)]) == 4
        assert capsys.readouterr().err == locked_message(run, "repair")
        assert cli.main(["train", "--resume", "--run", str(run.root)]) == 4
        assert capsys.readouterr().err == locked_message(run, "train --resume")
        fresh = RunDir(tmp_path / "fresh")
        fresh.root.mkdir()
        holder2 = hold_lock(fresh, 60)
        try:
            make_tabular(50, seed=1, n_features=6, n_classes=3).to_csv(tmp_path / "t.csv", index=False)
            config = tmp_path / "c.yaml"
            config.write_text(small_config(data={"train": str(tmp_path / "t.csv")}).to_yaml())
            assert cli.main(["train", str(config), "--run", str(fresh.root)]) == 4
            assert capsys.readouterr().err == locked_message(fresh, "train")
        finally:
            holder2.kill()
            holder2.wait()
    finally:
        holder.kill()
        holder.wait()
    assert Journal(run.journal_dir).entries() == []
    assert_runs_identical(run, runs[0])
    assert run.manifest() == runs[0].manifest()


def test_wait_lets_a_second_writer_run_after_the_first(run):
    holder = hold_lock(run, 1.5)
    proc = sisa("delete", "--run", str(run.root), "--wait", "60", "3")
    out, err = proc.communicate(timeout=120)
    holder.wait()
    assert proc.returncode == 0, err.decode()
    assert [e["status"] for e in Journal(run.journal_dir).entries()] == ["applied"]


def test_two_concurrent_deletions_both_apply_and_equal_one_combined_deletion(run, runs):
    """Two real `sisa delete --wait` processes race for the lock; the loser waits, then applies its request.
    The end state is exactly the run with both sets deleted (the order does not matter: exact unlearning)."""
    first = sisa("delete", "--run", str(run.root), "--wait", "120", "3", "17")
    second = sisa("delete", "--run", str(run.root), "--wait", "120", "5")
    for proc in (first, second):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()
    entries = Journal(run.journal_dir).entries()
    assert [e["status"] for e in entries] == ["applied", "applied"]
    assert sorted(e["records"] for e in entries) == [1, 2]
    assert_runs_identical(run, runs[1])
    assert (
        run.manifest()["generation"] == runs[0].manifest()["generation"] + 4
    )  # two requests: a rollback and a catch-up generation each
    m, ref = run.manifest(), runs[1].manifest()
    assert m["shards"] == ref["shards"]


def test_readers_always_see_one_whole_generation(run, runs):
    """While a writer process applies two deletions, a reader loads the live ensemble in a loop. Every load
    must equal one whole generation: its predictions match that generation's, shard for shard."""
    X = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    config = run.config()
    expected = {}
    # each request: its rollback generation, then its catch-up generation
    steps = [lambda r: delete(r, [3, 17], defer=True), retrain, lambda r: delete(r, [5], defer=True), retrain]
    stages = [runs[0].root]
    for k, step in enumerate(steps):
        stages.append(run.root.parent / f"g{k + 2}")
        shutil.copytree(stages[-2], stages[-1])
        step(stages[-1])
    for root in stages:
        m = RunDir(root).manifest()
        expected[m["generation"]] = Ensemble.from_manifest(root, config, m).shard_probabilities(X, "loop")
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            ens = run.read_generation(lambda m: Ensemble.from_manifest(run.root, config, m))
            seen.append((ens.generation, ens.shard_probabilities(X, "loop")))
            stop.wait(0.005)  # leave the CPU to the writer now and then

    thread = threading.Thread(target=reader)
    thread.start()
    try:  # one writer process, two requests (one interpreter start-up)
        code = (
            f"from sisa.cli.main import main; main(['delete', '--run', {str(run.root)!r}, '3', '17']); "
            + (f"main(['delete', '--run', {str(run.root)!r}, '5'])")
        )
        writer = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
        )
        assert writer.returncode == 0, writer.stderr.decode()
    finally:
        stop.set()
        thread.join(timeout=60)
    generations = [g for g, _ in seen]
    assert generations == sorted(generations) and set(generations) <= set(expected)
    assert generations[0] == min(expected) and generations[-1] == max(expected)
    for g, probs in seen:
        assert probs.equal(expected[g]), f"generation {g} loaded with shards of another generation"
