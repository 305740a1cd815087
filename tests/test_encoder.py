"""The one encoder (sisa/tables/encoder.py): raw tables as they come, in every path (tables, the Python API, CLI,
HTTP), with a width that depends on the schema only, and bad input refused with its column and rows named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sisa.cli.main import main
from sisa.estimator import SisaClassifier
from sisa.exceptions import DataError
from sisa.tables.datasets import make_customers
from sisa.tables.encoder import Encoder, bucket
from sisa.tables.schema import parse_schema
from sisa.tables.table import read_table, validate_table
from tests.conftest import small_config

SCHEMA = {
    "age": {"type": "numeric", "missing": "indicator", "scaling": "slice0"},
    "city": {
        "type": "categorical",
        "categories": ["Rome", "Paris"],
        "missing": "category",
        "missing_values": ["?"],
    },
    "income": {"type": "numeric", "center": 100, "scale": 10, "missing": "indicator"},
    "member": {"type": "boolean", "missing": "indicator"},
}
ENC = Encoder(parse_schema(SCHEMA))


def test_each_type_with_its_gaps():
    df = pd.DataFrame(
        {
            "age": pd.array([39, None, 50], dtype="Int64"),
            "city": ["Rome", "?", "Atlantis"],
            "income": [110.0, np.nan, 90.0],
            "member": pd.array([True, None, False], dtype="boolean"),
        }
    )
    X = ENC.encode(df)
    assert ENC.feature_names == [
        "age", "age__missing", "city=Rome", "city=Paris", "city=__unknown__", "city=__missing__",
        "income", "income__missing", "member", "member__missing",
    ]  # fmt: skip
    assert X.dtype == np.float32 and X.flags.c_contiguous
    np.testing.assert_array_equal(
        X,
        [
            [39, 0, 1, 0, 0, 0, 1, 0, 1, 0],  # slice0 columns stay raw: the shard models scale them
            [0, 1, 0, 0, 0, 1, 0, 1, 0, 1],  # '?' is declared missing; gaps are 0 plus the indicator
            [50, 0, 0, 0, 1, 0, -1, 0, 0, 0],  # Atlantis: the unknown bucket, never an error
        ],
    )


def test_categories_as_text_pandas_categorical_arrow_dictionary_numbers_and_booleans(tmp_path):
    schema = parse_schema(
        {"c": {"type": "categorical", "categories": ["1", "true", "x"], "missing": "unknown"}}
    )
    enc = Encoder(schema)
    want = enc.encode(pd.DataFrame({"c": ["1", "true", "x", None]}))
    assert want.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    same = [
        pd.DataFrame({"c": pd.Categorical(["1", "true", "x", None])}),
        pd.DataFrame({"c": pd.array(["1", "true", "x", None], dtype="string")}),
        pd.DataFrame({"c": [1.0, "true", "x", np.nan]}, dtype=object),  # 1.0 is the value 1 (a CSV's float)
    ]
    table = pa.table({"c": pa.array(["1", "true", "x", None]).dictionary_encode()})
    pq.write_table(table, tmp_path / "d.parquet")
    same.append(read_table(tmp_path / "d.parquet"))
    for df in same:
        np.testing.assert_array_equal(enc.encode(df), want)
    flags = Encoder(parse_schema({"c": {"type": "categorical", "categories": ["true", "false"]}}))
    assert flags.encode(pd.DataFrame({"c": [False, True]})).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    hashed = Encoder(parse_schema({"c": {"type": "categorical", "hash_buckets": 8}}))
    X = hashed.encode(pd.DataFrame({"c": ["Rome", "Paris", None]}))
    assert X[0, bucket("Rome", 8)] == 1 and X[1, bucket("Paris", 8)] == 1 and X[2, 8] == 1  # c=__missing__
    assert bucket("Rome", 8) == 5  # keyed, stable: the same bucket in every run and process


def test_csv_and_parquet_of_one_raw_table_encode_alike(tmp_path):
    df = make_customers(120, seed=4)
    df.to_csv(tmp_path / "c.csv", index=False)
    df.to_parquet(tmp_path / "c.parquet")
    schema = {
        "age": "numeric",
        "city": {"type": "categorical", "categories": ["Rome", "Oslo"]},
        "income": "numeric",
        "member": "boolean",
    }
    cfg = small_config(data={"id_column": "customer", "label_column": "churn", "schema": schema}).data
    a = validate_table(read_table(tmp_path / "c.csv"), cfg, "csv")
    b = validate_table(read_table(tmp_path / "c.parquet"), cfg, "parquet")
    np.testing.assert_array_equal(a.features, b.features)
    assert a.feature_names == b.feature_names and a.ids.tolist() == b.ids.tolist()


def test_bad_input_names_columns_and_rows_all_at_once():
    df = pd.DataFrame(
        {
            "age": ["39", "old", None, "x"],
            "city": ["Rome"] * 4,
            "income": [1.0, np.inf, 2.0, 3.0],
            "member": ["yes", "no", "maybe", None],
            "extra": [1, 2, 3, 4],
        }
    )
    with pytest.raises(DataError) as err:
        ENC.encode(df, "t.csv")
    assert err.value.problems == [
        "columns ['extra'] are not in data.schema; add them (type: ignore to keep them out)",
    ]
    with pytest.raises(DataError) as err:
        ENC.encode(df.drop(columns=["extra"]), "t.csv")
    assert err.value.problems == [
        "column 'age': expected numbers, got text 'old' at rows 1, 3",
        "column 'income': infinite or beyond-float32 values at rows 1",
        "column 'member': expected true/false (or yes/no, 1/0), got text 'maybe' at rows 2",
    ]
    strict = Encoder(parse_schema({"age": {"type": "numeric", "missing": "error", "scaling": "none"}}))
    with pytest.raises(
        DataError, match=r"column 'age': missing values at rows 1; the schema says missing: error"
    ):
        strict.encode(pd.DataFrame({"age": [1.0, None]}))
    with pytest.raises(DataError, match=r"missing columns \['member'\] \(data.schema names them\)"):
        ENC.encode(df[["age", "city", "income"]])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "age": st.one_of(st.none(), st.floats(-1e6, 1e6), st.integers(-1000, 1000)),
                "city": st.one_of(st.none(), st.sampled_from(["Rome", "Paris", "?"]), st.text(max_size=5)),
                "income": st.one_of(st.none(), st.floats(-1e6, 1e6)),
                "member": st.one_of(st.none(), st.booleans()),
            }
        ),
        min_size=1,
        max_size=12,
    )
)
def test_width_and_names_depend_on_the_schema_only(records):
    """Whatever the rows, every encoding has the schema's width, and a row's encoding is that row's alone."""
    df = pd.DataFrame(records, dtype=object)
    X = ENC.encode(df)
    assert X.shape == (len(df), len(ENC.feature_names)) == (len(df), 10)
    assert np.isfinite(X).all()
    for i in range(len(df)):
        np.testing.assert_array_equal(ENC.encode(df.iloc[[i]]), X[i : i + 1])


