"""APPROXIMATE unlearning baselines and the exact-vs-approximate comparison."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from sisa.cli.main import main
from sisa.evidence.baselines import (
    CLASS_ONLY,
    METHODS,
    Records,
    apply_baseline,
    fit_model,
    gradient_ascent,
    impair_repair,
)
from sisa.evidence.comparison import Sets, compare, metrics, parse_requests, single_log_probs
from sisa.exceptions import ConfigError, UsageError
from sisa.tables.datasets import make_tabular
from tests.conftest import small_config


@pytest.fixture(scope="module")
def data():
    df = make_tabular(400, seed=3, n_features=6, n_classes=3)
    cfg = small_config(model={"hidden": [32]}, training={"epochs": 8})
    cfg.data.classes = [0, 1, 2]
    X, y = df[[f"x{j}" for j in range(6)]].to_numpy(np.float32), df["label"].to_numpy(np.int64)
    model = fit_model(cfg, Records(X, y))
    gone = y == 2
    return {
        "cfg": cfg,
        "model": model,
        "all": Records(X, y),
        "retain": Records(X[~gone], y[~gone]),
        "forget_class": Records(X[gone], y[gone]),
        "forget_random": Records(X[:20], y[:20]),
        "retain_random": Records(X[20:], y[20:]),
    }


def accuracy(model: torch.nn.Module, r: Records) -> float:
    with torch.no_grad():
        return float((model(torch.tensor(r.features)).argmax(-1).numpy() == r.labels).mean())


def test_fit_model_learns_and_is_deterministic(data):
    assert accuracy(data["model"], data["all"]) > 0.9
    again = fit_model(data["cfg"], data["all"])
    for (n, p), (_, q) in zip(data["model"].named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_baseline_changes_a_copy_of_the_same_architecture(data, method):
    original = data["model"]
    snapshot = copy.deepcopy(original.state_dict())
    class_forget = method in CLASS_ONLY
    retain = data["retain"] if class_forget else data["retain_random"]
    forget = data["forget_class"] if class_forget else data["forget_random"]
    out = apply_baseline(method, original, retain, forget, seed=0)
    assert out is not original and type(out) is type(original)
    new = out.state_dict()
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in snapshot.items()}
    assert any(not torch.equal(new[k], snapshot[k]) for k in snapshot), (
        "the baseline did not change the model"
    )
    for k, v in original.state_dict().items():
        assert torch.equal(v, snapshot[k]), f"{method} modified its input model ({k})"
    again = apply_baseline(method, original, retain, forget, seed=0)
    assert all(torch.equal(new[k], again.state_dict()[k]) for k in new), "not deterministic for a fixed seed"
    assert "APPROXIMATE" in METHODS[method].__doc__
    assert method.startswith("approx-")


def test_impair_repair_forgets_the_class_and_keeps_the_rest(data):
    before = accuracy(data["model"], data["forget_class"])
    out = impair_repair(data["model"], data["retain"], data["forget_class"], seed=0)
    assert before > 0.9
    assert accuracy(out, data["forget_class"]) < 0.2
    assert accuracy(out, data["retain"]) > 0.85


def test_gradient_ascent_raises_the_forget_loss(data):
    def loss(m: torch.nn.Module, r: Records) -> float:
        with torch.no_grad():
            x, y = r.tensors()
            return float(torch.nn.functional.cross_entropy(m(x), y))

    out = gradient_ascent(data["model"], data["retain_random"], data["forget_random"], epochs=5, lr=1e-2)
    assert loss(out, data["forget_random"]) > loss(data["model"], data["forget_random"])


def test_baseline_errors(data):
    with pytest.raises(ConfigError) as err:
        apply_baseline("magic", data["model"], data["retain"], data["forget_class"])
    assert err.value.problems == [
        "unknown unlearning baseline 'magic'; expected one of approx-finetune, approx-gradient-ascent, "
        "approx-neggrad+, approx-random-labels, approx-impair-repair"
    ]
    with pytest.raises(ConfigError) as err:
        impair_repair(data["model"], data["retain_random"], data["forget_random"])
    assert err.value.problems == [
        "approx-impair-repair forgets whole classes, but retained records still have classes [0, 1, 2]"
    ]


def test_parse_requests_reports_every_bad_spec():
    assert [r.kind for r in parse_requests(["random:5", "class:b"], ["a", "b"], 100)] == ["random", "class"]
    with pytest.raises(UsageError) as err:
        parse_requests(["random:0", "class:z", "everything", "random:100"], ["a", "b"], 100)
    assert err.value.problems == [
        ("specs", "random:0: expected random:N with 1 <= N < 100 training rows, or class:LABEL"),
        ("specs", "class:z: unknown class 'z'; classes are ['a', 'b']"),
        ("specs", "everything: expected random:N with 1 <= N < 100 training rows, or class:LABEL"),
        ("specs", "random:100: expected random:N with 1 <= N < 100 training rows, or class:LABEL"),
    ]


@pytest.fixture(scope="module")
def compare_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    full = make_tabular(500, seed=1, n_features=6, n_classes=3, string_labels=True)
    full.iloc[:360].to_parquet(tmp / "train.parquet")
    full.iloc[360:].to_parquet(tmp / "test.parquet")
    cfg = small_config(
        data={"train": str(tmp / "train.parquet"), "test": str(tmp / "test.parquet")},
        model={"hidden": [32]},
        training={"epochs": 10},
    )
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    return tmp


def test_compare_exact_and_approximate(compare_config, capsys):
    tmp = compare_config
    argv = ["compare", "--config", str(tmp / "config.yaml"), "--forget", "random:25", "--forget", "class:b"]
    assert main([*argv, "--json", "--out", str(tmp / "out")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads((tmp / "out" / "compare.json").read_text()) == result
    assert "| method | kind | wall_s |" in (tmp / "out" / "compare.md").read_text()
    random_req, class_req = result["requests"]
    assert (random_req["forget"], random_req["forget_rows"], random_req["retain_rows"]) == (
        "random:25",
        25,
        335,
    )
    names = [r["method"] for r in class_req["rows"]]
    assert names == ["retrain", "retrain (seed+1)", "original", "sisa retrain", "sisa delete", *METHODS]
    assert "approx-impair-repair" not in [r["method"] for r in random_req["rows"]]
    assert random_req["notes"] == ["approx-impair-repair forgets whole classes only; not run for random:25"]
    for req in result["requests"]:
        rows = {r["method"]: r for r in req["rows"]}
        for key in (
            "wall_s",
            "test_acc",
            "retain_acc",
            "forget_acc",
            "mia_auc",
            "l2_to_retrain",
            "tv_to_retrain",
        ):
            assert key in rows["sisa delete"], key
        assert rows["sisa delete"]["exact"] and rows["retrain"]["exact"]
        # SISA's deletion is exactly its retrain from scratch: zero distance, same metrics
        assert rows["sisa delete"]["l2_to_retrain"] == 0.0 and rows["sisa delete"]["tv_to_retrain"] == 0.0
        same = ("test_acc", "retain_acc", "forget_acc", "mia_auc")
        assert {k: rows["sisa delete"][k] for k in same} == {k: rows["sisa retrain"][k] for k in same}
        assert rows["retrain"]["l2_to_retrain"] == 0.0
        assert rows["retrain (seed+1)"]["tv_to_retrain"] > 0.0
        for name in METHODS:
            if name in rows:
                assert rows[name]["kind"] == "APPROXIMATE" and rows[name]["exact"] is False
    # forgetting a class: the exact methods never predict it any more
    rows = {r["method"]: r for r in class_req["rows"]}
    assert rows["retrain"]["forget_acc"] == 0.0 and rows["sisa delete"]["forget_acc"] == 0.0
    assert rows["original"]["forget_acc"] > 0.9
    assert "APPROXIMATE" in result["conventions"]["kind"]


def test_compare_needs_a_test_table(compare_config):
    cfg = small_config(data={"train": str(compare_config / "train.parquet")})
    with pytest.raises(ConfigError) as err:
        compare(cfg, ["random:5"])
    assert err.value.problems == [
        "data.test: compare needs a test table for accuracy and the membership attack"
    ]


def test_metrics_of_a_single_forget_record_leave_the_attack_out(data):
    predict = single_log_probs(data["model"])
    one = Records(data["all"].features[:1], data["all"].labels[:1])
    sets = Sets(test=data["all"], retain=data["retain_random"], forget=one, unseen=data["all"])
    m = metrics(predict, predict, sets, seed=0)
    assert m["mia_auc"] is None and m["mia_auc_ci"] is None
    assert m["tv_to_retrain"] == 0.0 and m["forget_acc"] in (0.0, 1.0)
