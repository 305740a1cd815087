"""The paper's expected-cost formulas (docs/design.md §1) and the expected cost of a concrete placement."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sisa.costs import (
    batched_requests_cost,
    expected_speedup,
    full_retrain_cost,
    placement_cost,
    placement_training_cost,
    single_request_cost,
)


def test_paper_settings_give_the_speedups_design_quotes():
    # Purchase: S=20, R=50, a batch of K=8 -> 4.23x; SVHN: K=18 -> 2.24x (docs/design.md §1)
    assert expected_speedup(20, 50, 8) == pytest.approx(4.2306, abs=1e-4)
    assert expected_speedup(20, 50, 18) == pytest.approx(2.2369, abs=1e-4)


def test_one_request_costs_s_times_3r_over_2r_plus_1_less_than_a_full_retrain():
    for S, R in [(1, 1), (5, 1), (20, 50), (7, 3)]:
        single = single_request_cost(1000, S, R, 4.0)
        assert single == pytest.approx(4.0 * 1000 / S * (2 / 3 + 1 / (3 * R)))
        assert full_retrain_cost(1000, 4.0) / single == pytest.approx(S * 3 * R / (2 * R + 1))
        # the batched formula with K=1 is the same expectation
        assert batched_requests_cost(1000, S, R, 4.0, 1) == pytest.approx(single, rel=1e-12)


def test_batched_cost_grows_with_k_and_tends_to_a_full_retrain():
    costs = [batched_requests_cost(10_000, 10, 5, 2.0, k) for k in (1, 2, 8, 64, 100_000)]
    assert costs == sorted(costs)
    assert costs[-1] == pytest.approx(full_retrain_cost(10_000, 2.0), rel=1e-9)
    # without slicing, K requests retrain each shard hit once, in full: S·(1 - (1 - 1/S)^K) shards of e·N/S
    assert batched_requests_cost(600, 3, 1, 2.0, 4) == pytest.approx(2.0 * 600 * (1 - (2 / 3) ** 4))


def _balanced(n_per_cell: int, shards: int, slices: int):
    cells = [(s, k) for s in range(shards) for k in range(slices)]
    shard = np.repeat([c[0] for c in cells], n_per_cell)
    slice_ = np.repeat([c[1] for c in cells], n_per_cell)
    return shard, slice_


@pytest.mark.parametrize("K", [1, 3, 8])
def test_a_balanced_placement_with_uniform_weights_costs_what_the_formula_says(K):
    S, R = 4, 5
    shard, slice_ = _balanced(30, S, R)
    n = len(shard)
    expected = batched_requests_cost(n, S, R, 3.0, K)
    assert placement_cost(shard, slice_, shards=S, slices=R, epochs=3.0, requests=K) == pytest.approx(
        expected
    )
    assert placement_training_cost(shard, slice_, shards=S, slices=R, epochs=3.0) == pytest.approx(3.0 * n)


def test_placement_cost_equals_brute_force_expectation():
    """Enumerate every ordered pair of weighted draws on a tiny unbalanced placement."""
    shard = np.array([0, 0, 0, 1, 1, 1, 1])
    slice_ = np.array([0, 1, 1, 0, 0, 1, 2])
    w = np.array([0.1, 0.5, 0.05, 0.2, 0.0, 0.9, 0.3])
    S, R, e = 2, 3, 2.0
    p = w / w.sum()
    expected = 0.0
    for draws in itertools.product(range(len(shard)), repeat=2):
        cost = 0.0
        for s in range(S):
            hit = [slice_[d] for d in draws if shard[d] == s]
            if hit:  # retrain from the earliest hit slice: steps k >= min, each over slices 0..k
                rows = [(slice_[shard == s] <= k).sum() for k in range(min(hit), R)]
                cost += 2 * e / (R + 1) * sum(rows)
        expected += np.prod(p[list(draws)]) * cost
    got = placement_cost(shard, slice_, w, shards=S, slices=R, epochs=e, requests=2)
    assert got == pytest.approx(expected, rel=1e-12)


def test_late_slices_cost_less_to_delete_from():
    shard, slice_ = _balanced(10, 2, 4)
    last = (slice_ == 3).astype(float)
    first = (slice_ == 0).astype(float)
    kw = {"shards": 2, "slices": 4, "epochs": 1.0}
    assert placement_cost(shard, slice_, last, **kw) < placement_cost(shard, slice_, **kw)
    assert placement_cost(shard, slice_, **kw) < placement_cost(shard, slice_, first, **kw)
    # a request that can only hit the last slice retrains one step: the whole shard for 2e/(R+1) epochs
    assert placement_cost(shard, slice_, last, **kw) == pytest.approx(2 / 5 * 40)


def test_bad_arguments_are_named_all_at_once():
    with pytest.raises(ValueError) as err:
        batched_requests_cost(0, 0, 2, -1.0, 0)
    assert str(err.value) == (
        "n: expected a number of records > 0, got 0; shards: expected an integer >= 1, got 0; "
        "epochs: expected a number > 0, got -1.0; requests: expected an integer >= 1, got 0"
    )
    with pytest.raises(
        ValueError, match=r"^shard, slice_ and weights must have the same length, got 2, 1, 2$"
    ):
        placement_cost([0, 1], [0], [1.0, 1.0], shards=2, slices=2, epochs=1.0)
    with pytest.raises(
        ValueError, match=r"^placement out of range: shards must be in \[0, 2\), slices in \[0, 2\)$"
    ):
        placement_cost([0, 2], [0, 0], shards=2, slices=2, epochs=1.0)
    with pytest.raises(
        ValueError, match=r"^weights: expected finite non-negative numbers with a positive sum$"
    ):
        placement_cost([0, 1], [0, 0], [0.0, -1.0], shards=2, slices=2, epochs=1.0)
