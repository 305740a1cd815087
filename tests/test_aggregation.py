"""Aggregation: hard votes (ties to the lowest class), soft means, weights, stacked = loop inference, empty shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sisa.aggregation import Ensemble
from sisa.config import Config
from sisa.exceptions import RunStateError
from sisa.tables.datasets import make_tabular
from tests.conftest import feature_matrix, small_config, train_run

CLASSES = ["x", "y", "z"]


class Fixed(nn.Module):
    """A sub-model that answers the same logits for every input."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def fixed_ensemble(logits: list[list[float]], method: str = "hard", weights=None) -> Ensemble:
    cfg = Config.from_dict(
        {
            "data": {"classes": CLASSES, "features": ["f0", "f1"]},
            "sharding": {"shards": len(logits)},
            "aggregation": {"method": method, "weights": weights},
        }
    )
    return Ensemble({s: Fixed(v) for s, v in enumerate(logits)}, cfg)


X2 = np.zeros((2, 2), dtype=np.float32)
VOTE = {0: [5.0, 0.0, 0.0], 1: [0.0, 5.0, 0.0], 2: [0.0, 0.0, 5.0]}


@pytest.mark.parametrize("mode", ["loop", "stacked"])
def test_hard_vote_tie_goes_to_lowest_class_index(mode):
    ens = fixed_ensemble([VOTE[2], VOTE[1]])
    np.testing.assert_array_equal(ens.predict_proba(X2, mode), [[0.0, 0.5, 0.5]] * 2)
    assert ens.predict(X2, mode).tolist() == ["y", "y"]
    four = fixed_ensemble([VOTE[2], VOTE[0], VOTE[2], VOTE[0]])
    assert four.predict_indices(X2, mode).tolist() == [0, 0]
    three_way = fixed_ensemble([VOTE[2], VOTE[1], VOTE[0]])
    assert three_way.predict(X2, mode).tolist() == ["x", "x"]


def test_hard_vote_majority_and_weights():
    ens = fixed_ensemble([VOTE[1], VOTE[2], VOTE[2]])
    np.testing.assert_allclose(ens.predict_proba(X2), [[0.0, 1 / 3, 2 / 3]] * 2)
    assert ens.predict(X2).tolist() == ["z", "z"]
    weighted = fixed_ensemble([VOTE[2], VOTE[0], VOTE[0], VOTE[1]], weights=[3, 1, 1, 1])
    np.testing.assert_allclose(weighted.predict_proba(X2), [[2 / 6, 1 / 6, 3 / 6]] * 2)
    assert weighted.predict(X2).tolist() == ["z", "z"]
    zero = fixed_ensemble([VOTE[2], VOTE[0]], weights=[0, 1])  # a zero weight silences a shard
    assert zero.predict(X2).tolist() == ["x", "x"]


def test_soft_is_the_mean_of_shard_probabilities():
    logits = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]]
    ens = fixed_ensemble(logits, method="soft")
    probs = torch.softmax(torch.tensor(logits), -1)
    np.testing.assert_allclose(ens.predict_proba(X2), probs.mean(0).expand(2, -1).numpy(), rtol=1e-6)
    assert torch.equal(ens.shard_probabilities(X2, "loop")[:, 0], probs)
    # a soft vote can disagree with the hard vote: the confident shard 1 wins on the mean
    assert ens.predict(X2).tolist() == ["z", "z"]
    assert fixed_ensemble(logits, method="hard").predict(X2).tolist() == ["x", "x"]


def test_soft_weights():
    logits = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    ens = fixed_ensemble(logits, method="soft", weights=[3.0, 1.0])
    probs = torch.softmax(torch.tensor(logits), -1).numpy()
    np.testing.assert_allclose(ens.predict_proba(X2)[0], (3 * probs[0] + probs[1]) / 4, rtol=1e-6)


def test_without_drops_shards_and_keeps_their_weights_aligned():
    ens = fixed_ensemble([VOTE[0], VOTE[1], VOTE[2]], method="soft", weights=[1, 0, 5])
    part = ens.without({0})
    assert part.shards == [1, 2]
    assert part.weights().tolist() == [0.0, 5.0]
    assert part.predict(X2).tolist() == ["z", "z"]
    with pytest.raises(RunStateError) as err:
        ens.without({0, 1, 2}).predict(X2)
    assert str(err.value) == "no shard model is serving (every shard is retraining or empty)"


def test_only_zero_weight_shards_serving_is_an_error_not_nan():
    ens = fixed_ensemble([VOTE[2], VOTE[1], VOTE[1]], method="soft", weights=[1, 0, 0])
    with pytest.raises(RunStateError) as err:
        ens.without({0}).predict(X2)
    assert str(err.value) == (
        "no serving shard has a positive aggregation weight (serving shards [1, 2], weights [0.0, 0.0]); "
        "wait for the retraining shards or change aggregation.weights"
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    df = make_tabular(300, seed=4, n_features=6, n_classes=3, string_labels=True)
    run = train_run(tmp_path_factory.mktemp("agg") / "run", df, small_config(sharding={"shards": 4}))
    return run, df


def test_stacked_inference_equals_loop(trained):
    run, df = trained
    ens = Ensemble.from_manifest(run.root, run.config(), run.manifest())
    X = feature_matrix(df)
    for n in (1, 7, 64, 300):
        loop, stacked = ens.shard_probabilities(X[:n], "loop"), ens.shard_probabilities(X[:n], "stacked")
        assert loop.shape == stacked.shape == (4, n, 3)
        torch.testing.assert_close(stacked, loop, rtol=0, atol=1e-6)
        assert np.array_equal(ens.predict(X[:n], "loop"), ens.predict(X[:n], "stacked"))
    # measured on this CPU: bit-equal at batch 64 and above (tiny batches take another matmul path)
    for n in (64, 300):
        assert torch.equal(ens.shard_probabilities(X[:n], "loop"), ens.shard_probabilities(X[:n], "stacked"))


def test_auto_inference_is_one_of_the_two(trained):
    run, df = trained
    ens = Ensemble.from_manifest(run.root, run.config(), run.manifest())
    X = feature_matrix(df)
    auto = ens.predict_proba(X, "auto")
    assert np.array_equal(auto, ens.predict_proba(X, "stacked")) or np.array_equal(
        auto, ens.predict_proba(X, "loop")
    )
    assert auto.shape == (300, 3)
    np.testing.assert_allclose(auto.sum(1), 1.0, rtol=1e-5)
    y = np.array([["a", "b", "c"].index(v) for v in df["label"]])
    assert ens.accuracy(X, y) == float((ens.predict_indices(X) == y).mean())


def test_shard_with_no_records_is_excluded(tmp_path):
    df = make_tabular(12, seed=0, n_features=3, n_classes=2)
    cfg = small_config(sharding={"shards": 8, "slices": 2}, aggregation={"weights": [1.0] * 8})
    run = train_run(tmp_path / "run", df, cfg)
    entries = run.manifest()["shards"]
    empty = [e["shard"] for e in entries if e["records"] == 0]
    assert empty, [e["records"] for e in entries]  # 12 rows over 8 shards leave some empty
    ens = Ensemble.from_manifest(run.root, run.config(), run.manifest())
    assert ens.shards == [e["shard"] for e in entries if e["records"] > 0]
    assert not set(empty) & set(ens.shards)
    proba = ens.predict_proba(feature_matrix(df))
    assert proba.shape == (12, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