# ---- every path goes through the encoder: API, CLI, HTTP ---------------------------------------------------------
@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raw")
    df = make_customers(300, seed=5)
    cfg = small_config(data={"id_column": "customer", "label_column": "churn", "schema": SCHEMA})
    clf = SisaClassifier(cfg, run_dir=tmp / "run").fit(df)
    return tmp, df, clf


def test_api_cli_and_http_agree_on_raw_records(raw_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sisa.serving.app import create_app

    tmp, df, clf = raw_run
    new = df.drop(columns=["customer", "churn"]).head(6)  # a table as it comes: no ID, no label
    proba = clf.predict_proba(new)
    assert proba.shape == (6, 2)
    new.to_csv(tmp / "new.csv", index=False)
    assert (
        main(
            [
                "predict",
                "--run",
                str(tmp / "run"),
                "--data",
                str(tmp / "new.csv"),
                "--out",
                str(tmp / "p.csv"),
            ]
        )
        == 0
    )
    preds = pd.read_csv(tmp / "p.csv")
    assert preds["row"].tolist() == list(range(6))
    np.testing.assert_allclose(preds[["proba_no", "proba_yes"]].to_numpy(), proba, rtol=1e-6)
    records = [{k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in r.items()}
               for r in new.to_dict("records")]  # fmt: skip
    with TestClient(create_app(tmp / "run")) as client:
        r = client.post("/predict", json={"instances": records})
        assert r.status_code == 200, r.text
        got = np.array([[p["no"], p["yes"]] for p in r.json()["probabilities"]])
        np.testing.assert_allclose(got, proba, rtol=1e-6)
        one = client.post("/predict", json={"instances": [{"age": 39, "city": "Rome", "income": None}]})
        assert one.status_code == 200 and one.json()["predictions"][0] in ("no", "yes")


def test_openapi_lists_raw_columns_and_bad_records_get_422(raw_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sisa.serving.app import create_app

    tmp, _, _ = raw_run
    with TestClient(create_app(tmp / "run")) as client:
        spec = client.get("/openapi.json").json()["components"]["schemas"]["PredictRequest"]
        props = spec["properties"]["instances"]["items"]["properties"]
        assert list(props) == ["age", "city", "income", "member"]
        assert props["age"]["type"] == ["number", "null"] and props["member"]["type"] == ["boolean", "null"]
        assert props["city"]["x-categories"] == ["Rome", "Paris"]
        bad = client.post("/predict", json={"instances": [{"age": 30}, {"age": "old", "member": "maybe"}]})
        assert bad.status_code == 422
        assert bad.json()["problems"] == [
            "column 'age': expected numbers, got text 'old' at instances 1",
            "column 'member': expected true/false (or yes/no, 1/0), got text 'maybe' at instances 1",
        ]
        unknown = client.post("/predict", json={"instances": [{"agee": 30}]})
        assert unknown.status_code == 422
        assert unknown.json()["error"] == (
            "invalid instances: instances[0]: unknown columns ['agee']; expected some of "
            "['age', 'city', 'income', 'member']"
        )


def test_evaluate_scores_a_labelled_table_without_ids(raw_run, capsys):
    tmp, df, clf = raw_run
    labelled = df.drop(columns=["customer"]).tail(80)
    labelled.to_parquet(tmp / "test.parquet")
    assert main(["evaluate", "--run", str(tmp / "run"), "--data", str(tmp / "test.parquet"), "--json"]) == 0
    import json

    soft = json.loads(capsys.readouterr().out)
    assert soft["rows"] == 80 and soft["aggregation"] == "soft"
    assert set(soft["per_class"]) == {"no", "yes"}
    assert soft == {"rows": 80, "aggregation": "soft", **_expected(clf, labelled)}
    assert main(["evaluate", "--run", str(tmp / "run"), "--data", str(tmp / "test.parquet"),
                 "--aggregation", "hard"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("80 rows, aggregation hard: accuracy ") and "class yes: precision" in out


def _expected(clf, labelled) -> dict:
    from sisa.evaluation import scores

    proba = clf.predict_proba(labelled)
    labels = np.array([clf.classes_.index(v) for v in labelled["churn"]])
    return scores(proba, labels, clf.classes_)
