"""The persistent record index: round trips, vectorised lookups, HMAC tombstones without plain IDs."""

from __future__ import annotations

import hashlib
import hmac
import time

import numpy as np
import pandas as pd
import pytest

from sisa.exceptions import IntegrityError
from sisa.sharding import place
from sisa.store.files import read_verified
from sisa.store.index import RecordIndex, coerce_ids, keyed_id_hashes

SECRET = bytes(range(32))
SHARDS = 3


def reader(root, sha: dict[str, str]):
    return lambda rel: read_verified(root / rel, sha[rel])


def build(ids: pd.Series, subjects: pd.Series | None = None) -> RecordIndex:
    keys = subjects if subjects is not None else ids
    return RecordIndex.build(ids, place(keys, ids, shards=SHARDS, slices=2, seed=4), subjects)


def emails(n: int) -> pd.Series:
    return pd.Series([f"person{i}@example.org" for i in range(n)], dtype="str")


@pytest.mark.parametrize(
    "ids", [pd.Series(np.arange(50, dtype=np.int64) * 3), emails(50)], ids=["int", "email"]
)
def test_save_load_round_trip(tmp_path, ids):
    idx = build(ids)
    idx.remove(np.array([4, 9]), SECRET, "req-1")
    sha = idx.save(tmp_path, SHARDS)
    assert sorted(sha) == [
        "index/shard-000.arrow",
        "index/shard-001.arrow",
        "index/shard-002.arrow",
        "tombstones.arrow",
    ]
    back = RecordIndex.load(reader(tmp_path, sha), SHARDS)
    order = ["shard", "slice", "order"]  # files hold one shard each: rows come back grouped by shard
    pd.testing.assert_frame_equal(
        back.active.sort_values(order, kind="stable").reset_index(drop=True),
        idx.active.sort_values(order, kind="stable").reset_index(drop=True),
        check_dtype=False,
    )
    assert sorted(back.active["record_id"].tolist()) == sorted(idx.active["record_id"].tolist())
    assert back.active["shard"].dtype == np.int32 and back.active["order"].dtype == np.uint64
    assert back.tombstones["id_hash"].tolist() == idx.tombstones["id_hash"].tolist()
    assert back.tombstones["request_id"].tolist() == ["req-1", "req-1"]
    if pd.api.types.is_integer_dtype(ids):
        assert pd.api.types.is_integer_dtype(back.active["record_id"])


def test_load_verifies_checksums(tmp_path):
    idx = build(pd.Series(np.arange(10)))
    sha = idx.save(tmp_path, SHARDS)
    with pytest.raises(IntegrityError) as err:
        RecordIndex.load(reader(tmp_path, {**sha, "index/shard-001.arrow": "0" * 64}), SHARDS)
    assert str(err.value) == (
        f"integrity check failed for {tmp_path / 'index/shard-001.arrow'}: checksum mismatch (file changed or "
        "truncated) (run `sisa repair` to rebuild it)"
    )


def test_only_the_changed_shards_are_rewritten(tmp_path):
    idx = build(pd.Series(np.arange(30)))
    gone = int(idx.active["shard"].iloc[5])
    idx.remove(np.array([5]), SECRET, "r")
    assert idx.changed == {gone}
    assert sorted(idx.to_bytes(idx.changed)) == sorted(["tombstones.arrow", f"index/shard-{gone:03d}.arrow"])
    assert list(idx.to_bytes(idx.changed))[0] == "tombstones.arrow"  # written first


def test_positions_of_100k_ids_is_vectorised():
    n = 100_000
    ids = pd.Series(np.arange(n, dtype=np.int64) * 2 + 1)
    idx = build(ids)
    rng = np.random.Generator(np.random.PCG64(0))
    wanted = rng.permutation(ids.to_numpy())
    t0 = time.perf_counter()
    pos = idx.positions_of(list(wanted))
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed
    np.testing.assert_array_equal(idx.active["record_id"].to_numpy()[pos], wanted)
    t0 = time.perf_counter()
    as_text = idx.positions_of([str(v) for v in wanted])  # IDs from a CLI or a file arrive as text
    assert time.perf_counter() - t0 < 1.0
    np.testing.assert_array_equal(as_text, pos)
    t0 = time.perf_counter()
    assert idx.unknown(list(wanted[:50_000]) + [0, -2]) == [0, -2]
    assert time.perf_counter() - t0 < 1.0


def test_positions_of_string_ids_and_unknowns():
    idx = build(emails(20))
    pos = idx.positions_of(["person3@example.org", "nobody@example.org", "person0@example.org"])
    assert pos[1] == -1
    assert idx.active["record_id"].iloc[pos[[0, 2]]].tolist() == [
        "person3@example.org",
        "person0@example.org",
    ]
    assert idx.unknown(["person3@example.org", "nobody@example.org"]) == ["nobody@example.org"]


