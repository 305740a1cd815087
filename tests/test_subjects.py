"""Forget a person, not a row: subject placement, deletion by subject, balance, duplicates (issue 9)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sisa.cli.main import main
from sisa.estimator import run_status
from sisa.evidence.erasure import check_erasure
from sisa.exceptions import UnknownRecordError, UsageError
from sisa.tables.datasets import make_subjects, make_tabular
from sisa.unlearning import delete

from .conftest import assert_runs_identical, small_config, train_run

SUBJECT_CFG = {"data": {"subject_column": "subject_id"}}


@pytest.fixture
def people():
    """400 rows owned by 40 people, Zipf-like: person-00000 owns about 5 % of the rows."""
    return make_subjects(400, 40, seed=3, n_features=6)


def _all_bytes(root) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_all_rows_of_a_subject_share_shard_and_slice(tmp_path, people):
    run = train_run(tmp_path / "r", people, small_config(**SUBJECT_CFG))
    active = run.index().active
    per_subject = active.groupby("subject_id")[["shard", "slice"]].nunique()
    assert (per_subject == 1).all().all()
    # without the subject column the same person's rows spread over several shards
    plain = train_run(tmp_path / "p", people.drop(columns=["subject_id"]), small_config())
    rows = (
        plain.index()
        .active.drop(columns=["subject_id"])
        .merge(people[["record_id", "subject_id"]], on="record_id")
    )
    assert rows.groupby("subject_id")["shard"].nunique().max() > 1


def test_subject_column_is_never_a_feature(tmp_path, people):
    run = train_run(tmp_path / "r", people, small_config(**SUBJECT_CFG))
    assert "subject_id" not in run.config().data.features
    assert run.config().data.features == [f"x{j}" for j in range(6)]


@pytest.mark.parametrize("seed", [0, 1])
def test_subject_deletion_is_exact(tmp_path, people, seed):
    cfg = small_config(**SUBJECT_CFG, training={"seed": seed})
    run = train_run(tmp_path / "a", people, cfg)
    # the biggest subject: its rows would fall in several shards under record placement
    victims = ["person-00000", "person-00007"]
    receipt = delete(run.root, subject_ids=victims)
    counts = people["subject_id"].value_counts()
    assert receipt["subject_rows"] == {v: int(counts[v]) for v in victims}
    assert receipt["records_deleted"] == int(counts[victims].sum())
    scratch = train_run(tmp_path / "b", people[~people["subject_id"].isin(victims)], cfg)
    assert_runs_identical(run, scratch)
    x = people[[f"x{j}" for j in range(6)]]
    from sisa.estimator import SisaClassifier

    a = SisaClassifier.load(run.root).predict_proba(x)
    b = SisaClassifier.load(scratch.root).predict_proba(x)
    assert np.array_equal(a, b)


def test_forgetting_a_person_retrains_one_shard_from_one_slice(tmp_path, people):
    run = train_run(tmp_path / "r", people, small_config(**SUBJECT_CFG))
    receipt = delete(run.root, subject_ids=["person-00000"])
    assert len(receipt["shards_retrained"]) == 1


def test_unknown_subject_changes_nothing(tmp_path, people):
    run = train_run(tmp_path / "r", people, small_config(**SUBJECT_CFG))
    before = _all_bytes(run.root)
    with pytest.raises(UnknownRecordError, match="unknown subject IDs, nothing was changed: 'nobody'"):
        delete(run.root, subject_ids=["person-00001", "nobody"])
    assert _all_bytes(run.root) == before


def test_already_deleted_subject_is_answered_explicitly(tmp_path, people):
    run = train_run(tmp_path / "r", people, small_config(**SUBJECT_CFG))
    delete(run.root, subject_ids=["person-00003"])
    again = delete(run.root, subject_ids=["person-00003"])
    assert again["status"] == "already_deleted"
    assert again["already_deleted"] == ["subject:person-00003"]


def test_subject_ids_are_erased_from_disk(tmp_path, people):
    run = train_run(tmp_path / "r", people, small_config(**SUBJECT_CFG))
    victim = "person-00005"
    assert victim.encode() in _all_bytes(run.root)
    delete(run.root, subject_ids=[victim])
    assert victim.encode() not in _all_bytes(run.root)


def test_verify_erasure_checks_forgotten_subjects(tmp_path, people, capsys):
    run = train_run(tmp_path / "r", people, small_config(**SUBJECT_CFG))
    victim, kept = "person-00005", "person-00006"
    delete(run.root, subject_ids=[victim])
    report = check_erasure(run.root, subjects=[victim])
    assert report.ok, report.checks
    assert [c.name for c in report.checks][-2:] == ["subjects deleted", "subjects in files"]
    still = check_erasure(run.root, subjects=[victim, kept])  # a subject with active rows is reported
    assert not still.ok
    (failed,) = [c for c in still.checks if not c.ok and c.name == "subjects deleted"]
    assert failed.detail == f"not deleted: ['{kept}']"
    assert "found in" in next(c.detail for c in still.checks if c.name == "subjects in files")
    subjects_file = tmp_path / "subjects.txt"
    subjects_file.write_text(victim + "\n")
    argv = ["verify", "--erasure", "--run", str(run.root), "--subjects-file", str(subjects_file)]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "ok   subjects deleted: none of the 1 subject(s) has an active row" in out
    assert (
        "ok   subjects in files: no file holds any of the 1 ID(s) (1 searched as raw bytes, all as values)"
        in out
    )


def test_subject_erasure_check_needs_a_subject_column(tmp_path, tabular):
    run = train_run(tmp_path / "r", tabular, small_config())
    with pytest.raises(UsageError, match="^subjects: this run has no data.subject_column$"):
        check_erasure(run.root, subjects=["x"])


def test_delete_by_subject_needs_a_subject_column(tmp_path, tabular):
    run = train_run(tmp_path / "r", tabular, small_config())
    with pytest.raises(
        UsageError, match="^subject_ids: this run has no data.subject_column; delete by record ID$"
    ):
        delete(run.root, subject_ids=["x"])


def test_status_reports_imbalance_under_skew(tmp_path):
    df = make_subjects(4000, 300, seed=0, top_share=0.05)
    assert df["subject_id"].value_counts().iloc[0] / len(df) == pytest.approx(0.05, abs=0.01)
    run = train_run(tmp_path / "r", df, small_config(**SUBJECT_CFG, sharding={"shards": 8}))
    st = run_status(run.root)
    sizes = np.array(st["shard_records"])
    assert st["shard_imbalance"] == pytest.approx(sizes.max() / sizes.mean() - 1, abs=1e-3)
    assert st["subjects_active"] == df["subject_id"].nunique()
    assert st["shard_imbalance"] > 0.05  # one person's 200 rows sit in one shard of ~500


def test_cli_delete_by_subject_and_subjects_file(tmp_path, people, capsys):
    run = train_run(tmp_path / "r", people, small_config(**SUBJECT_CFG))
    ids_file = tmp_path / "subjects.txt"
    ids_file.write_text("person-00002\nperson-00004\n")
    assert (
        main(
            [
                "delete",
                "--run",
                str(run.root),
                "--subject",
                "person-00001",
                "--subjects-file",
                str(ids_file),
                "--json",
            ]
        )
        == 0
    )
    receipt = json.loads(capsys.readouterr().out)
    assert set(receipt["subject_rows"]) == {"person-00001", "person-00002", "person-00004"}
    left = set(run.index().active["subject_id"])
    assert not left & {"person-00001", "person-00002", "person-00004"}


def _with_copies(n_copies: int = 2) -> pd.DataFrame:
    """A table where record 5's features and label reappear under new e-mail IDs."""
    df = make_tabular(300, seed=4, n_features=5, id_kind="email")
    src = df.iloc[[5] * n_copies].copy()
    src["record_id"] = [f"copy{i}@example.com" for i in range(n_copies)]
    return pd.concat([df, src], ignore_index=True)


