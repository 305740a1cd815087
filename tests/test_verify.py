"""`sisa verify`: retrain-from-scratch certificates, and `sisa verify --erasure`: nothing of a deleted record
survives in the run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sisa.cli import main as cli
from sisa.evidence.erasure import check_erasure
from sisa.evidence.verification import verify
from sisa.exceptions import IncompatibleCheckpointError, UsageError
from sisa.store.checkpoints import read_meta
from sisa.store.files import atomic_write_json, sha256_bytes, sha256_file
from sisa.store.index import keyed_id_hashes
from sisa.store.rundir import RunDir
from sisa.tables.datasets import make_tabular
from sisa.unlearning import delete
from tests.conftest import small_config, train_run

CONFIG = small_config(sharding={"shards": 2, "slices": 3}, model={"hidden": [8]}, training={"epochs": 1})


@pytest.fixture(scope="module")
def deleted(tmp_path_factory):
    """A run with e-mail IDs after two deletion requests; the original table; the deleted IDs."""
    root = tmp_path_factory.mktemp("verify")
    df = make_tabular(200, seed=3, n_features=6, n_classes=3, id_kind="email")
    run = train_run(root / "base", df, CONFIG)
    gone = list(df["record_id"].iloc[[4, 40, 90]])
    delete(run.root, gone[:2])
    delete(run.root, gone[2:])
    df.to_parquet(root / "original.parquet")
    return run, df, gone, root / "original.parquet"


@pytest.fixture
def run(deleted, tmp_path) -> RunDir:
    shutil.copytree(deleted[0].root, tmp_path / "r")
    return RunDir(tmp_path / "r")


def resign(folder: Path, **meta_changes) -> None:
    """Rewrite a checkpoint's meta (and checksums) so that it passes integrity checks: a forged checkpoint."""
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = {n: sha256_file(folder / n) for n in meta["files"]}
    meta.update(meta_changes)
    data = (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()
    (folder / "meta.json").write_bytes(data)
    (folder / "COMPLETE").write_bytes(sha256_bytes(data).encode())


def last_checkpoint(run: RunDir, shard: int) -> Path:
    return run.shard_checkpoints(shard) / run.manifest()["shards"][shard]["checkpoints"][-1]


def test_verify_certifies_every_shard_after_deletions(deleted, capsys):
    run = deleted[0]
    certs = verify(run.root)
    manifest = run.manifest()
    assert [c.shard for c in certs] == [0, 1]
    for c, entry in zip(certs, manifest["shards"], strict=True):
        assert c.ok and c.bit_identical and c.max_abs_diff == 0.0 and c.differing == []
        assert c.fingerprint == c.recomputed_fingerprint == entry["fingerprint"]
        assert c.records == entry["records"] and c.checkpoints_compared == 3
    assert cli.main(["verify", "--run", str(run.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"shard 0: {certs[0].records} records, fingerprint {certs[0].fingerprint[:12]}, 3 checkpoints, "
        f"bit-identical yes ({lines[0].rsplit('(', 1)[1]}"
    )
    assert (
        lines[-1] == "verified 2 shard(s): every live checkpoint is bit-identical to a retrain from scratch"
    )
    assert cli.main(["verify", "--run", str(run.root), "--shard", "1", "--json"]) == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert only["shard"] == 1 and only["ok"] is True


def test_verify_detects_a_model_not_trained_on_exactly_the_stored_data(run, capsys):
    folder = last_checkpoint(run, 1)
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3  # e.g. a model that also saw a deleted record
    save_file(weights, folder / "model.safetensors")
    resign(folder)  # passes every checksum: only the retrain can tell
    certs = verify(run.root)
    assert certs[0].ok and not certs[1].ok
    assert certs[1].differing == [f"{folder.name}/model:{name}"]
    assert certs[1].max_abs_diff == pytest.approx(1e-3, rel=1e-2)
    assert cli.main(["verify", "--run", str(run.root)]) == 1
    out, err = capsys.readouterr()
    assert "shard 1:" in out and "bit-identical NO (max abs diff 0.001, 1 tensors)" in out
    assert err == "sisa: error: verify: shard(s) 1 differ from a retrain from scratch\n"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"torch": "1.0.0"}, "torch '1.0.0' (this process: '{torch}')"),
        ({"device": "NVIDIA H100 80GB HBM3"}, "device 'NVIDIA H100 80GB HBM3' (this process: 'cpu')"),
    ],
)
def test_verify_refuses_checkpoints_from_another_environment(run, change, message, capsys):
    resign(last_checkpoint(run, 0), **change)
    expected = message.format(torch=torch.__version__)
    with pytest.raises(IncompatibleCheckpointError) as exc:
        verify(run.root)
    assert str(exc.value) == (
        f"cannot compare checkpoints bit for bit: live checkpoints were made with {expected}. "
        "Run `sisa verify` where the run was trained"
    )
    assert cli.main(["verify", "--run", str(run.root)]) == 1
    assert capsys.readouterr().err.startswith("sisa: error: cannot compare checkpoints bit for bit")


def test_verify_refuses_checkpoints_from_another_executor(run):
    folder = last_checkpoint(run, 1)
    live = read_meta(folder)["executor"]
    other = "loop" if live == "stacked" else "stacked"
    resign(folder, executor=other)
    with pytest.raises(IncompatibleCheckpointError) as exc:
        verify(run.root)
    assert str(exc.value) == (
        f"cannot compare checkpoints bit for bit: live checkpoints were made with executor {other!r} "
        f"(retrain: {live!r})"
    )


