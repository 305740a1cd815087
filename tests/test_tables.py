"""Input tables: the three formats, every validation problem named with column and rows, frozen classes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sisa.config import DataConfig
from sisa.estimator import SisaClassifier
from sisa.exceptions import DataError
from sisa.fitting import train
from sisa.tables.datasets import make_tabular
from sisa.tables.table import features_for_prediction, read_table, validate_table
from sisa.unlearning import delete
from tests.conftest import small_config

CFG = DataConfig()


def table(n=8, id_kind="int", string_labels=True):
    return make_tabular(n, seed=1, n_features=2, n_classes=2, id_kind=id_kind, string_labels=string_labels)


def problems(df, **kw) -> str:
    with pytest.raises(DataError) as err:
        validate_table(df, CFG, "train.csv", **kw)
    return str(err.value)


def save(df: pd.DataFrame, path, fmt: str):
    if fmt == "parquet":
        df.to_parquet(path, index=False)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        ids = df["record_id"].to_numpy()
        ids = ids.astype(str) if ids.dtype.kind not in "iu" else ids
        np.savez(path, record_id=ids, label=df["label"].to_numpy(dtype=str), x=df[["x0", "x1"]].to_numpy())


@pytest.mark.parametrize("fmt", ["parquet", "csv", "npz"])
@pytest.mark.parametrize("id_kind", ["int", "email"])
def test_formats_round_trip(tmp_path, fmt, id_kind):
    df = table(id_kind=id_kind)
    path = tmp_path / f"t.{fmt}"
    save(df, path, fmt)
    t = validate_table(read_table(path), CFG, str(path))
    if id_kind == "int":
        assert pd.api.types.is_integer_dtype(t.ids) and t.ids.tolist() == list(range(8))
    else:
        assert t.ids.tolist() == [f"user{i}@example.com" for i in range(8)]
    assert t.classes == ["a", "b"]
    assert t.labels.tolist() == [["a", "b"].index(v) for v in df["label"]]
    assert t.features.dtype == np.float32 and t.features.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(t.features, df[["x0", "x1"]].to_numpy(np.float32))
    assert t.feature_names == ["x0", "x1"]  # npz: the 2-D array "x" becomes x0, x1


def test_npz_object_array_is_refused_without_pickle(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, record_id=np.arange(3), label=np.array(["a", "b", None], dtype=object))
    with pytest.raises(DataError) as err:
        read_table(path)
    assert str(err.value) == (
        f"{path}: array 'label' is an object array, which cannot be read without pickle; "
        "save strings as a fixed-width str array (np.asarray(values, dtype=str))"
    )


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(DataError) as err:
        read_table(tmp_path / "t.xlsx")
    assert str(err.value) == f"{tmp_path / 't.xlsx'}: file does not exist"
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(DataError) as err:
        read_table(tmp_path / "t.xlsx")
    assert (
        str(err.value)
        == f"{tmp_path / 't.xlsx'}: unsupported file type '.xlsx'; expected .parquet, .csv or .npz"
    )


def test_duplicate_and_missing_ids_together():
    df = table(id_kind="email")
    df.loc[3, "record_id"] = df.loc[1, "record_id"]
    df.loc[5, "record_id"] = None
    assert problems(df) == (
        "train.csv: 2 problems:\n"
        "  - column 'record_id': missing record IDs at rows 5\n"
        "  - column 'record_id': duplicate record IDs ('user1@example.com') at rows 1, 3"
    )


def test_missing_int_id_from_csv_is_one_problem(tmp_path):
    df = table()
    df["record_id"] = df["record_id"].astype(float)
    df.loc[6, "record_id"] = np.nan
    df.to_csv(tmp_path / "t.csv", index=False)
    assert problems(read_table(tmp_path / "t.csv")) == (
        "train.csv: column 'record_id': missing record IDs at rows 6"
    )


def test_nan_labels():
    df = table()
    df.loc[2, "label"] = None
    df.loc[7, "label"] = None
    assert problems(df) == "train.csv: column 'label': missing/NaN labels at rows 2, 7"
    numeric = table(string_labels=False)
    numeric["label"] = numeric["label"].astype(float)
    numeric.loc[4, "label"] = np.nan
    assert problems(numeric) == "train.csv: column 'label': missing/NaN labels at rows 4"


def test_non_numeric_features_name_column_and_rows():
    df = table()
    df["x1"] = ["1", "2", "x", "4", "5", "?", "7", "8"]
    assert problems(df) == (
        "train.csv: column 'x1': non-numeric feature values at rows 2, 5 (e.g. 'x'); "
        "encode them as numbers or leave the column out of data.features"
    )


def test_nan_features_and_many_rows_are_capped():
    df = make_tabular(30, seed=1, n_features=2, n_classes=2)
    df.loc[3:20, "x0"] = np.inf
    assert problems(df) == (
        "train.csv: columns ['x0']: NaN or infinite feature values at rows 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 "
        "(and 8 more)"
    )


def test_empty_table():
    assert problems(table().iloc[:0]) == "train.csv: the table is empty (0 rows)"


def test_missing_columns():
    assert problems(table().drop(columns=["label"])) == (
        "train.csv: missing columns ['label']; the table has ['record_id', 'x0', 'x1']"
    )


def test_label_outside_frozen_classes():
    assert problems(table(), classes=["a"]) == (
        "train.csv: column 'label': labels ['b'] are not in the frozen class set ['a'] at rows 2, 5"
    )


def test_frozen_classes_keep_unseen_class_order():
    t = validate_table(table(), CFG, "t", classes=["b", "z", "a"])
    assert t.classes == ["b", "z", "a"]
    assert set(t.labels.tolist()) <= {0, 2}


def test_prediction_input_checks():
    names = ["x0", "x1"]
    with pytest.raises(DataError) as err:
        features_for_prediction(pd.DataFrame({"x0": [1.0]}), names)
    assert str(err.value) == "prediction input: missing feature columns ['x1']"
    with pytest.raises(DataError) as err:
        features_for_prediction(np.zeros((2, 3)), names)
    assert str(err.value) == "prediction input: expected shape [n, 2], got [2, 3]"
    with pytest.raises(DataError) as err:
        features_for_prediction(np.array([[1.0, np.nan]]), names)
    assert str(err.value) == "prediction input: NaN or infinite values at rows 0"
    out = features_for_prediction(pd.DataFrame({"x1": [2.0], "x0": [1.0], "other": ["z"]}), names)
    np.testing.assert_array_equal(out, np.array([[1.0, 2.0]], dtype=np.float32))


def test_frozen_class_set_survives_deleting_a_whole_class(tmp_path):
    """Deleting every row of class 'c' keeps the class list (and the probability column) of the run."""
    df = make_tabular(90, seed=3, n_features=4, n_classes=3, string_labels=True)
    cfg = small_config(sharding={"shards": 2, "slices": 2}, training={"epochs": 1})
    clf = SisaClassifier(cfg, run_dir=tmp_path / "run").fit(df)
    assert clf.classes_ == ["a", "b", "c"]
    gone = df.loc[df["label"] == "c", "record_id"].tolist()
    assert 0 < len(gone) < len(df)
    clf.delete(gone)
    again = SisaClassifier.load(tmp_path / "run")
    assert again.classes_ == ["a", "b", "c"]
    proba = again.predict_proba(df)
    assert proba.shape == (90, 3)
    assert again.status()["records_active"] == 90 - len(gone)


def test_config_class_list_is_frozen_in_its_order_with_unseen_classes(tmp_path):
    df = make_tabular(60, seed=3, n_features=3, n_classes=2, string_labels=True)
    cfg = small_config(
        sharding={"shards": 2, "slices": 2}, training={"epochs": 1}, data={"classes": ["b", "z", "a"]}
    )
    clf = SisaClassifier(cfg, run_dir=tmp_path / "run").fit(df)
    clf.delete(df.loc[df["label"] == "b", "record_id"].tolist())
    again = SisaClassifier.load(tmp_path / "run")
    assert again.classes_ == ["b", "z", "a"]
    assert again.predict_proba(df).shape == (60, 3)


def train_with_bad_test_table(tmp_path) -> None:
    """A test table with a class the training table lacks is refused (DataError naming label and rows)."""
    df = make_tabular(60, seed=1, n_features=3, n_classes=3, string_labels=True)
    df.to_parquet(tmp_path / "test.parquet")
    cfg = small_config(data={"test": str(tmp_path / "test.parquet")}, training={"epochs": 1})
    with pytest.raises(DataError, match=r"labels \['c'\] are not in the frozen class set \['a', 'b'\]"):
        train(tmp_path / "run", cfg, df.loc[df["label"] != "c"])


def test_test_table_labels_outside_training_classes(tmp_path):
    train_with_bad_test_table(tmp_path)


def test_bad_test_table_writes_nothing(tmp_path):
    train_with_bad_test_table(tmp_path)
    assert not list((tmp_path / "run").rglob("*.safetensors"))


def test_deletion_completes_when_test_table_went_bad(tmp_path):
    df = make_tabular(60, seed=1, n_features=3, n_classes=2, string_labels=True)
    df.to_parquet(tmp_path / "test.parquet")
    cfg = small_config(data={"test": str(tmp_path / "test.parquet")}, training={"epochs": 1})
    train(tmp_path / "run", cfg, df)
    bad = df.copy()
    bad.loc[0, "label"] = "new"
    bad.to_parquet(tmp_path / "test.parquet")
    receipt = delete(tmp_path / "run", [5])
    assert receipt["status"] == "applied"