def test_check_duplicates_reports_copies_without_writing_them(tmp_path):
    df = _with_copies()
    run = train_run(tmp_path / "r", df, small_config())
    receipt = delete(run.root, ["user5@example.com"], duplicates="report")
    assert sorted(receipt["duplicates_found"]) == ["copy0@example.com", "copy1@example.com"]
    assert set(run.index().active["record_id"]) >= {"copy0@example.com", "copy1@example.com"}
    journal = b"".join(p.read_bytes() for p in run.journal_dir.rglob("*") if p.is_file())
    assert b"copy0@example.com" not in journal


def test_delete_duplicates_removes_them_in_the_same_request(tmp_path, capsys):
    df = _with_copies()
    run = train_run(tmp_path / "r", df, small_config())
    assert main(["delete", "--run", str(run.root), "user5@example.com", "--delete-duplicates"]) == 0
    out = capsys.readouterr().out
    assert "duplicates deleted: copy0@example.com, copy1@example.com" in out
    assert not set(run.index().active["record_id"]) & {
        "user5@example.com",
        "copy0@example.com",
        "copy1@example.com",
    }
    assert b"copy1@example.com" not in _all_bytes(run.root)
    scratch = train_run(
        tmp_path / "s", df.iloc[[i for i in range(len(df)) if i not in (5, 300, 301)]], small_config()
    )
    assert_runs_identical(run, scratch)


def test_no_duplicates_reported_as_empty(tmp_path, capsys):
    df = make_tabular(200, seed=2, n_features=4)
    run = train_run(tmp_path / "r", df, small_config())
    assert main(["delete", "--run", str(run.root), "7", "--check-duplicates"]) == 0
    assert "duplicates still active: none" in capsys.readouterr().out
