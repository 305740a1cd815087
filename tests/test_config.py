"""Config: YAML loading, --set overrides, unknown keys, all problems at once, digest, weights vs shards."""

from __future__ import annotations

import pytest

from sisa.config import Config, apply_overrides
from sisa.exceptions import ConfigError

YAML = """\
# a small config, as a user writes it
data:
  train: data/train.parquet   # training table
  id_column: email
  label_column: income
sharding:
  shards: 4
  slices: 2
model:
  hidden: [32, 16]
training:
  epochs: 3
  lr: 0.01
  seed: 7
aggregation:
  method: hard
"""


def write(tmp_path, text: str = YAML):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_load_fills_defaults(tmp_path):
    cfg = Config.load(write(tmp_path))
    assert cfg.data.train == "data/train.parquet"
    assert (cfg.data.id_column, cfg.data.label_column) == ("email", "income")
    assert (cfg.sharding.shards, cfg.sharding.slices, cfg.sharding.strategy) == (4, 2, "uniform")
    assert cfg.model.hidden == [32, 16]
    assert cfg.training.epochs == 3.0 and isinstance(cfg.training.epochs, float)
    assert (cfg.training.lr, cfg.training.seed, cfg.training.batch_size) == (0.01, 7, 128)
    assert cfg.aggregation.method == "hard"


def test_overrides_are_yaml_typed(tmp_path):
    cfg = Config.load(
        write(tmp_path),
        [
            "sharding.shards=8",
            "training.lr=1e-3",  # YAML 1.1 reads this as a string; sisa takes it as the float it means
            "training.deterministic=false",
            "model.hidden=[8, 4]",
            "data.features=[a, b]",
            "data.test=null",
            "aggregation.weights=[1, 2.5, 1e-1, 0, 0, 0, 0, 1]",
        ],
    )
    assert cfg.sharding.shards == 8 and isinstance(cfg.sharding.shards, int)
    assert cfg.training.lr == 0.001 and isinstance(cfg.training.lr, float)
    assert cfg.training.deterministic is False
    assert cfg.model.hidden == [8, 4]
    assert cfg.data.features == ["a", "b"]
    assert cfg.data.test is None
    assert cfg.aggregation.weights == [1, 2.5, 0.1, 0, 0, 0, 0, 1]


def test_yaml_scientific_notation_in_file(tmp_path):
    cfg = Config.load(write(tmp_path, "training:\n  lr: 5e-4\n  epochs: 1E+1\n"))
    assert (cfg.training.lr, cfg.training.epochs) == (0.0005, 10.0)


def test_override_syntax_errors_are_listed():
    with pytest.raises(ConfigError) as err:
        apply_overrides({}, ["shards=3", "training.lr", "a.b.c=1"])
    assert err.value.problems == [
        "override 'shards=3': expected section.key=value, e.g. sharding.shards=8",
        "override 'training.lr': expected section.key=value, e.g. sharding.shards=8",
        "override 'a.b.c=1': expected section.key=value, e.g. sharding.shards=8",
    ]


def test_unknown_key_gets_a_hint():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"sharding": {"shardz": 3}})
    assert str(err.value) == "invalid configuration: sharding.shardz: unknown key (did you mean 'shards'?)"


def test_unknown_key_without_close_match_lists_known_keys():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"aggregation": {"zzz": 1}})
    assert str(err.value) == (
        "invalid configuration: aggregation.zzz: unknown key (known keys: method, weights, inference)"
    )


def test_unknown_section_rejected_via_override(tmp_path):
    with pytest.raises(ConfigError) as err:
        Config.load(write(tmp_path), ["trainin.lr=0.1"])
    assert str(err.value) == "invalid configuration: trainin: unknown key (did you mean 'training'?)"


