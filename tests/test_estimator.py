"""The Python API: fit / predict / predict_proba / delete / status, and loading a run in a new object."""

from __future__ import annotations

import numpy as np
import pytest

from sisa.estimator import SisaClassifier
from sisa.exceptions import DataError, RunStateError, UnknownRecordError
from sisa.tables.datasets import make_tabular
from tests.conftest import feature_matrix, small_config


@pytest.fixture
def fitted(tmp_path, tabular):
    return SisaClassifier(small_config(), run_dir=tmp_path / "run").fit(tabular), tabular


def test_fit_predict_and_proba(fitted):
    clf, df = fitted
    assert clf.classes_ == ["a", "b", "c"]
    assert clf.feature_names_ == [f"x{j}" for j in range(6)]
    proba = clf.predict_proba(df)
    assert proba.shape == (600, 3) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    pred = clf.predict(df)
    assert pred.tolist() == [clf.classes_[i] for i in proba.argmax(axis=1)]
    # a plain array in feature order gives the same answer as the named columns
    assert np.array_equal(clf.predict_proba(feature_matrix(df)), proba)
    # columns in another order (and extra ones) are matched by name
    shuffled = df[["x5", "label", "x0", "x3", "x1", "x4", "x2", "record_id"]]
    assert np.array_equal(clf.predict_proba(shuffled), proba)


def test_load_in_a_new_object_gives_the_same_predictions(fitted, tmp_path):
    clf, df = fitted
    again = SisaClassifier.load(tmp_path / "run")
    assert again is not clf
    assert again.config == clf.config
    assert np.array_equal(again.predict_proba(df), clf.predict_proba(df))
    assert again.predict(df).tolist() == clf.predict(df).tolist()


def test_delete_then_status_and_reload(fitted, tmp_path):
    clf, df = fitted
    before = clf.predict_proba(df)
    receipt = clf.delete([0, 1, 2])
    assert receipt["status"] == "applied" and receipt["records_deleted"] == 3
    assert receipt["generation"] == 3
    st = clf.status()
    assert (st["records_active"], st["records_deleted"], st["generation"]) == (597, 3, 3)
    assert (st["shards"], st["slices"], st["model"], st["device"]) == (3, 3, "mlp", "cpu")
    assert st["shards_serving"] == [0, 1, 2] and st["shards_retraining"] == []
    assert sum(st["shard_records"]) == 597 and np.array(st["slice_records"]).sum() == 597
    after = clf.predict_proba(df)
    assert not np.array_equal(after, before)  # the retrained shards answer differently
    assert np.array_equal(SisaClassifier.load(tmp_path / "run").predict_proba(df), after)
    again = clf.delete(["1", 3])  # IDs from text are matched to the integer IDs
    assert again["records_deleted"] == 1 and again["already_deleted"] == ["1"]
    with pytest.raises(UnknownRecordError) as err:
        clf.delete([600, 601])
    assert str(err.value) == "unknown record IDs, nothing was changed: 600, 601"


def test_fit_from_config_file_with_data_paths(tmp_path):
    df = make_tabular(120, seed=5, n_features=3, n_classes=2, id_kind="email")
    df.iloc[:100].to_csv(tmp_path / "train.csv", index=False)
    df.iloc[100:].to_parquet(tmp_path / "test.parquet")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"data: {{train: {tmp_path / 'train.csv'}, test: {tmp_path / 'test.parquet'}}}\n"
        "sharding: {shards: 2, slices: 2}\nmodel: {hidden: [8]}\ntraining: {epochs: 1, progress: false}\n"
    )
    clf = SisaClassifier(cfg, run_dir=tmp_path / "run", overrides=["training.seed=3"]).fit()
    assert clf.config.training.seed == 3
    assert clf.classes_ == [0, 1]
    st = clf.status()
    assert st["records_active"] == 100 and st["test_accuracy"] is not None
    assert set(st["shard_accuracy"]) == {"0", "1"}
    assert clf.predict(df.iloc[100:]).dtype == object
    assert set(clf.predict(df.iloc[100:]).tolist()) <= {0, 1}


def test_dict_config_and_errors(tmp_path, tabular):
    clf = SisaClassifier(
        {"sharding": {"shards": 2, "slices": 2}, "training": {"epochs": 1, "progress": False}}
    )
    with pytest.raises(RunStateError) as err:
        clf.predict(tabular)
    assert str(err.value) == "this classifier has no run directory yet; call fit() or SisaClassifier.load()"
    with pytest.raises(RunStateError) as err:
        clf.fit(tabular)
    assert str(err.value) == "fit needs a run directory: SisaClassifier(config, run_dir='runs/name')"
    clf.fit(tabular, run_dir=tmp_path / "run")
    with pytest.raises(DataError) as err:
        clf.predict(tabular[["x0", "x1"]])
    assert str(err.value) == "prediction input: missing feature columns ['x2', 'x3', 'x4', 'x5']"
    with pytest.raises(RunStateError) as err:
        SisaClassifier(clf.config, run_dir=tmp_path / "run").fit(tabular)
    assert (
        str(err.value) == f"{tmp_path / 'run'} already holds a run; choose another --run folder or delete it"
    )
    with pytest.raises(RunStateError) as err:
        SisaClassifier.load(tmp_path / "missing")
    assert (
        str(err.value)
        == f"{tmp_path / 'missing'} is not a sisa run (no config.yaml); create one with `sisa train`"
    )


def test_overrides_apply_to_every_kind_of_config(tmp_path):
    base = small_config()
    assert SisaClassifier(base, overrides=["sharding.shards=9"]).config.sharding.shards == 9
    assert base.sharding.shards == 3  # the caller's object is not modified
    assert (
        SisaClassifier({"sharding": {"shards": 2}}, overrides=["sharding.shards=4"]).config.sharding.shards
        == 4
    )
    assert SisaClassifier(overrides=["training.seed=6"]).config.training.seed == 6
    path = tmp_path / "c.yaml"
    path.write_text("sharding: {shards: 2}\n")
    assert SisaClassifier(path, overrides=["sharding.shards=5"]).config.sharding.shards == 5


def test_library_resume_of_missing_run_is_a_clear_error(tmp_path):
    from sisa.fitting import train

    with pytest.raises(RunStateError):
        train(tmp_path / "none", None, resume=True)  # type: ignore[arg-type]
