"""Placement: a pure function of (key, seed); balanced; stratified and distribution-aware strategies."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from sisa.sharding import VOLATILE_THRESHOLD, imbalance, keyed_hash64, place, shard_sizes

FAST = settings(max_examples=40, deadline=None)

int_keys = st.lists(st.integers(min_value=-(2**62), max_value=2**62), min_size=1, max_size=60, unique=True)
text_keys = st.lists(st.emails(), min_size=1, max_size=40, unique=True)
any_keys = st.one_of(int_keys, text_keys)


def placed(keys: list, seed: int, strategy: str = "uniform", shards: int = 5, slices: int = 4, **kw):
    s = pd.Series(keys)
    frame = place(s, s, shards=shards, slices=slices, seed=seed, strategy=strategy, **kw)
    return {
        k: (int(a), int(b), int(o))
        for k, a, b, o in zip(keys, frame["shard"], frame["slice"], frame["order"], strict=True)
    }


@FAST
@given(keys=any_keys, data=st.data(), seed=st.integers(0, 2**31))
def test_uniform_placement_depends_only_on_key_and_seed(keys, data, seed):
    """Removing records, adding others and shuffling the rows moves nobody (docs/design.md §2.1, §2.2)."""
    full = placed(keys, seed)
    subset = data.draw(st.lists(st.sampled_from(keys), unique=True), label="subset")
    extra = data.draw(st.lists(st.integers(2**62 + 1, 2**63 - 1), unique=True, max_size=10), label="extra")
    mixed = data.draw(st.permutations(subset + extra), label="rows")
    other = placed(mixed, seed) if mixed else {}
    for k in subset:
        assert other[k] == full[k]


@FAST
@given(keys=any_keys, data=st.data(), seed=st.integers(0, 2**31))
def test_distribution_aware_placement_is_pure_too(keys, data, seed):
    probs = {k: data.draw(st.floats(0, 1), label=f"p{k}") for k in keys}
    full = placed(keys, seed, "distribution_aware", deletion_prob=np.array([probs[k] for k in keys]))
    subset = data.draw(st.permutations(keys), label="rows")[: max(1, len(keys) // 2)]
    part = placed(subset, seed, "distribution_aware", deletion_prob=np.array([probs[k] for k in subset]))
    for k in subset:
        assert part[k] == full[k]


@FAST
@given(keys=any_keys)
def test_int_and_text_forms_of_a_key_hash_alike(keys):
    """7 read from CSV (int) and '7' typed on a command line are the same key."""
    as_text = [str(k) for k in keys]
    np.testing.assert_array_equal(keyed_hash64(keys, 3, "shard"), keyed_hash64(as_text, 3, "shard"))


def test_different_seeds_give_different_placements():
    ids = pd.Series(np.arange(2000))
    a = place(ids, ids, shards=5, slices=4, seed=0)
    b = place(ids, ids, shards=5, slices=4, seed=1)
    assert (a["shard"] != b["shard"]).mean() > 0.7  # 0.8 expected for independent draws
    assert (a["slice"] != b["slice"]).mean() > 0.65  # 0.75 expected
    assert (a["order"] != b["order"]).all()
    again = place(ids, ids, shards=5, slices=4, seed=0)
    pd.testing.assert_frame_equal(a, again)


def test_subject_key_places_all_rows_of_a_person_together():
    subjects = pd.Series(["ann", "bob", "ann", "cy", "bob", "ann"])
    records = pd.Series([10, 11, 12, 13, 14, 15])
    f = place(subjects, records, shards=4, slices=3, seed=9)
    for who in ("ann", "bob"):
        rows = f.loc[(subjects == who).to_numpy()]
        assert rows["shard"].nunique() == 1 and rows["slice"].nunique() == 1
    alone = place(pd.Series(["ann"]), pd.Series([12]), shards=4, slices=3, seed=9)
    assert (int(alone["shard"][0]), int(alone["slice"][0])) == (int(f["shard"][2]), int(f["slice"][2]))
    assert f["order"].nunique() == 6  # the in-shard order key is per record


def test_uniform_balance_100k_records_10_shards():
    ids = pd.Series(np.arange(100_000))
    f = place(ids, ids, shards=10, slices=4, seed=0)
    sizes = shard_sizes(f["shard"].to_numpy(), 10)
    assert sizes.sum() == 100_000
    assert imbalance(sizes) < 0.03
    assert sizes.min() / sizes.mean() > 0.97
    slices = np.bincount(f["slice"].to_numpy(), minlength=4)
    assert slices.max() / slices.mean() < 1.03


def test_imbalance_metric():
    assert imbalance(np.array([10, 10, 10])) == 0.0
    assert imbalance(np.array([5, 10, 15])) == 0.5
    assert imbalance(np.array([0, 0])) == 0.0


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=300),
    shards=st.integers(1, 7),
    seed=st.integers(0, 1000),
)
def test_stratified_per_class_counts_differ_by_at_most_one(labels, shards, seed):
    ids = pd.Series(np.arange(len(labels)) * 7 + 3)
    y = np.array(labels)
    f = place(ids, ids, shards=shards, slices=3, seed=seed, strategy="stratified", labels=y)
    for c in np.unique(y):
        counts = np.bincount(f["shard"].to_numpy()[y == c], minlength=shards)
        assert counts.max() - counts.min() <= 1, (c, counts)


def test_stratified_is_relative_to_the_persisted_placement():
    """Stratified placement looks at other records, so removing one may move others: hence the docs' caveat."""
    ids = pd.Series(np.arange(200))
    y = np.arange(200) % 2
    full = place(ids, ids, shards=4, slices=2, seed=0, strategy="stratified", labels=y)
    keep = np.arange(200) != int(np.flatnonzero(full["shard"].to_numpy() == 0)[0])
    part = place(ids[keep], ids[keep], shards=4, slices=2, seed=0, strategy="stratified", labels=y[keep])
    assert (part["shard"].to_numpy() != full["shard"].to_numpy()[keep]).any()


def test_distribution_aware_volatile_rows_go_last():
    n = 1000
    ids = pd.Series(np.arange(n))
    prob = np.random.Generator(np.random.PCG64(5)).random(n)
    f = place(ids, ids, shards=4, slices=5, seed=2, strategy="distribution_aware", deletion_prob=prob)
    volatile = prob > VOLATILE_THRESHOLD
    assert (f["slice"].to_numpy()[volatile] == 4).all()
    # stable rows keep their uniform slice and every row keeps its uniform shard
    u = place(ids, ids, shards=4, slices=5, seed=2)
    np.testing.assert_array_equal(f["slice"].to_numpy()[~volatile], u["slice"].to_numpy()[~volatile])
    assert set(f["slice"].to_numpy()[~volatile]) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(f["shard"].to_numpy(), u["shard"].to_numpy())


def test_distribution_aware_subject_uses_its_most_volatile_row():
    subjects = pd.Series(["a", "a", "b"])
    f = place(
        subjects,
        pd.Series([1, 2, 3]),
        shards=2,
        slices=3,
        seed=0,
        strategy="distribution_aware",
        deletion_prob=np.array([0.1, 0.9, 0.2]),
    )
    assert f["slice"].tolist()[:2] == [2, 2]
