"""Rollback at acceptance (docs/design.md §4.2): a deletion rolls each affected shard back to the checkpoint before
its earliest affected slice, erases at once, and the catch-up retrain follows the retrain policy."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from sisa import retraining, session
from sisa import unlearning as unlearning_module
from sisa.aggregation import Ensemble
from sisa.cli import main as cli
from sisa.config import Config
from sisa.evidence.erasure import check_erasure
from sisa.evidence.history import deletion_log
from sisa.evidence.verification import verify
from sisa.exceptions import ConfigError
from sisa.fitting import train
from sisa.serving.state import ServingState
from sisa.store.checkpoints import load_checkpoint
from sisa.store.journal import Journal
from sisa.store.rundir import RunDir
from sisa.train.models import shard_model
from sisa.unlearning import delete, retrain
from tests.conftest import assert_runs_identical, feature_matrix, small_config, train_run
from tests.test_exactness import rows_at, traces, without

CFG = small_config(training={"seed": 3})


@pytest.fixture
def base(tmp_path, tabular):
    return train_run(tmp_path / "run", tabular, CFG), tabular


def _pick(run: RunDir) -> list:
    """Shard 0 from slice 2, shard 1 from slice 1 (two records), shard 2 from slice 0."""
    return rows_at(run, 0, 2)[:1] + rows_at(run, 1, 1)[:1] + rows_at(run, 1, 2)[:1] + rows_at(run, 2, 0)[:1]


def _entries(run: RunDir) -> dict[int, dict]:
    return {e["shard"]: e for e in run.manifest()["shards"]}


def _served(run: RunDir, shard: int) -> dict:
    e = _entries(run)[shard]
    return load_checkpoint(run.shard_checkpoints(shard) / e["checkpoints"][-1], e["fingerprint"]).model


def test_rolled_back_shards_equal_training_their_earlier_slices_from_scratch(tmp_path, base):
    run, df = base
    gone = _pick(run)
    receipt = delete(run.root, gone, defer=True)
    assert receipt["status"] == "rolled_back" and receipt["records_deleted"] == 4
    assert receipt["shards_rolled_back"] == {"0": 2, "1": 1, "2": 0} and receipt["shards_out"] == [2]
    assert receipt["retrain_deadline"] == pytest.approx(
        Journal(run.journal_dir).entries()[0]["created"] + 30 * 86400
    )
    e = _entries(run)
    assert [len(e[s]["checkpoints"]) for s in range(3)] == [2, 1, 0]
    assert [e[s]["rolled_back"]["slice"] for s in range(3)] == [2, 1, 0]
    assert e[2]["fingerprint"] is None and e[2]["records"] > 0
    # the reference: from scratch on the remaining rows; its checkpoints 0..k-1 are exactly the shards' rollbacks
    ref, _ = train(tmp_path / "ref", CFG, without(df, gone))
    ref_e = _entries(ref)
    for s in range(3):
        names = e[s]["checkpoints"]
        assert names == ref_e[s]["checkpoints"][: len(names)]
        for name in names:
            a, b = (load_checkpoint(r.shard_checkpoints(s) / name) for r in (run, ref))
            for part in ("model", "optimizer"):
                x, y = getattr(a, part), getattr(b, part)
                assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (s, name, part)
    # probabilities: the rolled-back ensemble is the reference's checkpoints 1 (shard 0) and 0 (shard 1)
    cfg, models = run.config(), {}
    for s, k in ((0, 1), (1, 0)):
        m = shard_model(cfg, 0)
        m.load_state_dict(load_checkpoint(ref.shard_checkpoints(s) / ref_e[s]["checkpoints"][k]).model)
        models[s] = m.eval()
    X = feature_matrix(df)
    live = Ensemble.from_manifest(run.root, cfg, run.manifest())
    assert live.shards == [0, 1]
    assert torch.equal(
        live.shard_probabilities(X, "loop"), Ensemble(models, cfg).shard_probabilities(X, "loop")
    )
    # sisa verify certifies the rolled-back shards as such
    certs = verify(run.root)
    assert all(c.ok and c.bit_identical for c in certs)
    assert [(c.rolled_back_to, c.checkpoints_compared) for c in certs] == [(2, 2), (1, 1), (0, 0)]
    # the catch-up: bit-identical to training from scratch without the records, every request applied
    report = retrain(run.root)
    assert report["shards_retrained"] == [0, 1, 2] and report["still_rolled_back"] == []
    assert_runs_identical(run, ref)
    (entry,) = Journal(run.journal_dir).entries()
    assert entry["status"] == "applied"
    r = entry["receipt"]
    assert entry["created"] <= r["forgotten_at"] <= r["caught_up_at"]
    assert r["slices_retrained"] == {"0": [2], "1": [1, 2], "2": [0, 1, 2]}
    assert r["samples_retrained"] == report["samples_retrained"] > 0
    assert not any("rolled_back" in x for x in run.manifest()["shards"])


def test_erasure_happens_at_rollback_not_at_the_retrain(base):
    run, df = base
    gone = _pick(run)
    rows = df.set_index("record_id").loc[gone]
    needles = [str(g).encode() for g in gone] + [feature_matrix(rows)[i].tobytes() for i in range(len(gone))]
    stale = {s: e["checkpoints"][e_k:] for s, e, e_k in ((0, _entries(run)[0], 2), (1, _entries(run)[1], 1))}
    delete(run.root, gone, defer=True)
    assert traces(run.root, needles[len(gone) :]) == []  # no file holds a deleted row's features
    for s, names in stale.items():  # every checkpoint trained on a deleted record is gone from disk
        assert all(not (run.shard_checkpoints(s) / n).exists() for n in names)
        assert sorted(p.name for p in run.shard_checkpoints(s).iterdir()) == _entries(run)[s]["checkpoints"]
    assert list(run.shard_checkpoints(2).iterdir()) == []
    report = check_erasure(run.root, [str(g) for g in gone], df)
    assert report.ok, [c for c in report.checks if not c.ok]
    assert Journal(run.journal_dir).entries()[0]["status"] == "rolled_back"  # the check retrained nothing


def test_several_deletions_in_one_shard_roll_back_to_the_earliest(tmp_path, base):
    run, df = base
    late, early, later = rows_at(run, 0, 2)[:1], rows_at(run, 0, 1)[:1], rows_at(run, 0, 2)[1:2]
    delete(run.root, late, defer=True)
    delete(run.root, early, defer=True)
    delete(run.root, later, defer=True)
    rb = _entries(run)[0]["rolled_back"]
    assert rb["slice"] == 1 and len(rb["requests"]) == 3 and len(_entries(run)[0]["checkpoints"]) == 1
    first_since = rb["since"]
    report = retrain(run.root)  # one retrain from slice 1 covers the three requests
    assert report["shards_retrained"] == [0] and len(report["requests_applied"]) == 3
    assert first_since <= min(e["rolled_back"] for e in Journal(run.journal_dir).entries())
    ref, _ = train(tmp_path / "ref", CFG, without(df, late + early + later))
    assert_runs_identical(run, ref)
    r = Journal(run.journal_dir).entries()[-1]["receipt"]
    assert r["slices_retrained"] == {"0": [1, 2]} and len(r["catch_up_batch"]) == 3


def test_immediate_policy_retrains_at_once_and_recovery_rolls_back_first(tmp_path, base, monkeypatch):
    run, df = base
    gone = rows_at(run, 1, 1)[:1]
    receipt = delete(run.root, gone)  # the default: immediate
    assert (
        receipt["status"] == "applied" and receipt["rollback_generation"] == 2 and receipt["generation"] == 3
    )
    assert receipt["shards_rolled_back"] == {"1": 1} and receipt["forgotten_at"] <= receipt["caught_up_at"]
    # a crash right after the acknowledgement leaves the request pending: recovery rolls it back; under the
    # manual policy it waits for `sisa retrain` (erased meanwhile), under immediate it is caught up at once
    more = rows_at(run, 0, 1)[:1]

    def crash(*args, **kw):
        raise OSError(5, "simulated crash after the journal write")

    monkeypatch.setattr(unlearning_module, "roll_back", crash)
    with pytest.raises(OSError):
        delete(run.root, more)
    monkeypatch.undo()
    assert [e["status"] for e in Journal(run.journal_dir).entries()] == ["applied", "pending"]
    manual = RunDir(run.root, ["unlearning.retrain=manual"])
    (entry,) = session.recover(manual)
    assert entry["status"] == "rolled_back" and _entries(run)[0]["rolled_back"]["slice"] == 1
    assert session.recover(manual) == []  # manual: nothing due before the deadline
    session.recover(RunDir(run.root))  # immediate: the rolled-back request is caught up
    assert [e["status"] for e in Journal(run.journal_dir).entries()] == ["applied", "applied"]
    ref, _ = train(tmp_path / "ref", CFG, without(df, gone + more))
    assert_runs_identical(run, ref)


def test_policy_due_batched_manual_deadline(base):
    run, _ = base
    delete(run.root, rows_at(run, 0, 2)[:1], defer=True)
    delete(run.root, rows_at(run, 1, 0)[:1], defer=True)
    now = time.time()
    immediate = RunDir(run.root)
    assert retraining.due(immediate, now) == {}  # every request deferred
    batched = RunDir(run.root, ["unlearning.retrain=batched", "unlearning.max_delay=1h"])
    assert retraining.due(batched, now) == {}
    assert retraining.due(batched, now + 3601) == {0: "max_delay", 1: "max_delay"}
    assert 3500 < retraining.next_due(batched, now) <= 3600
    manual = RunDir(run.root, ["unlearning.retrain=manual", "unlearning.deadline=10d"])
    assert retraining.due(manual, now + 8 * 86400) == {}
    assert retraining.due(manual, now + 9.1 * 86400) == {0: "deadline", 1: "deadline"}  # a tenth left: start
    # the accuracy rule: shard 1 rolled back before its first slice has lost all of its accuracy
    acc = RunDir(run.root, ["unlearning.retrain=batched", "unlearning.max_accuracy_drop=0.05"])
    drops = retraining.accuracy_drops(acc, acc.require_manifest())
    assert drops == {0: None, 1: None}  # no test table in this run: the rule cannot apply
    assert retraining.due(acc, now) == {}


def test_unlearning_keys_are_validated_all_at_once_and_outside_the_digest():
    with pytest.raises(ConfigError) as err:
        Config().with_runtime(
            ["unlearning.retrain=later", "unlearning.max_delay=3w", "unlearning.max_accuracy_drop=1.5"]
        )
    assert err.value.problems == [
        "unlearning.retrain: expected one of immediate, batched, manual, got 'later'",
        "unlearning.max_delay: expected a duration like 90s, 15m, 12h or 30d, got '3w'",
        "unlearning.max_accuracy_drop: expected a fraction between 0 and 1 or null, got 1.5",
    ]
    with pytest.raises(ConfigError, match="is longer than unlearning.deadline"):
        Config().with_runtime(["unlearning.max_delay=40d"])
    fast = Config().with_runtime(["unlearning.retrain=manual", "unlearning.max_delay=600"])
    assert (fast.unlearning.retrain, fast.unlearning.max_delay) == ("manual", 600)
    assert fast.digest() == Config().digest()


def test_serving_answers_with_the_rolled_back_checkpoint(base):
    run, df = base
    state = ServingState(run.root)
    assert state.snapshot().shards == [0, 1, 2]
    delete(run.root, rows_at(run, 1, 1)[:1] + rows_at(run, 2, 0)[:1], defer=True)
    snap = state.snapshot()
    assert snap.shards == [0, 1] and snap.excluded == frozenset()  # shard 2: out (slice 0 hit)
    assert _entries(run)[1]["checkpoints"][-1].startswith("slice-000-")
    served = state._models[1][1].state_dict()
    assert all(torch.equal(served[k], v) for k, v in _served(run, 1).items())
    st = state.status()
    assert st["shards_serving"] == [0, 1] and st["shards_rolled_back"] == [1, 2]
    by_shard = {e["shard"]: e for e in st["shard_states"]}
    assert [by_shard[s]["state"] for s in range(3)] == ["latest", "rolled_back", "out"]
    assert by_shard[1]["slice"] == 1 and by_shard[1]["retrain_deadline"] > time.time() + 29 * 86400
    X = feature_matrix(df)[:8]
    assert np.array_equal(
        snap.predict_proba(X), Ensemble.from_manifest(run.root, run.config(), run.manifest()).predict_proba(X)
    )


def test_cli_defer_status_retrain_history(base, capsys):
    run, _ = base
    victim = str(rows_at(run, 1, 1)[0])
    assert cli.main(["delete", "--run", str(run.root), "--defer", victim]) == 0
    out = capsys.readouterr().out
    assert "forgotten and erased (rolled back, retrain pending)" in out
    assert "  shard 1: serving slice 0 (rolled back to slice 1)" in out
    assert cli.main(["status", "--run", str(run.root), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["shards_serving"] == [0, 1, 2] and st["shards_rolled_back"] == [1]
    assert st["shard_states"][1]["state"] == "rolled_back" and st["shard_states"][0]["state"] == "latest"
    assert cli.main(["status", "--run", str(run.root)]) == 0
    assert "  shard 1: rolled back to slice 1 since " in capsys.readouterr().out
    (row,) = deletion_log(run.root)
    assert row["status"] == "rolled_back" and row["forgotten_utc"] and row["applied_utc"] is None
    assert cli.main(["retrain", "--run", str(run.root), "--due"]) == 0
    assert capsys.readouterr().out == "nothing to retrain: no shard is due\n"
    assert cli.main(["retrain", "--run", str(run.root), "--shard", "7"]) == 2
    assert "--shard: 7 is not a shard of this run (it has 0..2)" in capsys.readouterr().err
    assert cli.main(["retrain", "--run", str(run.root)]) == 0
    assert capsys.readouterr().out.startswith("caught up shard(s) [1]: ")
    (row,) = deletion_log(run.root)
    assert row["status"] == "applied" and row["forgotten_utc"] <= row["applied_utc"]
    assert cli.main(["retrain", "--run", str(run.root)]) == 0
    assert capsys.readouterr().out == "nothing to retrain: no shard is rolled back\n"


def test_server_with_manual_policy_forgets_at_once_and_waits_for_sisa_retrain(base):
    import warnings

    from sisa.serving.app import create_app
    from sisa.serving.schema import ServerSettings
    from sisa.serving.server import Server

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    run, _ = base
    auth = {"Authorization": "Bearer t0ken-for-tests"}
    victim = int(rows_at(run, 1, 2)[0])
    server = Server(run.root, ServerSettings(token="t0ken-for-tests"), runtime=["unlearning.retrain=manual"])
    with TestClient(create_app(server)) as c:
        r = c.post("/deletions", json={"record_ids": [victim]}, headers=auth)
        assert r.status_code == 202, r.text
        rid, deadline = r.json()["request_id"], time.monotonic() + 30
        while (body := c.get(f"/deletions/{rid}", headers=auth).json())["status"] == "pending":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert body["status"] == "rolled_back" and body["forgotten"] and body["applied"] is None
        st = c.get("/status").json()
        assert st["shards_serving"] == [0, 1, 2] and st["shards_rolled_back"] == [1]
        assert st["shard_states"][1]["retrain_policy"] == "manual"
        assert c.post("/predict", json={"instances": [[0.0] * 6]}).json()["shards"] == [0, 1, 2]
        retrain(run.root)
        assert c.get(f"/deletions/{rid}", headers=auth).json()["status"] == "applied"
        assert c.get("/status").json()["shards_rolled_back"] == []
