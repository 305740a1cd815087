"""Membership-inference audit: statistics, attacks on an overfit model, and the audit of SISA deletions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sisa.aggregation import Ensemble
from sisa.cli.main import main
from sisa.config import Config
from sisa.evidence.attacks import Group, compare_groups, lira_scores, logit_confidence
from sisa.evidence.audit import former_shards, load_rows, run_audit
from sisa.evidence.roc import delong, evaluate_attack, roc_curve, tpr_at_fpr
from sisa.exceptions import DataError, RunStateError, UsageError
from sisa.fitting import train
from sisa.store.files import writer_lock
from sisa.store.journal import Journal
from sisa.unlearning import delete
from tests.conftest import small_config, train_run


# ---- statistics ---------------------------------------------------------------------------------------------
def brute_force_auc_and_se(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """DeLong from its definition: psi matrix of pairwise wins (ties 1/2), O(m n)."""
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(1), psi.mean(0)
    se = np.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    return float(psi.mean()), float(se)


def test_delong_matches_its_definition_with_ties():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 8, 57).astype(float)  # many ties
    neg = rng.integers(-2, 6, 41).astype(float)
    auc, se = delong(pos, neg)
    ref_auc, ref_se = brute_force_auc_and_se(pos, neg)
    assert auc == pytest.approx(ref_auc, abs=1e-12)
    assert se == pytest.approx(ref_se, abs=1e-12)


def test_delong_needs_two_of_each():
    with pytest.raises(DataError, match=r"^audit: need at least 2 positives and 2 negatives, got 1 and 3$"):
        delong(np.array([1.0]), np.array([0.0, 1.0, 2.0]))


def test_tpr_at_fpr_and_roc_curve_by_hand():
    pos = np.array([9.0, 8.0, 7.0, 3.0])
    neg = np.array([8.5, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    assert tpr_at_fpr(pos, neg, 0.0) == 0.25  # above 8.5: only 9
    assert tpr_at_fpr(pos, neg, 0.1) == 1.0  # one negative allowed above: threshold 2.0
    assert tpr_at_fpr(pos, neg, 0.05) == 0.25  # floor(0.5) = 0 negatives allowed
    fpr, tpr = roc_curve(pos, neg)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(delong(pos, neg)[0])


def test_evaluate_attack_reports_chance_on_identical_distributions():
    rng = np.random.default_rng(1)
    r = evaluate_attack(rng.normal(size=400), rng.normal(size=400), bootstrap=50, seed=0)
    assert r.auc_ci[0] < 0.5 < r.auc_ci[1] and r.verdict() == "chance"
    d = r.to_dict()
    assert {"auc", "auc_ci", "tpr_at_0.01_fpr", "tpr_at_0.001_fpr", "tpr_at_0.01_fpr_ci"} <= set(d)
    shifted = evaluate_attack(rng.normal(1.0, 1.0, 400), rng.normal(size=400), bootstrap=0)
    assert shifted.to_dict()["tpr_at_0.01_fpr_ci"] == [None, None]  # no bootstrap: no interval, valid JSON
    assert shifted.verdict() == "above chance"
    assert evaluate_attack(-rng.normal(1.0, 1.0, 400), rng.normal(size=400), 0).verdict() == "below chance"


def test_logit_confidence_is_finite_for_saturated_models():
    logits = np.array([[200.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    phi = logit_confidence(logp, np.array([0, 1]))
    assert np.isfinite(phi).all()
    assert phi[0] == pytest.approx(200.0 - np.log(2.0))
    assert phi[1] == pytest.approx(np.log(1 / 3) - np.log(2 / 3))


def test_lira_scores_the_target_against_the_other_models():
    rng = np.random.default_rng(2)
    phi = rng.normal(size=(4, 6))
    target = np.array([0, 1, 2, 3, 0, 1])
    phi[target[:3], np.arange(3)] += 10.0  # records 0-2 look memorised by their target model
    z = lira_scores(phi, target)
    assert (z[:3] > 3).all() and (np.abs(z[3:]) < 3).all()


# ---- an overfit SISA run ------------------------------------------------------------------------------------
def noisy_table(
    n: int, seed: int, n_features: int = 10, n_classes: int = 4, flip: float = 0.5
) -> pd.DataFrame:
    """Gaussian blobs with half the labels random: a big model can only fit them by memorising records."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1.5, (n_classes, n_features))
    y = rng.integers(0, n_classes, n)
    x = (centers[y] + rng.normal(size=(n, n_features))).astype(np.float32)
    y = np.where(rng.random(n) < flip, rng.integers(0, n_classes, n), y)
    df = pd.DataFrame(x, columns=[f"x{j}" for j in range(n_features)])
    df.insert(0, "label", y)
    df.insert(0, "record_id", np.arange(n))
    return df


