"""Scoring the live ensemble on the held-out table that ``data.test`` names (docs/design.md, "Lifecycle")."""

from __future__ import annotations

from pathlib import Path

from .aggregation import Ensemble
from .config import Config
from .exceptions import ConfigError, SisaError
from .store.rundir import RunDir
from .tables.table import Table, read_table, validate_table


def load_test_table(config: Config) -> Table | None:
    """The held-out table named by ``data.test`` (validated against the frozen classes and features), or None."""
    if not config.data.test:
        return None
    if not Path(config.data.test).is_file():
        raise ConfigError(
            [f"data.test: {config.data.test!r} does not exist; fix the path or set data.test=null"]
        )
    df = read_table(config.data.test)
    return validate_table(
        df,
        config.data,
        config.data.test,
        classes=config.data.classes,
        feature_names=config.data.features,
        purpose="score",
    )


def evaluate(run: RunDir, config: Config, manifest: dict) -> dict:
    """Test accuracy of the ensemble (and per shard) when the config names a test table.

    A test table that went missing or bad after training must not block a deletion: the error is reported in the
    metrics instead."""
    try:
        t = load_test_table(config)
        if t is None:
            return {}
        ens = Ensemble.from_manifest(run.root, config, manifest)
        probs = ens.shard_probabilities(t.features)
    except (SisaError, OSError) as exc:
        return {"error": f"test accuracy not computed: {exc}"}
    per_shard = {
        str(s): float((probs[i].argmax(-1).numpy() == t.labels).mean()) for i, s in enumerate(ens.shards)
    }
    return {
        "test_accuracy": ens.accuracy(t.features, t.labels),
        "test_rows": len(t),
        "shard_accuracy": per_shard,
    }
