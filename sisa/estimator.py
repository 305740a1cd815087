"""The Python API: an estimator-like object over a run directory.

>>> clf = SisaClassifier("configs/adult.yaml", run_dir="runs/adult").fit()
>>> clf.predict(X_test)
>>> receipt = clf.delete(["adult-train-00042"])
>>> clf = SisaClassifier.load("runs/adult")        # later, in another process
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .aggregation import Ensemble
from .config import Config
from .evaluation import current_metrics, score_table
from .exceptions import RunStateError
from .fitting import train
from .intake import add
from .retraining import rolled_back_shards, shard_states
from .session import reader_session
from .sharding import imbalance
from .store.journal import Journal, kind_of
from .store.rundir import RunDir
from .tables.table import Table, features_for_prediction
from .unlearning import delete


class SisaClassifier:
    """fit / predict / predict_proba / delete / status over one run directory."""

    def __init__(
        self,
        config: Config | dict | str | Path | None = None,
        *,
        run_dir: str | Path | None = None,
        overrides: list[str] | None = None,
    ):
        if isinstance(config, (str, Path)):
            config = Config.load(config, overrides)  # applies the overrides
        else:
            if isinstance(config, dict):
                config = Config.from_dict(config)
            elif config is None:
                config = Config()
            if overrides:
                config = config.with_overrides(overrides)
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._ensemble: Ensemble | None = None
        self._excluded: set[int] = set()  # shards left out of the cached ensemble (pending deletions)
        self.last_report = None

    # ---- training ---------------------------------------------------------------------------------------------
    def fit(
        self,
        data: pd.DataFrame | Table | None = None,
        run_dir: str | Path | None = None,
        placement: pd.DataFrame | None = None,
    ) -> SisaClassifier:
        """Train into ``run_dir`` from ``data`` (a DataFrame) or the config's ``data.train`` table."""
        self.run_dir = Path(run_dir) if run_dir is not None else self.run_dir
        if self.run_dir is None:
            raise RunStateError("fit needs a run directory: SisaClassifier(config, run_dir='runs/name')")
        run, self.last_report = train(self.run_dir, self.config, data, placement=placement)
        self.config = run.config()
        self._ensemble = None
        return self

    @classmethod
    def load(cls, run_dir: str | Path, runtime: list[str] | tuple[str, ...] = ()) -> SisaClassifier:
        """The run's classifier; ``runtime``: overrides of keys outside the digest for this object only, e.g.
        ``["aggregation.method=hard"]`` (:meth:`Config.with_runtime`)."""
        config = reader_session(run_dir).config()
        return cls(config.with_runtime(runtime) if runtime else config, run_dir=run_dir)

    # ---- inference --------------------------------------------------------------------------------------------
    @property
    def classes_(self) -> list:
        return list(self.config.data.classes or [])

    @property
    def feature_names_(self) -> list[str]:
        return list(self.config.data.features or [])

    def ensemble(self) -> Ensemble:
        """The live generation, minus shards that an acknowledged deletion is still retraining (strict mode).

        The journal is read before the manifest, and shards with pending deletions are never loaded: their old
        checkpoints may be deleted at any moment by the writer applying the deletion."""
        run = self._run()
        pending = Journal(run.journal_dir).pending_shards()
        cached = self._ensemble
        fresh = cached is not None and cached.generation == run.require_manifest()["generation"]
        if fresh and self._excluded <= pending:
            return cached.without(pending) if pending else cached
        self._ensemble = run.read_generation(
            lambda m: Ensemble.from_manifest(run.root, self.config, m, exclude=pending)
        )
        self._excluded = set(pending)
        return self._ensemble

    def features(self, X) -> np.ndarray:
        """``X`` as the models see it: a DataFrame of raw columns goes through the run's encoder (its schema); an
        array is taken as encoded already (columns in :attr:`feature_names_` order)."""
        return features_for_prediction(X, self.feature_names_, self.config.data)

    def predict_proba(self, X) -> np.ndarray:
        return self.ensemble().predict_proba(self.features(X))

    def predict(self, X) -> np.ndarray:
        return self.ensemble().predict(self.features(X))

    def evaluate(self, data: pd.DataFrame) -> dict:
        """Accuracy, per-class precision/recall and log-loss on a labelled raw table (no retraining)."""
        return score_table(self.ensemble(), self.config, data)

    # ---- unlearning -------------------------------------------------------------------------------------------
    def delete(self, ids: list | None = None, *, subjects: list | None = None, wait_s: float = 0.0) -> dict:
        receipt = delete(self._run().root, ids, subjects, wait_s=wait_s)
        self._ensemble = None
        return receipt

    def add(self, rows: pd.DataFrame, *, allow_returning: bool = False, wait_s: float = 0.0) -> dict:
        """Add new rows (the training table's columns) exactly: only the shards that receive rows retrain."""
        receipt = add(self._run().root, rows, allow_returning=allow_returning, wait_s=wait_s)
        self._ensemble = None
        return receipt

    def status(self) -> dict:
        return run_status(self._run().root)

    def _run(self) -> RunDir:
        if self.run_dir is None:
            raise RunStateError(
                "this classifier has no run directory yet; call fit() or SisaClassifier.load()"
            )
        return RunDir(self.run_dir)


def run_status(root: str | Path, accuracy: bool = True) -> dict:
    """Shards, slices, records active/deleted, generation, accuracy, pending deletions, balance.

    ``accuracy``: score the live generation on the test table when no training did (a deletion never does; the
    score is kept for the next call: :func:`sisa.evaluation.current_metrics`); False reports only a kept one."""
    run = RunDir(root)
    manifest = run.require_manifest()
    cfg = run.config()
    index = run.index()
    counts = index.counts(cfg.sharding.shards, cfg.sharding.slices)
    journal = Journal(run.journal_dir)
    entries = journal.entries()
    pending = journal.pending_shards()
    sizes = counts.sum(axis=1)
    metrics = current_metrics(run, cfg, manifest, compute=accuracy)
    return {
        "run": str(run.root),
        "generation": manifest["generation"],
        "config_digest": manifest["config_digest"],
        "shards": cfg.sharding.shards,
        "slices": cfg.sharding.slices,
        "strategy": cfg.sharding.strategy,
        "model": cfg.model.name,
        "executor": cfg.training.executor,
        "device": cfg.training.device,
        "records_active": int(len(index.active)),
        "records_deleted": int((index.tombstones["kind"] == "record").sum()) if len(index.tombstones) else 0,
        "subjects_active": int(index.active["subject_id"].nunique()) if index.has_subjects else None,
        "deletion_requests": sum(kind_of(e) == "delete" for e in entries),
        "addition_requests": sum(kind_of(e) == "add" for e in entries),
        "deletions_pending": sum(e["status"] == "pending" and kind_of(e) == "delete" for e in entries),
        "additions_pending": sum(e["status"] == "pending" and kind_of(e) == "add" for e in entries),
        "shard_records": [int(v) for v in sizes],
        "shard_imbalance": round(imbalance(sizes), 4),
        "slice_records": counts.tolist(),
        "shards_serving": [  # rolled back or not: every shard that answers
            e["shard"]
            for e in manifest["shards"]
            if e["shard"] not in pending and e["records"] and e["checkpoints"]
        ],
        "shards_retraining": sorted(pending),
        "shards_rolled_back": sorted(rolled_back_shards(manifest)),
        "shard_states": shard_states(run, manifest, pending),
        "test_accuracy": metrics.get("test_accuracy"),
        "shard_accuracy": metrics.get("shard_accuracy"),
        "test_accuracy_generation": metrics.get("generation"),
    }
