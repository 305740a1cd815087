"""The deletion's I/O off the critical path (issue 14): checkpoints fsynced on a background thread behind one
barrier (sisa.store.barrier), stale checkpoints renamed away and removed while the catch-up trains
(sisa.store.garbage), a one-shard stack trained by the loop's code (sisa.train.stacking)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sisa.store.barrier as barrier_mod
from sisa.refresh import plan, train_spec
from sisa.store import garbage
from sisa.store.checkpoints import load_checkpoint, read_meta, save_checkpoint
from sisa.store.files import temp_leftovers
from sisa.store.garbage import STALE_PREFIX, collect_garbage, finish_erasure
from sisa.tables.datasets import make_tabular
from sisa.train import stacking
from sisa.train.lockstep import GroupTrainer
from sisa.train.stacking import train_stacked
from sisa.unlearning import delete
from tests.conftest import small_config, train_run

REPO = Path(__file__).resolve().parents[1]
CFG = small_config(training={"executor": "stacked", "stack_threads": 1})


@pytest.fixture
def run(tmp_path):
    return train_run(tmp_path / "run", make_tabular(240, seed=3, n_features=5, n_classes=3), CFG)


def _syncs(monkeypatch) -> list:
    calls: list = []
    real = barrier_mod.sync_filesystem
    monkeypatch.setattr(barrier_mod, "sync_filesystem", lambda p: (calls.append(p), real(p)))
    return calls


def test_checkpoints_written_here_pass_the_barrier_without_a_filesystem_sync(tmp_path, monkeypatch):
    calls = _syncs(monkeypatch)
    folders = [tmp_path / "checkpoints" / "shard-000" / f"slice-00{k}-x" for k in range(3)]
    for f in folders:
        save_checkpoint(f, {"w": torch.ones(4)}, {"step": torch.tensor(1)}, {}, sync=False)
    barrier_mod.barrier(tmp_path / "checkpoints", folders)
    assert calls == []
    keys = {str(f) for f in folders}
    assert (
        not keys & barrier_mod._known.keys() and not keys & barrier_mod._outstanding.keys()
    )  # nothing left over
    for f in folders:
        load_checkpoint(f)


def test_folders_no_barrier_asks_for_are_forgotten_past_a_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(barrier_mod, "MAX_KNOWN", 3)
    calls = _syncs(monkeypatch)
    folders = [tmp_path / f"f{i}" for i in range(5)]
    for f in folders:
        f.mkdir()
        barrier_mod.flush_later(f)
    assert len(barrier_mod._known) == 3
    barrier_mod.barrier(tmp_path, folders[-3:])  # still known: no filesystem sync
    assert calls == []
    barrier_mod.barrier(tmp_path, folders[:1])  # forgotten: the whole filesystem is synced instead
    assert calls == [tmp_path]


def test_a_folder_this_process_did_not_write_falls_back_to_syncfs(tmp_path, monkeypatch):
    calls = _syncs(monkeypatch)
    other = tmp_path / "checkpoints" / "shard-000" / "slice-000-y"  # as a joblib worker process writes one
    other.mkdir(parents=True)
    barrier_mod.barrier(tmp_path / "checkpoints", [other])
    assert calls == [tmp_path / "checkpoints"]


def test_a_flush_that_fails_makes_the_barrier_sync_everything(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(barrier_mod.os, "sync", lambda: synced.append(True))
    gone = tmp_path / "checkpoints" / "shard-000" / "slice-000-z"
    gone.mkdir(parents=True)
    barrier_mod.flush_later(gone)
    barrier_mod.barrier(tmp_path / "checkpoints", [gone])  # flushed fine: no full sync
    assert synced == []
    gone.rmdir()
    barrier_mod.flush_later(gone)  # removed before its flush: listing it fails
    barrier_mod.barrier(tmp_path / "checkpoints", [gone])
    assert synced == [True]


def test_a_deletion_trains_behind_the_background_barrier_and_erases_before_it_returns(run, monkeypatch):
    calls = _syncs(monkeypatch)
    receipt = delete(run.root, [run.index().active["record_id"].iloc[0]])
    assert receipt["status"] == "applied" and receipt["shards_retrained"]
    assert calls == []  # every new checkpoint was written (and fsynced) by this process
    assert temp_leftovers(run.root) == []  # the renamed stale checkpoints are gone when it returns
    assert not garbage._pending


def test_background_collection_renames_first_and_finish_erasure_removes(run):
    manifest = run.require_manifest()
    shard = manifest["shards"][0]
    kept = {
        **manifest,
        "shards": [{**shard, "checkpoints": shard["checkpoints"][:1]}, *manifest["shards"][1:]],
    }
    folder = run.shard_checkpoints(0)
    collect_garbage(run, kept, [0], background=True)
    assert len(garbage._pending) == 1  # the removals were handed to a thread, not done here
    names = sorted(p.name for p in folder.iterdir())
    assert shard["checkpoints"][0] in names
    assert not any(n in names for n in shard["checkpoints"][1:])  # no stale one under its own name
    finish_erasure()
    assert sorted(p.name for p in folder.iterdir()) == [shard["checkpoints"][0]]
    assert not any(p.name.startswith(STALE_PREFIX) for p in folder.iterdir())


def test_an_error_on_the_removal_thread_is_raised_by_finish_erasure(run, monkeypatch):
    manifest = run.require_manifest()
    monkeypatch.setattr(garbage, "remove_tree", lambda p, sync=True: (_ for _ in ()).throw(OSError("disk")))
    keep_none = {**manifest, "shards": [{**e, "checkpoints": []} for e in manifest["shards"]]}
    collect_garbage(run, keep_none, [0], background=True)
    with pytest.raises(OSError, match="disk"):
        finish_erasure()


def test_a_one_shard_stack_trains_as_the_loop_and_says_stacked(run, monkeypatch):
    """The fast path for a one-shard retrain gives the bits of a width-1 GroupTrainer, recorded as stacked."""
    config = run.config()
    for entry in run.manifest()["shards"][:1]:
        for name in entry["checkpoints"][1:]:
            shutil.rmtree(run.shard_checkpoints(0) / name)
    jobs, data, _ = plan(run, config, [0])
    (job,) = jobs
    assert job.from_slice == 1
    spec = train_spec(run, config)
    with monkeypatch.context() as m:  # no stack is built for one shard
        m.setattr(stacking, "GroupTrainer", lambda *a, **k: pytest.fail("GroupTrainer for one shard"))
        fast = train_stacked(spec, [job], data)[0]
    fast_ck = {n: load_checkpoint(run.shard_checkpoints(0) / n) for n in fast.checkpoints}
    metas = [read_meta(run.shard_checkpoints(0) / n) for n in fast.checkpoints]
    assert {(m["executor"], m["stack_width"]) for m in metas} == {("stacked", 1)}
    for n in fast.checkpoints:
        shutil.rmtree(run.shard_checkpoints(0) / n)
    with barrier_mod.writes_drained():  # the checkpoints are written on the writer thread
        GroupTrainer(spec, [job], data, "exact").run()
    for n, ck in fast_ck.items():
        other = load_checkpoint(run.shard_checkpoints(0) / n)
        for part in ("model", "optimizer"):
            a, b = getattr(ck, part), getattr(other, part)
            assert a.keys() == b.keys()
            assert all(a[k].equal(b[k]) for k in a), (n, part)


def test_training_never_imports_torch_dynamo(tmp_path):
    """Sizing a stack on the meta device imported torch._dynamo and sympy (70 MB of peak RSS): not any more."""
    script = (
        "import sys\n"
        "from sisa.fitting import train\n"
        "from sisa.tables.datasets import make_tabular\n"
        "from tests.conftest import small_config\n"
        f"train({str(tmp_path / 'r')!r}, small_config(), make_tabular(120, seed=1, n_features=4, n_classes=3))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.split()[-1] == "False"
