"""data.schema (sisa/tables/schema.py) and `sisa schema` (sisa/tables/drafting.py): validation at the boundary with
every problem named at once, normalisation, the digest, and a draft that never writes a value one row holds."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from sisa.cli.main import main
from sisa.config import Config
from sisa.exceptions import ConfigError
from sisa.fitting import train
from sisa.tables.datasets import make_customers
from sisa.tables.drafting import DEFAULT_MIN_COUNT, draft_schema
from sisa.tables.schema import load_schema, parse_schema, schema_of
from tests.conftest import small_config

SCHEMA = {
    "age": "numeric",
    "city": {"type": "categorical", "categories": ["Rome", "Paris"], "missing": "category"},
    "income": {"type": "numeric", "center": 50000, "scale": 20000, "transform": "none"},
    "member": {"type": "boolean"},
}


def test_specs_are_normalised_and_name_their_encoded_columns():
    schema = parse_schema(SCHEMA)
    assert schema.to_dict() == {
        "age": {"type": "numeric", "missing": "indicator", "scaling": "slice0", "transform": "none"},
        "city": {"type": "categorical", "missing": "category", "categories": ["Rome", "Paris"]},
        "income": {
            "type": "numeric",
            "missing": "indicator",
            "scaling": "declared",
            "center": 50000.0,
            "scale": 20000.0,
            "transform": "none",
        },
        "member": {"type": "boolean", "missing": "indicator"},
    }
    assert schema.feature_names() == [
        "age", "age__missing", "city=Rome", "city=Paris", "city=__unknown__", "city=__missing__",
        "income", "income__missing", "member", "member__missing",
    ]  # fmt: skip
    assert parse_schema(schema.to_dict()) == schema  # the frozen form parses to itself


def test_every_problem_is_named_at_once():
    bad = {
        "a": {"type": "numbr"},
        "b": {"type": "numeric", "missing": "drop", "scale": 0},
        "c": {"type": "categorical"},
        "d": {"type": "categorical", "categories": [True, "x", "x", "__unknown__"]},
        "e": {"type": "categorical", "hash_buckets": 0, "missing": "unknown"},
        "f": {"type": "numeric", "range": [5, 1], "colour": "red"},
        "g": 3,
    }
    with pytest.raises(ConfigError) as err:
        parse_schema(bad)
    assert err.value.problems == [
        "data.schema.a.type: expected one of numeric, categorical, boolean, ignore, got 'numbr'",
        "data.schema.b.missing: expected one of indicator, error, got 'drop'",
        "data.schema.b: scaling declared needs center (a number) and scale (> 0), got 0.0, 0",
        "data.schema.c: give either categories: [...] (declared values) or hash_buckets: N",
        "data.schema.d.categories: True is a YAML boolean; quote it ('yes', 'no', 'on'...) if you mean the text",
        "data.schema.d.categories: duplicate values ['x']",
        "data.schema.d.categories: ['__unknown__'] are reserved bucket names",
        "data.schema.e.hash_buckets: expected an integer >= 1, got 0",
        "data.schema.e.missing: hashed columns have no unknown bucket; use category or error",
        "data.schema.f: unknown keys ['colour'] for type numeric; known: ['center', 'missing', 'missing_values', "
        "'range', 'scale', 'scaling', 'transform', 'type']",
        "data.schema.f.range: expected [low, high] with low < high, got [5, 1]",
        "data.schema.g: expected a spec mapping (e.g. {type: numeric}) or a type name, got 3",
    ]


def test_schema_file_and_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="data.schema: schema file 'nope.yaml' does not exist"):
        load_schema("nope.yaml")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"customer": "numeric", "age": "numeric"}))
    cfg = small_config(data={"id_column": "customer", "schema": str(path), "features": ["age"]})
    with pytest.raises(ConfigError) as err:
        schema_of(cfg.data)
    assert err.value.problems == [
        "data.schema: 'customer' is data.id_column and cannot be a feature; drop it from the schema",
        "data.features: leave it null when data.schema is set (the schema's encoded columns become the features)",
    ]
    with pytest.raises(
        ConfigError, match="data.schema: expected a mapping column -> spec or a YAML file path"
    ):
        Config.from_dict({"data": {"schema": 5}})


def test_digest_unchanged_without_a_schema_and_covering_it_with_one(tmp_path):
    # pinned before data.schema existed: configs without a schema keep their digests (and their runs' fingerprints)
    assert Config().digest() == "6a2176935ca45e4d98b5020f021e20f3541598f1085f0100e3d40ef342d1a969"
    df = make_customers(200, seed=1)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SCHEMA))
    cfg = small_config(data={"id_column": "customer", "label_column": "churn", "schema": str(path)})
    run, _ = train(tmp_path / "run", cfg, df)
    frozen = run.config()
    assert frozen.data.schema == parse_schema(SCHEMA).to_dict()  # inline: the run does not need the file
    assert frozen.data.features == parse_schema(SCHEMA).feature_names()
    path.write_text(yaml.safe_dump({**SCHEMA, "age": {"type": "numeric", "range": [0, 100]}}))
    other, _ = train(tmp_path / "other", cfg, df)
    assert other.config().digest() != frozen.digest()
    assert run.manifest()["config_digest"] == frozen.digest()


def test_draft_lists_frequent_categories_only_and_warns_without_the_rare_values():
    df = make_customers(400, seed=3)
    draft = draft_schema(df, "customer", "churn", min_count=DEFAULT_MIN_COUNT, source="customers.csv")
    spec = yaml.safe_load(draft.text)
    assert spec == {
        "age": {"type": "numeric", "missing": "indicator", "scaling": "slice0"},
        "city": {
            "type": "categorical",
            "missing": "category",
            "categories": ["Lima", "Oslo", "Paris", "Rome"],
        },
        "income": {"type": "numeric", "missing": "indicator", "scaling": "slice0"},
        "member": {"type": "boolean", "missing": "indicator"},
    }
    rare = [v for v in df["city"].dropna().unique() if v.startswith("Town-")]
    assert len(rare) == 3
    assert not any(v in draft.text or any(v in w for w in draft.warnings) for v in rare)
    assert draft.warnings == [
        "column 'city': 3 value(s) held by fewer than 10 rows each (3 rows in all) go to 'city=__unknown__' and are "
        "not written: a value one person holds identifies them, and in the config it would outlive their deletion"
    ]
    assert "# label 'churn': classes ['no', 'yes']" in draft.text
    for number in ("min", "max", str(df["age"].max()), str(int(df["income"].max()))):
        assert number not in draft.text  # no value one row determines


def test_draft_question_marks_identifiers_and_rare_classes(tmp_path, capsys):
    n = 60
    df = pd.DataFrame(
        {
            "id": range(n),
            "email": [f"p{i}@x.org" for i in range(n)],
            "size": ["?" if i % 7 == 0 else str(i) for i in range(n)],
            "colour": ["?" if i % 5 == 0 else ["red", "blue"][i % 2] for i in range(n)],
            "flag": ["yes" if i % 3 else "no" for i in range(n)],
            "y": ["a"] * 55 + ["b"] * 5,
        }
    )
    df.to_csv(tmp_path / "t.csv", index=False)
    code = main(["schema", str(tmp_path / "t.csv"), "--id-column", "id", "--label-column", "y",
                 "--out", str(tmp_path / "s.yaml")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0
    spec = yaml.safe_load((tmp_path / "s.yaml").read_text())
    assert spec["email"] == {"type": "ignore"}
    assert spec["size"] == {
        "type": "numeric",
        "missing": "indicator",
        "scaling": "slice0",
        "missing_values": ["?"],
    }
    assert spec["colour"] == {
        "type": "categorical",
        "missing": "category",
        "missing_values": ["?"],
        "categories": ["blue", "red"],
    }
    assert spec["flag"] == {"type": "boolean", "missing": "indicator"}
    assert "label 'y': 1 class(es) are held by fewer than 10 rows each (not listed here)" in err
    assert "column 'email': every value is unique" in err
    assert main(["schema", str(tmp_path / "t.csv"), "--id-column", "id", "--label-column", "y",
                 "--min-count", "0"]) == 2  # fmt: skip
    assert "sisa: error: --min-count: expected an integer >= 1, got 0" in capsys.readouterr().err
