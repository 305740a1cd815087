"""Additions (issue 15, docs/design.md §4.1): "train without A, then add A" is bit-identical to "train on everything".

Also: only the shards that receive rows retrain, each once from its earliest receiving slice; validation reports every
problem and changes nothing; the resurrection guard refuses deleted IDs, subjects and row contents (naming rows by
position only) unless ``allow_returning``, which the receipt, journal and history record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sisa.cli import main as cli
from sisa.evidence.erasure import check_erasure
from sisa.evidence.history import deletion_log
from sisa.evidence.verification import verify
from sisa.exceptions import DataError, ReturningRecordError, UsageError
from sisa.intake import add
from sisa.store.journal import Journal
from sisa.store.rundir import RunDir
from sisa.tables.datasets import make_subjects, make_tabular
from sisa.unlearning import delete
from tests.conftest import assert_runs_identical, feature_matrix, small_config, train_run
from tests.test_exactness import assert_predictions_identical, file_hashes, live_names, rows_at, without

# ---- helpers ----------------------------------------------------------------------------------------------------


def placed(full: RunDir) -> pd.DataFrame:
    return full.index().active


def add_and_compare(tmp_path: Path, df: pd.DataFrame, cfg, choose) -> tuple[RunDir, dict, list]:
    """Train on everything (the reference), pick rows ``choose(reference)``, train without them, add them back,
    and check the result bit for bit (and that only the receiving shards retrained, from the right slice)."""
    full = train_run(tmp_path / "full", df, cfg)
    ids = choose(full)
    where = placed(full).set_index("record_id").loc[ids]
    expected = where.groupby("shard")["slice"].min().astype(int).to_dict()
    run = train_run(tmp_path / "run", without(df, ids), cfg)
    names_before, hashes_before = live_names(run), file_hashes(run.root)
    new = df.loc[df["record_id"].isin(ids)].sample(frac=1.0, random_state=3)  # batch order must not matter

    receipt = add(run.root, new)

    assert (
        receipt["status"] == "applied" and receipt["kind"] == "add" and receipt["records_added"] == len(ids)
    )
    assert receipt["shards_retrained"] == {str(s): k for s, k in sorted(expected.items())}
    assert receipt["slices_retrained"] == {
        str(s): list(range(k, cfg.sharding.slices)) for s, k in sorted(expected.items())
    }
    assert_runs_identical(run, full)
    assert_predictions_identical(run, full, feature_matrix(df))
    hashes_after = file_hashes(run.root)
    for s, names in names_before.items():  # untouched shards and earlier slices are kept byte for byte
        first = expected.get(s, cfg.sharding.slices)
        assert live_names(run)[s][:first] == names[:first]
        for rel, digest in hashes_before.items():
            if any(rel.startswith(f"checkpoints/shard-{s:03d}/{n}/") for n in names[:first]):
                assert hashes_after[rel] == digest, rel
            if rel.startswith(f"data/shard-{s:03d}/") and s not in expected:
                assert hashes_after[rel] == digest, rel
    assert not (run.root / "incoming").exists()
    return run, receipt, ids


def pick(shard: int, slice_: int, n: int = 1):
    return lambda r: rows_at(r, shard, slice_)[:n]


def pick_batch(r):
    return rows_at(r, 0, 2)[:2] + rows_at(r, 1, 1)[:1] + rows_at(r, 2, 0)[:3]


# ---- exactness --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, choose",
    [
        ("first slice", pick(0, 0)),
        ("middle slice", pick(1, 1, 2)),
        ("last slice", pick(2, 2)),
        ("batch", pick_batch),
    ],
)
@pytest.mark.parametrize("executor", ["loop", "stacked"])
def test_add_equals_training_on_everything(tmp_path, tabular, case, choose, executor):
    cfg = small_config(training={"executor": executor})
    run, receipt, ids = add_and_compare(tmp_path, tabular, cfg, choose)
    assert run.config().training.executor == executor
    if case == "batch":
        assert set(receipt["shards_retrained"]) == {"0", "1", "2"}
    else:
        assert len(receipt["shards_retrained"]) == 1
    # one retrain per receiving shard: samples match its rows over the retrained slice steps
    assert receipt["samples_retrained"] > 0


def test_cnn_add_is_exact(tmp_path):
    df = make_tabular(240, seed=6, n_features=64, n_classes=3, string_labels=True)
    cfg = small_config(
        sharding={"shards": 2, "slices": 3},
        model={"name": "cnn", "input_shape": [1, 8, 8], "options": {"channels": [4, 8]}},
        training={"epochs": 2, "seed": 3},
    )
    run, receipt, _ = add_and_compare(
        tmp_path, df, cfg, lambda r: rows_at(r, 0, 1)[:2] + rows_at(r, 1, 2)[:1]
    )
    assert receipt["shards_retrained"] == {"0": 1, "1": 2}
    assert run.config().model.name == "cnn"


def test_interleaved_adds_and_deletes_equal_one_training(tmp_path, tabular):
    """add A1, delete D, add A2, delete one of A1 (add then delete the same record): from scratch on what is left."""
    cfg = small_config()
    full = train_run(tmp_path / "full", tabular, cfg)
    a1 = rows_at(full, 0, 1)[:2] + rows_at(full, 2, 0)[:1]
    a2 = rows_at(full, 1, 2)[:2]
    d = rows_at(full, 1, 0)[:1] + rows_at(full, 2, 2)[:1]
    run = train_run(tmp_path / "run", without(tabular, a1 + a2), cfg)
    add(run.root, tabular.loc[tabular["record_id"].isin(a1)])
    delete(run.root, d)
    add(run.root, tabular.loc[tabular["record_id"].isin(a2)])
    r = delete(run.root, a1[:1])
    assert r["shards_retrained"] == {"0": 1}
    ref = train_run(tmp_path / "ref", without(tabular, d + a1[:1]).sample(frac=1.0, random_state=5), cfg)
    assert_runs_identical(run, ref)
    assert_predictions_identical(run, ref, feature_matrix(tabular))
    kinds = [e["kind"] for e in Journal(run.journal_dir).entries()]
    assert kinds == ["add", "delete", "add", "delete"]
    assert [c.ok and c.bit_identical for c in verify(run.root)] == [True] * 3
    assert check_erasure(run.root, [str(i) for i in d + a1[:1]], tabular).ok


def test_an_addition_into_a_rolled_back_shard_catches_it_up_exactly(tmp_path, tabular):
    """delete --defer rolls shard 1 back (its retrain waits); an addition into that shard retrains it once from the
    earlier of the two slices, and the deferred request is then settled as applied: from scratch on what is left."""
    cfg = small_config()
    full = train_run(tmp_path / "full", tabular, cfg)
    d, a = rows_at(full, 1, 2)[:1], rows_at(full, 1, 1)[:2]
    run = train_run(tmp_path / "run", without(tabular, a), cfg)
    forgot = delete(run.root, d, defer=True)
    assert forgot["status"] == "rolled_back"
    entry = next(e for e in run.manifest()["shards"] if e["shard"] == 1)
    assert entry["rolled_back"]["slice"] == 2 and len(entry["checkpoints"]) == 2
    receipt = add(run.root, tabular.loc[tabular["record_id"].isin(a)])
    assert receipt["shards_retrained"] == {"1": 1}
    assert "rolled_back" not in next(e for e in run.manifest()["shards"] if e["shard"] == 1)
    ref = train_run(tmp_path / "ref", without(tabular, d), cfg)
    assert_runs_identical(run, ref)
    assert_predictions_identical(run, ref, feature_matrix(tabular))
    assert cli.main(["status", "--run", str(run.root)]) == 0  # a reader settles the deferred request
    statuses = {e["kind"]: e["status"] for e in Journal(run.journal_dir).entries()}
    assert statuses == {"delete": "applied", "add": "applied"}
    assert [c.ok and c.bit_identical for c in verify(run.root)] == [True] * 3
    assert check_erasure(run.root, [str(i) for i in d], tabular).ok


def test_a_new_row_of_a_known_subject_joins_its_shard_and_slice(tmp_path):
    people = make_subjects(400, 40, seed=3, n_features=6)
    cfg = small_config(data={"subject_column": "subject_id"})
    full = train_run(tmp_path / "full", people, cfg)
    active = full.index().active
    person = active["subject_id"].value_counts().index[0]
    theirs = active.loc[active["subject_id"] == person]
    newcomer = active.loc[active["subject_id"] == active["subject_id"].value_counts().index[-1], "record_id"]
    ids = theirs["record_id"].tolist()[:1] + newcomer.tolist()
    run = train_run(tmp_path / "run", without(people, ids), cfg)
    receipt = add(run.root, people.loc[people["record_id"].isin(ids)])
    got = run.index().active.set_index("record_id").loc[theirs["record_id"].tolist()[0]]
    assert (got["shard"], got["slice"]) == (theirs["shard"].iloc[0], theirs["slice"].iloc[0])
    assert receipt["records_added"] == len(ids)
    assert_runs_identical(run, full)


def test_verify_and_cli_after_an_addition(tmp_path, tabular, capsys):
    cfg = small_config()
    new_ids = tabular["record_id"].iloc[[4, 40, 400]].tolist()
    run = train_run(tmp_path / "run", without(tabular, new_ids), cfg)
    data = tmp_path / "new.parquet"
    tabular.loc[tabular["record_id"].isin(new_ids)].to_parquet(data)
    assert cli.main(["add", "--run", str(run.root), "--data", str(data)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("addition receipt add-") and " 3 record(s) added, generation 2" in out[0]
    assert cli.main(["delete", "--run", str(run.root), str(new_ids[0])]) == 0
    capsys.readouterr()
    assert cli.main(["verify", "--run", str(run.root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("verified 3 shard(s)")
    assert cli.main(["history", "--run", str(run.root), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["records"], r["status"]) for r in rows] == [
        ("add", 3, "applied"),
        ("delete", 1, "applied"),
    ]
    assert rows[0]["returning_allowed"] is False and rows[1]["returning_allowed"] is None
    status = json.loads((cli.main(["status", "--run", str(run.root), "--json"]), capsys.readouterr().out)[1])
    assert status["records_active"] == len(tabular) - 1
    assert status["addition_requests"] == 1 and status["deletion_requests"] == 1
    assert cli.main(["status", "--run", str(run.root)]) == 0
    assert "deletion requests 1 (0 pending); addition requests 1 (0 pending)" in capsys.readouterr().out


# ---- validation: every problem at once, nothing changed -----------------------------------------------------------


@pytest.fixture
def trained(tmp_path, tabular):
    gone = [10, 11, 12]
    run = train_run(tmp_path / "run", without(tabular, gone), small_config())
    return run, tabular, gone


def test_every_problem_is_reported_and_nothing_changes(trained):
    run, df, gone = trained
    before = file_hashes(run.root)
    bad = df.loc[df["record_id"].isin([10, 11, 20])].copy()
    bad.loc[bad["record_id"] == 11, "record_id"] = 10  # a duplicate inside the batch
    bad.loc[bad["record_id"] == 20, "label"] = "z"  # a class the run never had (and 20 is active)
    bad["extra"] = 1.0
    with pytest.raises(DataError) as err:
        add(run.root, bad)
    assert err.value.problems == [
        "column 'record_id': duplicate record IDs (10) at rows 0, 1",
        "column 'label': labels ['z'] are not in the frozen class set ['a', 'b', 'c'] at rows 2 (the class list is "
        "frozen at training (every shard model has one output per class, and a class that only some shards saw "
        "would bias the vote), so a new class needs a new run: `sisa train`)",
        "columns ['extra'] are not among the run's features ['x0', 'x1', 'x2', 'x3', 'x4', 'x5']",
        "column 'record_id': record IDs already active in the run: 20",
    ]
    with pytest.raises(DataError, match=r"missing columns \['x5'\]"):
        add(run.root, df.loc[df["record_id"].isin(gone)].drop(columns=["x5"]))
    assert file_hashes(run.root) == before


def test_a_stratified_run_refuses_additions(tmp_path, tabular):
    run = train_run(tmp_path / "s", tabular.iloc[:300], small_config(sharding={"strategy": "stratified"}))
    with pytest.raises(UsageError) as err:
        add(run.root, tabular.iloc[300:302])
    assert err.value.problems[0][0] == "sharding.strategy"
    assert "cannot be placed the way training from scratch would place it" in str(err.value)


# ---- no resurrection --------------------------------------------------------------------------------------------


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_a_deleted_record_is_not_resurrected_by_id_or_by_content(trained):
    run, df, _ = trained
    victim = df.loc[df["record_id"] == 500]
    delete(run.root, [500])
    before = file_hashes(run.root)
    again = pd.concat([df.loc[df["record_id"] == 10], victim])  # row 1 is the forgotten one
    with pytest.raises(ReturningRecordError) as err:
        add(run.root, again)
    assert err.value.rows == {1: ["record ID", "content"]}
    assert str(err.value) == (
        "rows 1 (record ID, content) of the batch match records deleted from this run (by keyed hash; nothing was "
        "changed): re-adding them would resurrect a forgotten person; if they came back and consented again, add "
        "them with allow_returning=True (CLI: --allow-returning)"
    )
    assert "500" not in str(err.value)
    surrogate = victim.assign(record_id=9500)  # a stale export under a new surrogate ID: caught by content
    with pytest.raises(ReturningRecordError) as err:
        add(run.root, surrogate)
    assert err.value.rows == {0: ["content"]}
    assert file_hashes(run.root) == before
    assert b"9500" not in _all_bytes(run.root)  # the refused rows left no trace
    tomb = pd.read_feather(run.root / "tombstones.arrow")
    assert (
        sorted(tomb["kind"]) == ["content", "record"] and tomb["id_hash"].str.fullmatch("[0-9a-f]{64}").all()
    )


def test_allow_returning_admits_and_is_recorded(trained, capsys, tmp_path):
    run, df, _ = trained
    delete(run.root, [500])
    data = tmp_path / "back.csv"
    df.loc[df["record_id"] == 500].to_csv(data, index=False)
    assert cli.main(["add", "--run", str(run.root), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("sisa: error: rows 0 (record ID, content) of the batch") and "--allow-returning" in err
    )
    assert cli.main(["add", "--run", str(run.root), "--data", str(data), "--allow-returning"]) == 0
    assert "1 returning row(s) admitted (--allow-returning)" in capsys.readouterr().out
    entry = Journal(run.journal_dir).entries()[-1]
    assert entry["allow_returning"] is True and entry["receipt"]["returning_allowed"] is True
    assert entry["receipt"]["returning_rows"] == 1
    assert deletion_log(run.root)[-1]["returning_allowed"] is True
    assert 500 in set(run.index().active["record_id"])
    report = check_erasure(run.root)  # the readmitted ID is active again and no longer tombstoned
    assert report.ok, [c.detail for c in report.checks if not c.ok]
    assert_runs_identical(run, train_run(tmp_path / "ref", without(df, [10, 11, 12]), small_config()))


def test_a_deleted_subject_is_not_resurrected(tmp_path):
    people = make_subjects(300, 30, seed=4, n_features=6)
    cfg = small_config(data={"subject_column": "subject_id"})
    run = train_run(tmp_path / "run", people, cfg)
    gone = people.loc[people["subject_id"] == "person-00003"]
    delete(run.root, subject_ids=["person-00003"])
    fresh = gone.iloc[:1].assign(record_id=90000, x0=123.0)  # a new row, new ID, new content, same person
    with pytest.raises(ReturningRecordError) as err:
        add(run.root, fresh)
    assert err.value.rows == {0: ["subject ID"]}
    assert b"person-00003" not in _all_bytes(run.root)
    add(run.root, fresh, allow_returning=True)
    assert check_erasure(run.root).ok


def test_add_to_a_schema_run_encodes_rows_as_training_did(tmp_path):
    """Raw rows (text categories, gaps, slice-0 scaling) added to a schema run: the same bits as training on all."""
    from tests.test_exactness_schema import customers, user_config

    df = customers()
    cfg = user_config(tmp_path, seed=0)
    full = train_run(tmp_path / "full", df, cfg)
    ids = rows_at(full, 0, 0)[:1] + rows_at(full, 1, 2)[:2]
    run = train_run(tmp_path / "run", df.loc[~df["record_id"].isin(ids)], cfg)
    receipt = add(run.root, df.loc[df["record_id"].isin(ids)])
    assert receipt["shards_retrained"] == {"0": 0, "1": 2}
    assert_runs_identical(run, full)
    with pytest.raises(DataError, match="income"):
        add(run.root, df.iloc[:1].assign(record_id="new-1").drop(columns=["income"]))


def test_add_under_distribution_aware_placement_is_exact(tmp_path, tabular):
    from tests.test_distribution_aware import da_config, deletion_probabilities

    df = tabular.copy()
    df["p"] = deletion_probabilities(len(df), seed=3)
    cfg = da_config()
    run, receipt, ids = add_and_compare(
        tmp_path, df, cfg, lambda r: rows_at(r, 0, 3)[:2] + rows_at(r, 2, 1)[:1]
    )
    assert receipt["shards_retrained"] == {"0": 3, "2": 1}
    with pytest.raises(DataError, match="missing columns \\['p'\\]"):
        add(run.root, df.iloc[:1].assign(record_id=7777).drop(columns=["p"]))


def test_distribution_aware_subjects_keep_their_slice_or_are_refused(tmp_path):
    people = make_subjects(300, 30, seed=5, n_features=6)
    people["p"] = 0.01  # every row stable: each subject sits in its uniform slice
    cfg = small_config(
        data={"subject_column": "subject_id", "deletion_prob_column": "p"},
        sharding={"shards": 3, "slices": 4, "strategy": "distribution_aware"},
    )
    full = train_run(tmp_path / "full", people, cfg)
    active = full.index().active
    not_last = active.loc[active["slice"] < 3].drop_duplicates("subject_id").iloc[0]
    theirs = active.loc[active["subject_id"] == not_last["subject_id"], "record_id"].tolist()
    assert len(theirs) >= 2
    run = train_run(tmp_path / "run", without(people, theirs[:1]), cfg)
    new = people.loc[people["record_id"] == theirs[0]]
    with pytest.raises(DataError, match="would move that subject's trained rows to the last slice"):
        add(run.root, new.assign(p=0.9))
    receipt = add(run.root, new)
    assert receipt["shards_retrained"] == {str(not_last["shard"]): int(not_last["slice"])}
    assert_runs_identical(run, full)


def test_erasure_check_requires_the_tombstones_to_hold_keyed_hashes_only(trained):
    from sisa.evidence.erasure import _check_tombstones

    run, _, _ = trained
    delete(run.root, [500])
    index = run.index()
    ok = _check_tombstones(index, run.secret())
    assert ok.ok and ok.detail.startswith(
        "2 tombstone(s) (1 record, 0 subject, 1 content), keyed hashes only"
    )
    index.tombstones.loc[len(index.tombstones)] = ["user500@example.com", "record", "del-x"]
    index.tombstones.loc[len(index.tombstones)] = ["a" * 64, "row", "del-x"]
    bad = _check_tombstones(index, run.secret())
    assert not bad.ok
    assert (
        bad.detail == "1 tombstone(s) hold something other than a keyed hash; unknown tombstone kinds ['row']"
    )