def test_two_problems_reported_in_one_error():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"sharding": {"shards": 0}, "training": {"lr": -1}})
    assert str(err.value) == (
        "invalid configuration (2 problems):\n"
        "  - sharding.shards: expected an integer >= 1, got 0\n"
        "  - training.lr: expected a number > 0, got -1.0"
    )
    assert err.value.problems == [
        "sharding.shards: expected an integer >= 1, got 0",
        "training.lr: expected a number > 0, got -1.0",
    ]


def test_type_and_unknown_key_problems_together():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"sharding": {"shards": "many"}, "model": {"hiden": [3]}})
    assert err.value.problems == [
        "sharding.shards: expected int, got 'many'",
        "model.hiden: unknown key (did you mean 'hidden'?)",
    ]


def test_type_and_range_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        Config.from_dict(
            {
                "sharding": {"strategy": "random"},
                "training": {"seed": True},
                "aggregation": {"method": "max"},
                "model": {"hidden": 3, "input_shape": ["a", 1, 1]},
            }
        )
    assert err.value.problems == [
        "training.seed: expected int, got True",
        "model.hidden: expected a list, got 3",
        "sharding.strategy: expected one of uniform, stratified, distribution_aware, got 'random'",
        "model.input_shape: expected [channels, height, width], got ['a', 1, 1]",
        "aggregation.method: expected one of soft, hard, got 'max'",
    ]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        Config.load(tmp_path / "nope.yaml")
    assert (
        str(err.value) == f"invalid configuration: config file {str(tmp_path / 'nope.yaml')!r} does not exist"
    )


def test_digest_stable_and_sensitive_to_training_only():
    base = Config.from_dict({"data": {"train": "a.parquet", "test": "b.parquet"}})
    same = Config.from_dict({"data": {"train": "a.parquet", "test": "b.parquet"}})
    assert base.digest() == same.digest()
    assert len(base.digest()) == 64
    # data paths, speed-only training keys and aggregation do not change what a shard model is
    for override in (
        "data.train=elsewhere/train.csv",
        "data.test=other.parquet",
        "training.n_jobs=4",
        "training.progress=false",
        "aggregation.method=hard",
    ):
        assert base.with_overrides([override]).digest() == base.digest(), override
    # anything that changes the trained bits does
    for override in (
        "training.lr=0.002",
        "training.seed=1",
        "training.epochs=3",
        "training.threads=2",
        "sharding.slices=5",
        "model.hidden=[64]",
        "data.label_column=y",
    ):
        assert base.with_overrides([override]).digest() != base.digest(), override


def test_digest_survives_yaml_round_trip(tmp_path):
    cfg = Config.load(write(tmp_path), ["training.lr=1e-3"])
    again = Config.load(write(tmp_path, cfg.to_yaml()))
    assert again == cfg and again.digest() == cfg.digest()


def test_weights_length_checked_against_shards():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"sharding": {"shards": 3}, "aggregation": {"weights": [1, 2]}})
    assert str(err.value) == (
        "invalid configuration: aggregation.weights: expected 3 weights (one per shard), got 2; "
        "give one weight per shard or null"
    )
    ok = Config.from_dict({"sharding": {"shards": 2}, "aggregation": {"weights": [1, 2]}})
    assert ok.aggregation.weights == [1, 2]
    # an override that changes the shard count is checked against the weights too
    with pytest.raises(ConfigError, match="expected 4 weights"):
        ok.with_overrides(["sharding.shards=4"])


def test_negative_weights_rejected():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"sharding": {"shards": 2}, "aggregation": {"weights": [-1, 2]}})
    assert err.value.problems == [
        "aggregation.weights: expected non-negative numbers with a positive sum, got [-1, 2]"
    ]


def test_distribution_aware_needs_probability_column():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"sharding": {"strategy": "distribution_aware"}})
    assert err.value.problems == [
        "sharding.strategy: distribution_aware needs data.deletion_prob_column (a column of per-record "
        "deletion probabilities); set it or use strategy=uniform"
    ]
