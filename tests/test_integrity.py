"""Integrity: every checkpoint and data file is verified on load; a flipped byte or a torn file gives a clear
error naming it, never a silently wrong model; `sisa repair` rebuilds what the run can rebuild."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sisa.aggregation import Ensemble
from sisa.cli import main as cli
from sisa.estimator import SisaClassifier, run_status
from sisa.exceptions import IntegrityError, RunStateError, UnrepairableError
from sisa.repair import repair
from sisa.store.checkpoints import load_checkpoint
from sisa.store.files import atomic_write_json
from sisa.store.journal import Journal
from sisa.store.rundir import RunDir
from sisa.tables.datasets import make_tabular
from sisa.unlearning import delete
from tests.conftest import assert_runs_identical, small_config, train_run

CONFIG = small_config(sharding={"shards": 2, "slices": 3}, model={"hidden": [8]}, training={"epochs": 1})
X = np.zeros((3, 6), dtype=np.float32)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> RunDir:
    df = make_tabular(200, seed=1, n_features=6, n_classes=3, string_labels=True)
    return train_run(tmp_path_factory.mktemp("integrity") / "base", df, CONFIG)


@pytest.fixture
def run(base, tmp_path) -> RunDir:
    shutil.copytree(base.root, tmp_path / "r")
    return RunDir(tmp_path / "r")


def checkpoint(run: RunDir, shard: int, k: int) -> Path:
    entry = run.manifest()["shards"][shard]
    return run.shard_checkpoints(shard) / entry["checkpoints"][k]


def flip_byte(path: Path, offset: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def predict(run: RunDir):
    return SisaClassifier.load(run.root).predict(X)


@pytest.mark.parametrize("damage", [flip_byte, truncate])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_a_damaged_tensor_file_is_never_loaded(run, damage, name):
    path = checkpoint(run, 0, 2) / name
    damage(path)
    with pytest.raises(IntegrityError) as exc:
        load_checkpoint(path.parent)
    assert exc.value.path == str(path)
    assert str(exc.value) == (
        f"integrity check failed for {path}: checksum mismatch (file changed or truncated) "
        "(run `sisa repair` to rebuild it)"
    )
    if name == "model.safetensors":
        with pytest.raises(IntegrityError, match="checksum mismatch"):
            predict(run)


@pytest.mark.parametrize("name", ["meta.json", "COMPLETE"])
def test_a_checkpoint_with_a_damaged_or_missing_marker_is_incomplete(run, name):
    folder = checkpoint(run, 1, 2)
    truncate(folder / name) if name == "meta.json" else (folder / name).unlink()
    with pytest.raises(IntegrityError) as exc:
        Ensemble.from_manifest(run.root, run.config(), run.manifest())
    assert str(exc.value).startswith(
        f"integrity check failed for {folder}: checkpoint is incomplete (no valid COMPLETE marker)"
    )


def test_a_stale_checkpoint_under_a_live_name_is_rejected(run):
    """A checkpoint of other records copied under a live name: its fingerprint gives it away."""
    live, other = checkpoint(run, 0, 2), checkpoint(run, 1, 2)
    shutil.rmtree(live)
    shutil.copytree(other, live)
    with pytest.raises(IntegrityError, match=r"fingerprint does not match the records it should cover"):
        predict(run)


@pytest.mark.parametrize("rel", ["manifest.json", "index/shard-001.arrow", "tombstones.arrow"])
def test_a_torn_run_file_fails_status_with_its_name(run, rel, capsys):
    truncate(run.root / rel)
    with pytest.raises(IntegrityError) as exc:
        run_status(run.root)
    assert exc.value.path == str(run.root / rel)
    assert cli.main(["status", "--run", str(run.root)]) == 5
    assert f"sisa: error: integrity check failed for {run.root / rel}" in capsys.readouterr().err


@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_a_damaged_shard_data_file_is_never_trained_on(run, damage, capsys):
    path = run.slice_path(0, 1)
    damage(path)
    with pytest.raises(IntegrityError) as exc:
        run.shard_rows(0)
    assert exc.value.path == str(path)
    # a deletion in that shard is refused before it is acknowledged, even from another slice (the retrain reads
    # every slice): nothing journaled, nothing changed
    before = run.manifest()
    index = run.index().active
    (rid,) = index.loc[(index["shard"] == 0) & (index["slice"] == 2), "record_id"].head(1)
    with pytest.raises(IntegrityError, match=r"shard-000/slice-001\.arrow: checksum mismatch"):
        delete(run.root, [rid])
    assert Journal(run.journal_dir).entries() == [] and run.manifest() == before
    assert cli.main(["verify", "--run", str(run.root)]) == 5
    assert f"integrity check failed for {path}" in capsys.readouterr().err


def test_a_damaged_resume_checkpoint_refuses_the_deletion_before_acknowledging_it(run):
    index = run.index().active
    rid = index.loc[(index["shard"] == 1) & (index["slice"] == 2), "record_id"].iloc[0]
    flip_byte(checkpoint(run, 1, 1) / "optimizer.safetensors")  # the retrain would resume from slice 1
    with pytest.raises(IntegrityError, match=r"slice-001-.*optimizer\.safetensors: checksum mismatch"):
        delete(run.root, [rid])
    assert Journal(run.journal_dir).entries() == []


def test_repair_rebuilds_corrupted_and_missing_checkpoints_bit_identically(run, base, capsys):
    flip_byte(checkpoint(run, 0, 1) / "model.safetensors")
    shutil.rmtree(checkpoint(run, 1, 0))
    generation = run.manifest()["generation"]
    assert cli.main(["repair", "--run", str(run.root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rebuilt 2 checkpoint(s): checkpoints/shard-000/slice-001-")
    assert "retrained shard(s) {'0': 1, '1': 0}" in out
    assert_runs_identical(run, base)
    assert run.manifest() == base.manifest() and run.manifest()["generation"] == generation
    assert (predict(run) == predict(base)).all()
    assert repair(run.root)["checkpoints_rebuilt"] == []


def test_repair_of_one_shard_leaves_the_others_alone(run, base):
    flip_byte(checkpoint(run, 0, 2) / "model.safetensors")
    flip_byte(checkpoint(run, 1, 2) / "model.safetensors")
    report = repair(run.root, [1])
    assert report["shards_checked"] == [1] and report["shards_retrained"] == {"1": 2}
    with pytest.raises(IntegrityError, match="shard-000"):
        predict(run)
    repair(run.root, [0])
    assert_runs_identical(run, base)


def test_repair_cannot_rebuild_shard_data_and_says_so(run, capsys):
    path = run.slice_path(1, 0)
    flip_byte(path)
    with pytest.raises(UnrepairableError) as exc:
        repair(run.root)
    assert str(exc.value) == (
        f"{path}: checksum mismatch (file changed or truncated); it cannot be rebuilt from the run alone: "
        "restore it from a backup, or train a new run from the original data with `sisa train`"
    )
    assert cli.main(["repair", "--run", str(run.root)]) == 5
    assert "cannot be rebuilt from the run alone" in capsys.readouterr().err


def test_repair_finishes_a_deletion_interrupted_by_a_corrupted_checkpoint(run, base, tmp_path):
    """Damage that appears after the acknowledgement stops the catch-up retrain: the request is rolled back and
    erased already (the damaged checkpoint is one it resumes from); repair completes it."""
    reference = tmp_path / "ref"
    shutil.copytree(base.root, reference)
    delete(reference, [3, 17])

    def damage(entry):
        flip_byte(checkpoint(run, 1, 1) / "model.safetensors")  # shard 1 resumes from slice 1

    with pytest.raises(IntegrityError, match=r"shard-001/slice-001-.*model\.safetensors"):
        delete(run.root, [3, 17], on_ack=damage)
    assert [e["status"] for e in Journal(run.journal_dir).entries()] == ["rolled_back"]
    report = repair(run.root)
    assert len(report["deletions_replayed"]) == 1 and report["checkpoints_rebuilt"]
    assert [e["status"] for e in Journal(run.journal_dir).entries()] == ["applied"]
    assert_runs_identical(run, RunDir(reference))


def test_recovery_never_trains_on_a_data_file_damaged_after_the_acknowledgement(run, capsys):
    """The deletion is cut short right after its acknowledgement (as by kill -9) and a slice file is damaged:
    the replay rolls back and erases (that needs only the affected slice), then reads the shard from disk to catch
    up and refuses it; nothing is trained, the request stays rolled back."""
    index = run.index().active
    rid = index.loc[(index["shard"] == 0) & (index["slice"] == 2), "record_id"].iloc[0]
    before = run.manifest()

    def crash(entry):
        flip_byte(run.slice_path(0, 1))
        raise KeyboardInterrupt  # the process ends here

    with pytest.raises(KeyboardInterrupt):
        delete(run.root, [rid], on_ack=crash)
    assert cli.main(["status", "--run", str(run.root)]) == 5  # recovery refuses
    assert f"integrity check failed for {run.slice_path(0, 1)}" in capsys.readouterr().err
    # the rollback needs no damaged file (slice 1 is unchanged): the request is erased, nothing was trained
    assert [e["status"] for e in Journal(run.journal_dir).entries()] == ["rolled_back"]
    after = {e["shard"]: e for e in run.manifest()["shards"]}
    assert (
        after[0]["rolled_back"]["slice"] == 2
        and after[0]["checkpoints"] == before["shards"][0]["checkpoints"][:2]
    )
    assert after[1] == before["shards"][1]


def test_a_file_damaged_during_a_deletion_is_not_trained_on_and_is_reported(run, capsys):
    """Damage after the files were verified: the retrain uses the bytes it verified, and the next reader
    finds the damaged file."""
    index = run.index().active
    rid = index.loc[(index["shard"] == 0) & (index["slice"] == 2), "record_id"].iloc[0]
    receipt = delete(run.root, [rid], on_ack=lambda entry: flip_byte(run.slice_path(0, 1)))
    assert receipt["status"] == "applied"
    assert cli.main(["verify", "--run", str(run.root)]) == 5
    assert f"integrity check failed for {run.slice_path(0, 1)}" in capsys.readouterr().err


def test_a_run_of_the_old_format_is_refused_with_what_to_do(run):
    manifest = run.manifest()
    atomic_write_json(run.manifest_path, {**manifest, "format": "sisa-manifest/1"})
    with pytest.raises(RunStateError) as err:
        run.manifest()
    assert "format 'sisa-manifest/1': one data file per shard" in str(err.value)
    assert "train it again from its original data with `sisa train`" in str(err.value)