def test_verify_rejects_shards_the_run_does_not_have(run, capsys):
    with pytest.raises(UsageError) as exc:
        verify(run.root, [1, 2, 7])
    assert exc.value.problems == [
        ("shards", "2 is not a shard of this run (it has 0..1)"),
        ("shards", "7 is not a shard of this run (it has 0..1)"),
    ]
    assert cli.main(["verify", "--run", str(run.root), "--shard", "5"]) == 2
    assert (
        capsys.readouterr().err.strip() == "sisa: error: --shard: 5 is not a shard of this run (it has 0..1)"
    )


# ---- erasure ----------------------------------------------------------------------------------------------------
def test_no_file_holds_a_deleted_id_or_its_feature_row(deleted):
    """The issue's erasure proof, checked directly on the bytes of every file (IDs are long e-mail strings)."""
    run, df, gone, _ = deleted
    features = df.set_index("record_id").loc[gone, [f"x{i}" for i in range(6)]].to_numpy(np.float32)
    blobs = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    for rid, row in zip(gone, features, strict=True):
        assert not [p for p, b in blobs.items() if rid.encode() in b]
        assert not [p for p, b in blobs.items() if row.tobytes() in b]
    for s in range(2):  # decoded rows too: an encoding could hide them from a byte search
        stored = run.shard_rows(s)
        assert not stored.ids.isin(gone).any()
        rows = {r.tobytes() for r in stored.features}
        assert not rows & {r.tobytes() for r in features}


def test_erasure_check_passes_after_deletion(deleted, capsys):
    run, df, gone, original = deleted
    report = check_erasure(run.root, gone, df)
    assert report.ok and report.ids_checked == 3
    names = [c.name for c in report.checks]
    assert names == [
        "journal",
        "tombstones",
        "leftovers",
        "data files",
        "checkpoints",
        "ids deleted",
        "ids in files",
        "feature rows",
    ]
    ids_file = original.with_name("ids.txt")
    ids_file.write_text("\n".join(gone) + "\n")
    argv = [
        "verify",
        "--erasure",
        "--run",
        str(run.root),
        "--ids-file",
        str(ids_file),
        "--data",
        str(original),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "ok   feature rows: none of 3 deleted feature row(s) found"
    assert (
        "ok   ids in files: no file holds any of the 3 ID(s) (3 searched as raw bytes, all as values)" in out
    )
    # with only the original table, the IDs to check are the rows the run has tombstoned
    assert check_erasure(run.root, data=original).ids_checked == 3


def test_erasure_check_without_ids_checks_the_run_itself(run):
    report = check_erasure(run.root)
    assert report.ok and [c.name for c in report.checks][-1] == "checkpoints"
    stray = run.shard_checkpoints(0) / "slice-000-0123456789abcdef"
    shutil.copytree(last_checkpoint(run, 0), stray)  # e.g. a checkpoint trained on a deleted record
    leftover = run.root / "data" / "shard-000" / ".tmp-slice-000.arrow.999"
    leftover.write_bytes(b"half")
    report = check_erasure(run.root)
    assert not leftover.exists()  # opening the run cleared the leftover of an interrupted write
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert failed == {
        "checkpoints": "unreferenced checkpoint checkpoints/shard-000/slice-000-0123456789abcdef"
    }


def test_erasure_check_finds_ids_and_rows_that_survive(run, deleted, capsys):
    _, df, gone, original = deleted
    alive = df["record_id"].iloc[5]
    (run.root / "notes.log").write_text(f"deleted {gone[0]}\n")  # a log that kept an ID
    row = df.loc[df["record_id"] == gone[1], [f"x{i}" for i in range(6)]].to_numpy(np.float32)
    (run.root / "cache.bin").write_bytes(b"\0" * 7 + row.tobytes())  # a cache that kept a feature row
    report = check_erasure(run.root, [*gone, alive], df)
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert failed["ids deleted"] == f"not deleted: [{alive!r}]"
    assert failed["ids in files"].startswith("found in [")
    where = run.index().active.set_index("record_id").loc[alive]  # the live record's own row
    shard, k = int(where["shard"]), int(where["slice"])
    assert "'notes.log (raw bytes)'" in failed["ids in files"]
    assert f"index/shard-{shard:03d}.arrow" in failed["ids in files"]
    assert failed["feature rows"] == (
        f"found in ['data/shard-{shard:03d}/slice-{k:03d}.arrow (row of {alive})', 'cache.bin (raw float32 bytes)']"
    )
    ids_file = run.root.parent / "ids.txt"
    ids_file.write_text(gone[0] + "\n")
    assert cli.main(["verify", "--erasure", "--run", str(run.root), "--ids-file", str(ids_file)]) == 1
    assert capsys.readouterr().err == "sisa: error: verify --erasure: failed checks: ids in files\n"


def test_erasure_check_flags_a_tombstoned_id_that_is_still_active(run):
    """E.g. an index write lost after its tombstone: the record would look deleted but still be trained on."""
    index = run.index()
    active_hash = keyed_id_hashes([index.active["record_id"].iloc[0]], run.secret())[0]
    index.tombstones.loc[len(index.tombstones)] = [active_hash, "record", "del-forged"]
    manifest = run.manifest()
    manifest["files"].update(run.write_files(index.to_bytes(range(run.config().sharding.shards))))
    atomic_write_json(run.manifest_path, manifest)
    report = check_erasure(run.root)
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert failed == {"tombstones": "1 tombstoned ID(s) are still active in the index"}


def test_verify_leaves_the_live_checkpoints_alone_and_cleans_its_scratch(run, tmp_path):
    before = {p: p.read_bytes() for p in run.checkpoint_root.rglob("*") if p.is_file()}
    (tmp_path / "w").mkdir()
    assert all(c.ok for c in verify(run.root, workdir=str(tmp_path / "w")))
    assert {p: p.read_bytes() for p in run.checkpoint_root.rglob("*") if p.is_file()} == before
    assert list((tmp_path / "w").iterdir()) == []
