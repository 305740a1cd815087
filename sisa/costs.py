"""Expected retraining cost of unlearning, in samples (one sample = one row through one training pass).

These are the analytic limits the benchmark compares measured wall times against (docs/design.md §1; Bourtoule et al.,
IEEE S&P 2021, §V). With N records, S shards, R slices and e epochs for an unsliced shard, slice step k of a
shard trains on slices 0..k for e_s = 2e/(R+1) epochs, so training everything costs e·N samples whatever S and R.

- :func:`full_retrain_cost`: e·N, retraining from scratch.
- :func:`single_request_cost`: one deletion, uniformly random record: e·D·(2/3 + 1/(3R)), D = N/S.
- :func:`batched_requests_cost`: K deletions served as one request: (e'·N/R²)·Σ_{i=1..R} i·[1 − (1 − i/(R·S))^K]
  with e' = 2R/(R+1)·e.
- :func:`placement_cost`: the same expectation for a concrete placement (per-record shard and slice) when
  deletion requests pick records with probability proportional to a per-record weight (the deletion
  probability); with equal weights and perfectly balanced shards and slices it equals the formula above. This
  is what distribution-aware placement (``sharding.distribution_aware``) lowers.

Costs count samples, not seconds: per-checkpoint and per-request fixed costs are what the benchmark measures on
top of them.
"""

from __future__ import annotations

import numpy as np


def _check(n: float, shards: int, slices: int, epochs: float, requests: int = 1) -> None:
    problems = []
    if not n > 0:
        problems.append(f"n: expected a number of records > 0, got {n!r}")
    if not (isinstance(shards, (int, np.integer)) and shards >= 1):
        problems.append(f"shards: expected an integer >= 1, got {shards!r}")
    if not (isinstance(slices, (int, np.integer)) and slices >= 1):
        problems.append(f"slices: expected an integer >= 1, got {slices!r}")
    if not epochs > 0:
        problems.append(f"epochs: expected a number > 0, got {epochs!r}")
    if not (isinstance(requests, (int, np.integer)) and requests >= 1):
        problems.append(f"requests: expected an integer >= 1, got {requests!r}")
    if problems:
        raise ValueError("; ".join(problems))


def full_retrain_cost(n: float, epochs: float) -> float:
    """Samples to retrain from scratch: e·N (the same for one model or for all S shards with R slices)."""
    _check(n, 1, 1, epochs)
    return float(epochs) * float(n)


def single_request_cost(n: float, shards: int, slices: int, epochs: float) -> float:
    """Expected samples retrained for one deletion of a uniformly random record: e·(N/S)·(2/3 + 1/(3R))."""
    _check(n, shards, slices, epochs)
    return float(epochs) * (float(n) / shards) * (2.0 / 3.0 + 1.0 / (3.0 * slices))


def batched_requests_cost(n: float, shards: int, slices: int, epochs: float, requests: int) -> float:
    """Expected samples retrained when ``requests`` uniformly random deletions are served as one batch.

    Slice step i (1-based) of a shard is retrained when any request falls in that shard at a slice <= i, which
    happens with probability 1 − (1 − i/(R·S))^K; it trains on i·N/(S·R) rows for 2e/(R+1) epochs.
    """
    _check(n, shards, slices, epochs, requests)
    R, S = slices, shards
    i = np.arange(1, R + 1, dtype=np.float64)
    hit = 1.0 - (1.0 - i / (R * S)) ** requests
    e_prime = 2.0 * R / (R + 1) * float(epochs)
    return float(e_prime * float(n) / R**2 * float((i * hit).sum()))


def expected_speedup(shards: int, slices: int, requests: int = 1) -> float:
    """Full retrain cost over the expected cost of ``requests`` batched deletions (independent of N and e)."""
    return full_retrain_cost(1.0, 1.0) / batched_requests_cost(1.0, shards, slices, 1.0, requests)


def placement_training_cost(
    shard: np.ndarray, slice_: np.ndarray, *, shards: int, slices: int, epochs: float
) -> float:
    """Samples to train a concrete placement from scratch: Σ over shards and steps k of 2e/(R+1)·rows(0..k).

    e·N when every slice holds 1/R of its shard; less when records crowd into late slices (as volatile records
    do under distribution-aware placement), which also means those records are trained for fewer epochs.
    """
    rows, _ = _grids(shard, slice_, None, shards, slices, epochs, 1)
    return float(2.0 * float(epochs) / (slices + 1) * rows.cumsum(axis=1).sum())


def placement_cost(
    shard: np.ndarray,
    slice_: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    shards: int,
    slices: int,
    epochs: float,
    requests: int = 1,
) -> float:
    """Expected samples retrained by ``requests`` deletions under a concrete placement.

    Each request deletes one record drawn (with replacement) with probability proportional to ``weights``
    (e.g. per-record deletion probabilities; ``None`` = uniform). Step k of shard s trains on the records in
    slices 0..k of s for 2e/(R+1) epochs and is retrained when at least one request hits one of them.
    """
    rows, mass = _grids(shard, slice_, weights, shards, slices, epochs, requests)
    hit = 1.0 - (1.0 - np.minimum(mass.cumsum(axis=1), 1.0)) ** requests
    return float(2.0 * float(epochs) / (slices + 1) * (rows.cumsum(axis=1) * hit).sum())


def _grids(shard, slice_, weights, shards: int, slices: int, epochs: float, requests: int):
    """Validated [S, R] grids: records per (shard, slice) and the share of deletion weight there."""
    shard = np.asarray(shard, dtype=np.int64)
    slice_ = np.asarray(slice_, dtype=np.int64)
    _check(max(len(shard), 1), shards, slices, epochs, requests)
    w = np.ones(len(shard)) if weights is None else np.asarray(weights, dtype=np.float64)
    problems = []
    if len(slice_) != len(shard) or len(w) != len(shard):
        problems.append(
            f"shard, slice_ and weights must have the same length, got {len(shard)}, {len(slice_)}, {len(w)}"
        )
    elif len(shard) and (
        shard.min() < 0 or shard.max() >= shards or slice_.min() < 0 or slice_.max() >= slices
    ):
        problems.append(f"placement out of range: shards must be in [0, {shards}), slices in [0, {slices})")
    elif len(shard) and (not np.isfinite(w).all() or w.min() < 0 or w.sum() <= 0):
        problems.append("weights: expected finite non-negative numbers with a positive sum")
    if problems:
        raise ValueError("; ".join(problems))
    rows = np.zeros((shards, slices))
    mass = np.zeros((shards, slices))
    if len(shard):
        np.add.at(rows, (shard, slice_), 1.0)
        np.add.at(mass, (shard, slice_), w / w.sum())
    return rows, mass
