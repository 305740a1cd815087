"""Scoring the live ensemble: on the held-out table that ``data.test`` names after every training, lazily for a
generation no training scored (a deletion never waits for it: :func:`current_metrics`, used by ``sisa status``),
and on any labelled table on demand (``sisa evaluate``), without retraining (docs/design.md, "Lifecycle")."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .aggregation import Ensemble
from .config import Config
from .exceptions import ConfigError, RunLockedError, SisaError
from .store.files import atomic_write_json, read_json, writer_lock
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


def current_metrics(run: RunDir, config: Config, manifest: dict, compute: bool = True) -> dict:
    """The live generation's test metrics, tagged with it: the manifest's when training scored this generation,
    else the lazily computed ones kept in ``metrics.json``, else (``compute``) scored now and kept there when no
    writer holds the run (the file is a cache: tagged with generation and config digest, never trusted beyond
    them). ``{}`` when the run has no test table or when nothing was computed."""
    tag = {"generation": manifest["generation"], "config_digest": manifest["config_digest"]}
    stored = manifest.get("metrics", {})
    if stored.get("generation") == tag["generation"]:
        return stored
    if not config.data.test:
        return {}
    try:
        cached = read_json(run.metrics_path) if run.metrics_path.is_file() else {}
    except SisaError:
        cached = {}
    if all(cached.get(k) == v for k, v in tag.items()):
        return cached
    if not compute:
        return {}
    metrics = {**evaluate(run, config, manifest), **tag}
    if "error" not in metrics:
        try:
            with writer_lock(run.root, 0.0, "caching test metrics"):
                atomic_write_json(run.metrics_path, metrics)
        except (RunLockedError, OSError):
            pass  # a writer is at work (the generation may be changing): return the score without keeping it
    return metrics


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