def test_int_ids_do_not_match_lookalikes():
    idx = build(pd.Series(np.arange(10)))
    assert idx.positions_of(["3", 3, 3.0]).tolist() == [idx.positions_of([3])[0]] * 3
    # neither True (== 1) nor 3.7 (int() -> 3) may select a record
    assert idx.positions_of([True, 3.7, "x", 99]).tolist() == [-1, -1, -1, -1]
    assert idx.unknown([True, 3.7, "x", 99, 5]) == [True, 3.7, "x", 99]
    assert coerce_ids([np.int64(4), "7", True], idx.active["record_id"]) == [4, 7, "True"]


def test_tombstones_answer_already_deleted_without_plain_ids(tmp_path):
    ids = emails(30)
    idx = build(ids)
    pos = idx.positions_of(["person7@example.org", "person8@example.org"])
    idx.remove(pos, SECRET, "req-9")
    assert "person7@example.org" not in set(idx.active["record_id"])
    assert len(idx.active) == 28
    assert idx.already_deleted(["person7@example.org", "person1@example.org", "x@y.z"], SECRET) == [
        "person7@example.org"
    ]
    assert idx.unknown(["person7@example.org", "person1@example.org"]) == ["person7@example.org"]
    # a different run (secret) cannot recognise the tombstone
    assert idx.already_deleted(["person7@example.org"], bytes(32)) == []
    # the tombstone is HMAC-SHA256 under the run secret with a kind prefix, never the ID
    expected = hmac.new(SECRET, b"record:person7@example.org", hashlib.sha256).hexdigest()
    assert expected in set(idx.tombstones["id_hash"])
    assert keyed_id_hashes(["person7@example.org"], SECRET) == [expected]
    idx.save(tmp_path, SHARDS)
    for name in ("tombstones.arrow", *(f"index/shard-{s:03d}.arrow" for s in range(SHARDS))):
        blob = (tmp_path / name).read_bytes()
        assert b"person7@example.org" not in blob and b"person8@example.org" not in blob
        assert hashlib.sha256(b"person7@example.org").hexdigest().encode() not in blob


def test_a_hash_is_tombstoned_once_its_first_tombstone_kept_and_the_file_round_trips(tmp_path):
    idx = build(emails(30))
    idx.remove(idx.positions_of(["person1@example.org", "person2@example.org"]), SECRET, "req-1")
    first = list(idx.tombstones["id_hash"])
    idx.tombstone(["c" * 64, first[0], "c" * 64, "d" * 64], "content", "req-2")
    got = idx.tombstones[["id_hash", "kind", "request_id"]].values.tolist()
    assert got == [
        [first[0], "record", "req-1"],  # already there: its first tombstone stays
        [first[1], "record", "req-1"],
        ["c" * 64, "content", "req-2"],  # new ones once each, in the order given
        ["d" * 64, "content", "req-2"],
    ]
    shas = idx.save(tmp_path, SHARDS)
    again = RecordIndex.load(reader(tmp_path, shas), SHARDS)
    assert again.tombstones[["id_hash", "kind", "request_id"]].values.tolist() == got


def test_int_ids_tombstoned_by_canonical_text():
    idx = build(pd.Series(np.arange(10)))
    idx.remove(idx.positions_of([4]), SECRET, "r")
    assert idx.already_deleted(["4", 4, 5], SECRET) == ["4", 4]


def test_subject_rows_and_tombstones():
    ids = pd.Series(np.arange(6))
    subjects = pd.Series(["ann", "bob", "ann", "cy", "bob", "ann"], dtype="str")
    idx = build(ids, subjects)
    assert sorted(idx.positions_of(["ann"], "subject_id").tolist()) == [0, 2, 5]
    pos = idx.positions_of(["ann"], "subject_id")
    idx.remove(pos, SECRET, "r", subject_hashes=keyed_id_hashes(["ann"], SECRET, "subject"))
    assert idx.already_deleted(["ann", "bob"], SECRET, "subject") == ["ann"]
    assert idx.already_deleted([0, 1], SECRET, "record") == [0]
    assert sorted(idx.active["record_id"].tolist()) == [1, 3, 4]


def test_shard_rows_order_and_counts():
    idx = build(pd.Series(np.arange(300)))
    for s in range(3):
        rows = idx.shard_rows(s)
        key = list(zip(rows["slice"], rows["order"], strict=True))
        assert key == sorted(key)
    counts = idx.counts(3, 2)
    assert counts.shape == (3, 2) and counts.sum() == 300
    assert (
        counts.tolist()
        == (
            pd.crosstab(idx.active["shard"], idx.active["slice"])
            .reindex(index=[0, 1, 2], columns=[0, 1])
            .to_numpy()
        ).tolist()
    )
