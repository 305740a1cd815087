"""Scoring the live ensemble: on the held-out table that ``data.test`` names after every training and deletion
(docs/design.md, "Lifecycle"), and on any labelled table on demand (``sisa evaluate``), without retraining."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


# ---- scoring a labelled table without retraining (`sisa evaluate`) -------------------------------------------
LOG_LOSS_EPS = 1e-15  # probabilities are clipped to [eps, 1 - eps]: a hard vote gives exact zeros


def score_table(ensemble: Ensemble, config: Config, df, source: str = "evaluation table") -> dict:
    """Accuracy, per-class precision/recall and log-loss of the live ensemble on a labelled raw table.

    The table needs the label column and the feature columns only (no IDs, subjects or deletion probabilities);
    it is encoded like the training data, and labels outside the frozen class list are an error."""
    t = validate_table(df, config.data, source, classes=config.data.classes, purpose="score")
    proba = ensemble.predict_proba(t.features)
    return {"rows": len(t), "aggregation": config.aggregation.method, **scores(proba, t.labels, t.classes)}


def scores(proba: np.ndarray, labels: np.ndarray, classes: list) -> dict:
    """Scores of class probabilities ``proba`` [n, C] against class indices ``labels`` [n]."""
    predicted = proba.argmax(axis=1)
    per_class = {}
    for k, c in enumerate(classes):
        chosen, actual = predicted == k, labels == k
        hits = int((chosen & actual).sum())
        per_class[str(c)] = {
            "precision": hits / int(chosen.sum()) if chosen.any() else None,
            "recall": hits / int(actual.sum()) if actual.any() else None,
            "support": int(actual.sum()),
        }
    p_true = np.clip(proba[np.arange(len(labels)), labels], LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    return {
        "accuracy": float((predicted == labels).mean()),
        "log_loss": float(-np.log(p_true.astype(np.float64)).mean()),
        "per_class": per_class,
    }
