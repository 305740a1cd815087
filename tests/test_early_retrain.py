"""The catch-up starts early (docs/design.md §4): under ``unlearning.retrain: immediate`` a deletion trains the
affected shards on the purged slices while its rollback writes, and the result is the same run, bit for bit."""

from __future__ import annotations

import pytest

from sisa import refresh as refresh_module
from sisa.refresh import EarlyRetrain
from sisa.store.checkpoints import checkpoint_name
from sisa.store.garbage import collect_garbage, finish_erasure
from sisa.store.rundir import RunDir
from sisa.unlearning import delete
from tests.conftest import assert_runs_identical, small_config, train_run


def _spy(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """(shards asked, shards whose early results were taken) for every take()."""
    calls = []
    take = EarlyRetrain.take

    def spying(self, manifest, shards):
        out = take(self, manifest, shards)
        calls.append((list(shards), sorted(out[1])))
        return out

    monkeypatch.setattr(EarlyRetrain, "take", spying)
    return calls


def _ids_in(run: RunDir, shards: list[int], slice_: int = 1) -> list:
    a = run.index().active
    return [a.loc[(a["shard"] == s) & (a["slice"] == slice_), "record_id"].iloc[0] for s in shards]


@pytest.mark.parametrize("seed", [0, 3])
def test_early_catch_up_is_taken_and_bit_identical_to_training_without_the_records(
    tmp_path, tabular, monkeypatch, seed
):
    config = small_config(training={"seed": seed})
    run = train_run(tmp_path / "a", tabular, config)
    ids = _ids_in(run, [0, 2])
    calls = _spy(monkeypatch)
    receipt = delete(run.root, ids)
    assert calls == [([0, 2], [0, 2])]  # both shards' training came from the early start
    assert receipt["status"] == "applied"
    fresh = train_run(tmp_path / "b", tabular.loc[~tabular["record_id"].isin(ids)], config)
    assert_runs_identical(run, fresh)
    assert sorted(p.name for p in run.shard_checkpoints(0).iterdir()) == sorted(
        run.manifest()["shards"][0]["checkpoints"]
    )  # no stale folder, no leftover of the early training


def test_deferred_deletion_starts_no_early_training(tmp_path, tabular, monkeypatch):
    run = train_run(tmp_path / "a", tabular, small_config())
    started = []
    monkeypatch.setattr(EarlyRetrain, "start", lambda self, *a: started.append(a))
    delete(run.root, _ids_in(run, [1]), defer=True)
    assert started == []


def test_take_refuses_chains_the_rolled_back_manifest_does_not_confirm(tmp_path, tabular):
    run = train_run(tmp_path / "a", tabular, small_config())
    manifest = run.require_manifest()
    early = EarlyRetrain(run, [0, 1])
    early.start(manifest, {}, {0: set(), 1: set()})  # nothing changed: the chains equal the live ones
    other = {**manifest, "shards": [dict(e) for e in manifest["shards"]]}
    other["shards"][1]["digests"] = ["0" * 64] * len(other["shards"][1]["digests"])
    jobs, chains, results = early.take(other, [0, 1])
    assert sorted(chains) == [0]  # shard 1's digests differ: refresh must plan it again
    assert jobs == [] and results == []  # shard 0 was complete: nothing to train
    assert early.take(manifest, [0, 1]) == ([], {}, [])  # taken once


def test_a_failed_early_plan_leaves_the_deletion_to_the_normal_path(tmp_path, tabular, monkeypatch):
    run = train_run(tmp_path / "a", tabular, small_config())
    twin = train_run(tmp_path / "b", tabular, small_config())
    real = refresh_module.plan
    planned = []

    def failing(run_, config, shards, *a, **kw):
        planned.append(list(shards))
        if len(planned) == 1:
            raise OSError("disk hiccup")
        return real(run_, config, shards, *a, **kw)

    monkeypatch.setattr(refresh_module, "plan", failing)
    ids = _ids_in(run, [2])
    assert delete(run.root, ids)["status"] == "applied"
    assert planned == [[2], [2]]  # the early plan failed; refresh planned the shard itself
    monkeypatch.setattr(refresh_module, "plan", real)
    delete(twin.root, ids)
    assert_runs_identical(run, twin)


def test_garbage_with_only_removes_just_the_named_stale_folders(tmp_path, tabular):
    run = train_run(tmp_path / "a", tabular, small_config())
    manifest = run.require_manifest()
    folder = run.shard_checkpoints(0)
    live = manifest["shards"][0]["checkpoints"]
    stale, new = folder / "slice-002-stalestalestale00", folder / checkpoint_name(2, "f" * 64)
    tmp = folder / ".tmp-early-writing"
    for p in (stale, new, tmp):
        p.mkdir()
    collect_garbage(run, manifest, [0], only={0: {stale.name}})
    finish_erasure()
    assert sorted(p.name for p in folder.iterdir()) == sorted([*live, new.name, tmp.name])
    collect_garbage(run, manifest, [0])  # without ``only``: everything unnamed goes
    assert sorted(p.name for p in folder.iterdir()) == sorted(live)
