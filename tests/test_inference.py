"""Batched (stacked) ensemble inference equals the per-shard loop; ``auto`` stacks small batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sisa.aggregation import STACKED_MAX_BATCH, Ensemble
from sisa.config import Config
from sisa.train.models import build_model


def ensemble(
    n_models: int, n_features: int, n_classes: int, model: dict, method: str = "soft", **agg
) -> Ensemble:
    cfg = Config.from_dict(
        {
            "data": {"features": [f"f{i}" for i in range(n_features)], "classes": list(range(n_classes))},
            "model": model,
            "sharding": {"shards": n_models},
            "aggregation": {"method": method, **agg},
        }
    )
    models = {s: build_model(cfg.model, n_features, n_classes, 100 + s).eval() for s in range(n_models)}
    return Ensemble(models, cfg)


def rows(n: int, n_features: int, seed: int = 0) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).normal(size=(n, n_features)).astype(np.float32)


@pytest.mark.parametrize("method", ["soft", "hard"])
def test_purchase_sized_stack_equals_loop(method):
    ens = ensemble(20, 600, 100, {"hidden": [128]}, method)
    for n in (1, 64, 513):
        X = rows(n, 600, seed=n)
        loop, stacked = ens.shard_probabilities(X, "loop"), ens.shard_probabilities(X, "stacked")
        assert stacked.shape == loop.shape == (20, n, 100)
        torch.testing.assert_close(stacked, loop, rtol=0, atol=1e-6)
        # the decisions are bit-equal: same argmax per shard, same aggregate
        assert torch.equal(stacked.argmax(-1), loop.argmax(-1))
        assert np.array_equal(ens.predict(X, "stacked"), ens.predict(X, "loop"))
        if method == "hard":  # vote shares are computed from the (equal) argmaxes: identical bits
            assert np.array_equal(ens.predict_proba(X, "stacked"), ens.predict_proba(X, "loop"))


def test_cnn_and_weighted_soft_votes_stack_too():
    ens = ensemble(3, 64, 4, {"name": "cnn"}, weights=[1.0, 0.0, 2.0])
    X = rows(10, 64, seed=3)
    np.testing.assert_allclose(
        ens.predict_proba(X, "stacked"), ens.predict_proba(X, "loop"), rtol=0, atol=1e-6
    )
    # weight 0 silences shard 1: the answer is the 1:2 mix of shards 0 and 2
    p = ens.shard_probabilities(X, "loop").numpy()
    np.testing.assert_allclose(ens.predict_proba(X, "loop"), (p[0] + 2 * p[2]) / 3, rtol=0, atol=1e-6)


def test_a_smaller_ensemble_restacks_only_its_own_models():
    ens = ensemble(5, 8, 3, {"hidden": [16]})
    X = rows(32, 8)
    full = ens.shard_probabilities(X, "stacked")  # builds (and caches) the 5-model stack
    part = ens.without({1, 3})
    assert part.shards == [0, 2, 4]
    got = part.shard_probabilities(X, "stacked")
    torch.testing.assert_close(got, full[[0, 2, 4]], rtol=0, atol=1e-6)
    torch.testing.assert_close(got, part.shard_probabilities(X, "loop"), rtol=0, atol=1e-6)


def test_one_model_is_the_same_call_either_way():
    ens = ensemble(1, 8, 3, {"hidden": [16]})
    X = rows(50, 8)
    assert ens.inference_mode(50, "stacked") == "loop"
    assert torch.equal(ens.shard_probabilities(X, "stacked"), ens.shard_probabilities(X, "loop"))


def test_auto_stacks_small_batches_only():
    small = ensemble(20, 6, 3, {"hidden": [16]})
    big = ensemble(20, 600, 100, {"hidden": [128]})
    limit = STACKED_MAX_BATCH["cpu"]
    for ens in (small, big):
        assert ens.inference_mode(1) == ens.inference_mode(limit) == "stacked"
        assert ens.inference_mode(limit + 1) == "loop"
    # an explicit mode wins over auto
    assert big.inference_mode(4096, "stacked") == "stacked" and small.inference_mode(1, "loop") == "loop"
    forced = ensemble(20, 6, 3, {"hidden": [16]}, inference="loop")
    assert forced.inference_mode(1) == "loop"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stack_equals_loop_and_auto_always_stacks():
    cpu = ensemble(20, 600, 100, {"hidden": [128]})
    ens = Ensemble({s: m.to("cuda") for s, m in cpu.models.items()}, cpu.config, device="cuda")
    X = rows(4096, 600)
    assert ens.inference_mode(4096) == "stacked"
    torch.testing.assert_close(
        ens.shard_probabilities(X, "stacked"), ens.shard_probabilities(X, "loop"), rtol=0, atol=1e-5
    )