OVERFIT = {
    "sharding": {"shards": 3, "slices": 2},
    "model": {"hidden": [512]},
    "training": {"epochs": 100, "batch_size": 32, "seed": 0, "progress": False},
}


def run_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """300 training rows (100 per shard), 400 never-seen rows, a 512-wide MLP trained for 100 epochs;
    then 75 records deleted. Returns paths and the ensemble before deletion."""
    tmp = tmp_path_factory.mktemp("audit")
    full = noisy_table(700, seed=0)
    train_df, holdout = full.iloc[:300].reset_index(drop=True), full.iloc[300:].reset_index(drop=True)
    holdout.to_parquet(tmp / "holdout.parquet")
    gone = train_df.iloc[::4].reset_index(drop=True)
    gone.to_parquet(tmp / "deleted.parquet")
    cfg = Config.from_dict({**OVERFIT, "data": {"test": str(tmp / "holdout.parquet")}})
    run, _ = train(tmp / "run", cfg, train_df)
    before = Ensemble.from_manifest(run.root, run.config(), run.manifest())
    return {"tmp": tmp, "run": run, "train": train_df, "gone": gone, "before": before, "cfg": run.config()}


def test_audit_detects_membership_on_an_overfit_model(overfit):
    audit = run_audit(overfit["run"].root, reference=False)
    s = audit.summary
    assert s["headline_attack"] == "shard/lira"
    assert s["members_vs_unseen_auc"] > 0.7 and s["members_vs_unseen_ci"][0] > 0.6
    for attack in ("ensemble/loss", "shard/loss"):
        assert s["attacks"]["live"]["members_vs_unseen"][attack]["auc_ci"][0] > 0.6, attack
    assert s["deleted_vs_unseen_auc"] is None and s["deleted_vs_unseen_ci"] is None
    assert "part (b) deleted-vs-unseen skipped" in " ".join(s["notes"])
    assert [r["shard"] for r in s["per_shard"]] == [0, 1, 2]
    holdout = pd.read_parquet(overfit["tmp"] / "holdout.parquet")
    X, y = holdout[overfit["cfg"].data.features].to_numpy(np.float32), holdout["label"].to_numpy(np.int64)
    assert s["ensemble_holdout_accuracy"] == round(overfit["before"].accuracy(X, y), 4)


def test_records_not_yet_deleted_are_flagged_as_members(overfit):
    """The control: the to-be-deleted records, scored by the model that still holds them, are detected."""
    cfg, ens, gone = overfit["cfg"], overfit["before"], overfit["gone"]
    holdout = pd.read_parquet(overfit["tmp"] / "holdout.parquet")
    table = load_rows(overfit["tmp"] / "deleted.parquet", cfg, "--deleted")
    pos = Group(table.features, table.labels, former_shards(overfit["run"], cfg, table))
    neg = Group(
        holdout[cfg.data.features].to_numpy(np.float32),
        holdout["label"].to_numpy(np.int64),
        np.arange(len(holdout)) % 3,
    )
    index = overfit["run"].index().active.set_index("record_id")
    assert pos.target.tolist() == index.loc[table.ids.tolist(), "shard"].tolist()  # the shard they live in
    result = compare_groups(ens, pos, neg, bootstrap=0, seed=0)["shard/lira"]
    assert result.verdict() == "above chance" and result.auc > 0.7
    assert len(gone) == 75


@pytest.fixture(scope="module")
def deleted_run(overfit):
    delete(overfit["run"].root, overfit["gone"]["record_id"].tolist())
    return overfit


