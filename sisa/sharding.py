"""Placement of records into shards and slices, and the order of rows inside a shard.

``uniform`` placement is a pure function of (placement key, seed): a keyed BLAKE2b hash of the key picks the
shard and the slice, so deleting a record (or a person) never moves anybody else (docs/design.md §2.1). The placement key
is the record ID, or the data-subject ID when the config names a subject column, so that all of one person's rows
share a shard and a slice. Inside a shard, rows are ordered by (slice, order key) where the order key is a keyed
hash of the record ID — again independent of every other record (docs/design.md §2.2).

``stratified`` balances the classes across shards: inside each class, placement keys are ranked by hash and dealt
round-robin. That depends on the other records, so its exactness is relative to the persisted index: "train,
then delete X" equals "train from scratch with the same index minus X" (the run keeps the index for that reason).

``distribution_aware`` (paper §VIII) takes a per-record deletion probability and places volatile records so a
deletion costs less: a key whose probability exceeds :data:`VOLATILE_THRESHOLD` moves to the last slice of its
shard, where a retrain is one slice step; every other key keeps its uniform shard and slice. So with no volatile
records the placement *is* the uniform one, and the shards stay as balanced as uniform. It stays a pure function
of (key, probability, seed). Alternatives measured with :mod:`sisa.costs` and rejected (docs/performance.md):
reserving the last slice for volatile keys only (stable keys crowd the other R-1 slices: 14 % dearer than uniform
when nothing is volatile) and concentrating volatile keys in a few shards (the shards grow, so it wins only for
batched requests and a narrow range of volatile shares, and unbalances the ensemble).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

# Records whose deletion probability exceeds this go to the last slice under ``distribution_aware``.
VOLATILE_THRESHOLD = 0.5


def canonical_keys(keys: pd.Series | np.ndarray | list) -> list[bytes]:
    """The bytes hashed for a key: its decimal or string form (so 7 read from CSV or Parquet is the same key)."""
    return [str(k.item() if isinstance(k, np.generic) else k).encode() for k in keys]


def keyed_hash64(keys: pd.Series | np.ndarray | list, seed: int, purpose: str) -> np.ndarray:
    """uint64 BLAKE2b-64 of each key, keyed by (seed, purpose). Deterministic across processes and machines."""
    key = f"sisa/{purpose}/{int(seed)}".encode()[:64]
    out = np.empty(len(keys), dtype=np.uint64)
    for i, b in enumerate(canonical_keys(keys)):
        out[i] = int.from_bytes(hashlib.blake2b(b, digest_size=8, key=key).digest(), "little")
    return out


def place(
    placement_keys: pd.Series,
    record_ids: pd.Series,
    *,
    shards: int,
    slices: int,
    seed: int,
    strategy: str = "uniform",
    labels: np.ndarray | None = None,
    deletion_prob: np.ndarray | None = None,
) -> pd.DataFrame:
    """Return a frame aligned with the inputs: ``shard``, ``slice`` (int32) and ``order`` (uint64)."""
    unique_keys, inverse = _factorize(placement_keys)
    h_shard = keyed_hash64(unique_keys, seed, "shard")
    h_slice = keyed_hash64(unique_keys, seed, "slice")
    if strategy == "uniform":
        shard_u = (h_shard % np.uint64(shards)).astype(np.int32)
        slice_u = (h_slice % np.uint64(slices)).astype(np.int32)
    elif strategy == "stratified":
        shard_u, slice_u = _stratified(h_shard, h_slice, inverse, labels, shards, slices)
    elif strategy == "distribution_aware":
        if deletion_prob is None:
            raise ValueError("distribution_aware placement needs deletion probabilities")
        shard_u = (h_shard % np.uint64(shards)).astype(np.int32)
        slice_u = _volatile_last(h_slice, inverse, deletion_prob, slices)
    else:
        raise ValueError(f"unknown sharding strategy {strategy!r}")
    order = keyed_hash64(list(record_ids), seed, "order")
    return pd.DataFrame({"shard": shard_u[inverse], "slice": slice_u[inverse], "order": order})


def _factorize(keys: pd.Series) -> tuple[list, np.ndarray]:
    codes, uniques = pd.factorize(pd.Series(keys).reset_index(drop=True), sort=False)
    return list(uniques), codes


def _stratified(h_shard, h_slice, inverse, labels, shards: int, slices: int):
    """Deal keys round-robin over shards inside each class (a key's class: that of its first row)."""
    if labels is None:
        raise ValueError("stratified placement needs labels")
    n_keys = len(h_shard)
    key_label = np.full(n_keys, -1, dtype=np.int64)
    first = np.unique(inverse, return_index=True)[1]
    key_label[inverse[first]] = np.asarray(labels)[first]
    shard_u = np.empty(n_keys, dtype=np.int32)
    slice_u = np.empty(n_keys, dtype=np.int32)
    for c in np.unique(key_label):
        members = np.flatnonzero(key_label == c)
        ranked = members[np.lexsort((members, h_shard[members]))]
        rank = np.arange(len(ranked))
        offset = int(h_shard[ranked[0]] % np.uint64(shards)) if len(ranked) else 0
        shard_u[ranked] = ((rank + offset) % shards).astype(np.int32)
        slice_u[ranked] = (h_slice[ranked] % np.uint64(slices)).astype(np.int32)
    return shard_u, slice_u


def _volatile_last(h_slice, inverse, deletion_prob, slices: int):
    """Uniform slices, except that volatile keys (their most volatile row above the threshold) go last."""
    n_keys = len(h_slice)
    key_prob = np.zeros(n_keys)
    np.maximum.at(key_prob, inverse, np.asarray(deletion_prob, dtype=np.float64))
    uniform = (h_slice % np.uint64(slices)).astype(np.int32)
    return np.where(key_prob > VOLATILE_THRESHOLD, slices - 1, uniform).astype(np.int32)


def shard_sizes(shard_of: np.ndarray, shards: int) -> np.ndarray:
    return np.bincount(np.asarray(shard_of, dtype=np.int64), minlength=shards)


def imbalance(sizes: np.ndarray) -> float:
    """Largest shard over the mean shard size, minus one (0.0 is perfect balance)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return float(sizes.max() / sizes.mean() - 1.0) if sizes.sum() else 0.0
