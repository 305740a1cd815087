"""Distribution-aware placement (paper §VIII): cheaper expected deletions than uniform, and still exact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sisa.costs import placement_cost, placement_training_cost
from sisa.fitting import train
from sisa.sharding import VOLATILE_THRESHOLD, place
from sisa.unlearning import delete

from .conftest import assert_runs_identical, small_config


def deletion_probabilities(n: int, seed: int, volatile_share: float = 0.1) -> np.ndarray:
    """A minority of volatile records (p in [0.6, 1)) among stable ones (p in [0, 0.05))."""
    rng = np.random.Generator(np.random.PCG64(seed))
    volatile = rng.random(n) < volatile_share
    return np.where(volatile, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.05, n))


def da_config(**training):
    return small_config(
        data={"deletion_prob_column": "p"},
        sharding={"shards": 3, "slices": 4, "strategy": "distribution_aware"},
        training={"executor": "loop", **training},
    )


@pytest.fixture
def volatile_table(tabular):
    df = tabular.copy()
    df["p"] = deletion_probabilities(len(df), seed=3)
    return df


def test_deletion_under_distribution_aware_placement_is_exact(tmp_path, volatile_table):
    run, _ = train(tmp_path / "run", da_config(), volatile_table)
    assert "p" not in run.config().data.features  # the probability steers placement, it is never a feature
    active = run.index().active.merge(volatile_table[["record_id", "p"]], on="record_id")
    volatile = active[active["p"] > VOLATILE_THRESHOLD]
    assert len(volatile) > 40 and (volatile["slice"] == 3).all()

    # a volatile record sits in the last slice: forgetting it retrains one slice step of one shard
    one = volatile.iloc[0]
    receipt = delete(run.root, [one["record_id"]])
    assert receipt["slices_retrained"] == {str(one["shard"]): [3]}

    stable = active[(active["p"] <= VOLATILE_THRESHOLD) & (active["slice"] == 0)].iloc[0]
    more = [stable["record_id"], volatile.iloc[1]["record_id"], volatile.iloc[2]["record_id"]]
    delete(run.root, more)
    gone = [one["record_id"], *more]
    fresh, _ = train(tmp_path / "fresh", da_config(), volatile_table[~volatile_table["record_id"].isin(gone)])
    assert_runs_identical(fresh, run)


def _placements(n: int, shards: int, slices: int, p: np.ndarray):
    ids = pd.Series(np.arange(n))
    kw = {"shards": shards, "slices": slices, "seed": 11}
    return (
        place(ids, ids, strategy="uniform", **kw),
        place(ids, ids, strategy="distribution_aware", deletion_prob=p, **kw),
    )


@pytest.mark.parametrize("K", [1, 8])
def test_expected_cost_is_lower_than_uniform(K):
    n, S, R = 20_000, 20, 10
    p = deletion_probabilities(n, seed=4)
    uniform, aware = _placements(n, S, R, p)
    kw = {"shards": S, "slices": R, "epochs": 10.0, "requests": K}
    cost_u = placement_cost(uniform["shard"], uniform["slice"], p, **kw)
    cost_a = placement_cost(aware["shard"], aware["slice"], p, **kw)
    # ~90 % of requests fall on the volatile 10 %, which now cost one slice step instead of ~R/3 on average
    assert cost_a < 0.5 * cost_u
    # the shards stay as balanced as uniform placement (the shard choice is the uniform one) ...
    np.testing.assert_array_equal(aware["shard"].to_numpy(), uniform["shard"].to_numpy())
    # ... and the training budget shrinks a little: volatile records train only in the last step
    budget = {
        name: placement_training_cost(f["shard"], f["slice"], shards=S, slices=R, epochs=10.0)
        for name, f in (("uniform", uniform), ("aware", aware))
    }
    assert 0.85 * budget["uniform"] < budget["aware"] < budget["uniform"]


def test_stable_records_keep_their_uniform_place():
    n, S, R = 5_000, 10, 5
    p = deletion_probabilities(n, seed=5)
    uniform, aware = _placements(n, S, R, p)
    stable = p <= VOLATILE_THRESHOLD
    pd.testing.assert_frame_equal(aware[stable], uniform[stable])
    assert (aware["slice"][~stable] == R - 1).all()
    # with nothing volatile the placement is the uniform one, so it costs exactly what uniform costs
    calm = np.full(n, 0.01)
    uniform, aware = _placements(n, S, R, calm)
    pd.testing.assert_frame_equal(aware, uniform)