def test_sisa_deleted_records_look_never_seen(deleted_run):
    root, tmp = deleted_run["run"].root, deleted_run["tmp"]
    before = run_files(root)
    audit = run_audit(root, tmp / "holdout.parquet", tmp / "deleted.parquet")
    s = audit.summary
    lo, hi = s["deleted_vs_unseen_ci"]
    assert lo < 0.5 < hi, s["deleted_vs_unseen_ci"]
    assert s["verdict"]["forgetting"].startswith(
        "deleted records are indistinguishable from never-seen records"
    )
    assert s["members_vs_unseen_ci"][0] > 0.6  # the attack still has power on the remaining members
    ref = s["reference"]
    assert ref["bit_identical_to_live"] is True
    assert ref["deleted_vs_unseen_auc"] == s["deleted_vs_unseen_auc"]
    assert s["attacks"]["live"] == s["attacks"]["reference"]
    assert run_files(root) == before  # the audit wrote nothing into the run


def test_deleted_file_must_hold_deleted_records(deleted_run):
    tmp = deleted_run["tmp"]
    still = deleted_run["train"].iloc[[1, 2]]
    never = deleted_run["train"].iloc[[0]].assign(record_id=[10_000])
    pd.concat([still, never]).to_parquet(tmp / "bad.parquet")
    with pytest.raises(DataError) as err:
        run_audit(deleted_run["run"].root, deleted=tmp / "bad.parquet", reference=False)
    assert err.value.problems == [
        "2 record(s) are still active in the run, not deleted: 1, 2",
        "1 record(s) were never deleted from this run: 10000",
    ]


def test_audit_needs_never_seen_records(tmp_path, tabular):
    run = train_run(tmp_path / "r", tabular, small_config())
    with pytest.raises(UsageError) as err:
        run_audit(run.root)
    assert str(err.value) == (
        "holdout: the audit needs never-seen records: give a holdout table or set data.test in the config"
    )
    with pytest.raises(UsageError) as err:
        run_audit(run.root, max_records=5, bootstrap=-1)
    assert err.value.problems == [
        ("max_records", "expected an integer >= 10, got 5"),
        ("bootstrap", "expected an integer >= 0, got -1"),
    ]
    assert err.value.render({"max_records": "--max-records", "bootstrap": "--bootstrap"}) == (
        "2 problems:\n  - --max-records: expected an integer >= 10, got 5\n  - --bootstrap: expected an integer >= 0, got -1"
    )


def test_cli_audit_json(deleted_run, capsys):
    root, tmp = deleted_run["run"].root, deleted_run["tmp"]
    argv = [
        "audit",
        "--run",
        str(root),
        "--deleted",
        str(tmp / "deleted.parquet"),
        "--json",
        "--bootstrap",
        "20",
    ]
    assert main([*argv, "--out", str(tmp / "audit.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "members_vs_unseen_auc",
        "members_vs_unseen_ci",
        "deleted_vs_unseen_auc",
        "deleted_vs_unseen_ci",
    ):
        assert key in out and out[key] is not None, key
    assert out["reference"]["bit_identical_to_live"] is True
    assert (
        json.loads((tmp / "audit.json").read_text())["deleted_vs_unseen_auc"] == out["deleted_vs_unseen_auc"]
    )
    assert main([*argv, "--out", str(root / "audit.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"sisa: error: --out: {root / 'audit.json'}: results derived from deleted rows "
        "must be written outside the run"
    )
    assert not (root / "audit.json").exists()


def test_cli_audit_text(deleted_run, capsys):
    root, tmp = deleted_run["run"].root, deleted_run["tmp"]
    assert (
        main(["audit", "--run", str(root), "--holdout", str(tmp / "holdout.parquet"), "--no-reference"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith(f"audit of {root} (generation 3); attack shard/lira\n  members_vs_unseen  AUC ")
    assert "note: no retrained-from-scratch reference was computed (--no-reference)" in out


def test_audit_refuses_while_a_deletion_is_being_applied(tmp_path, tabular):
    """Another writer holds the lock with an acknowledged, unapplied deletion: its shards still hold the records."""
    tabular.iloc[500:].to_parquet(tmp_path / "holdout.parquet")
    run = train_run(tmp_path / "r", tabular.iloc[:500], small_config())
    with writer_lock(run.root, 0.0, "test"):
        Journal(run.journal_dir).begin("del-test", [], [], {0: 0}, 0, {})
        with pytest.raises(RunStateError) as err:
            run_audit(run.root, tmp_path / "holdout.parquet", reference=False)
    assert str(err.value) == (
        f"{run.root}: another process is applying a deletion; audit again when it has finished"
    )
