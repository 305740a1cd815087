"""Building a run from a table, and bringing a run's checkpoints in line with its data.

:func:`refresh` is the one mechanism behind training, resuming an interrupted training, deletion, crash
recovery and repair: it recomputes each shard's fingerprint chain from the stored shard data, trains every shard
from the first slice whose checkpoint (named by its fingerprint) is missing, swaps in a new manifest generation,
and only then deletes every checkpoint folder that the new generation does not name — which includes each
checkpoint that was trained on a deleted record.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .aggregation import Ensemble
from .config import Config
from .duplicates import row_hashes
from .exceptions import ConfigError, IntegrityError, RunStateError, SisaError
from .sharding import place
from .store.checkpoints import checkpoint_name, fingerprint_chain, is_complete
from .store.files import clean_temp_files, parse_parquet, remove_tree, sha256_bytes, sha256_file, writer_lock
from .store.index import RecordIndex
from .store.rundir import RunDir, shard_data
from .tables.table import Table, read_table, validate_table
from .train.executors import run_jobs
from .train.shard import ShardData, ShardJob, ShardResult, TrainSpec, resolve_device


@dataclass
class RefreshReport:
    generation: int
    jobs: list[ShardJob] = field(default_factory=list)
    results: list[ShardResult] = field(default_factory=list)
    before: dict[int, str] = field(default_factory=dict)  # shard -> last fingerprint before
    after: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0


def load_training_table(config: Config) -> Table:
    if not config.data.train:
        raise ConfigError(["data.train: no training table given; set data.train in the config or pass data"])
    df = read_table(config.data.train)
    return validate_table(df, config.data, config.data.train, classes=config.data.classes)


def resolve_config(config: Config, table: Table) -> Config:
    """Freeze what training decides: class list, feature names, device and executor."""
    from .train.stacking import choose_executor

    resolved = Config.from_dict(config.to_dict())
    resolved.data.classes = list(table.classes)
    resolved.data.features = list(table.feature_names)
    resolved.training.device = resolve_device(config.training.device)
    resolved.training.executor = choose_executor(resolved)
    resolved.validate()
    return resolved


def create_run(
    root: str | Path, config: Config, table: Table, placement: pd.DataFrame | None = None
) -> RunDir:
    """Lay out a new run: resolved config, secret, index and per-shard data files (no training yet).

    ``placement`` (shard/slice/order per row) reuses a persisted placement, e.g. to retrain a ``stratified`` run
    from scratch with the same index minus some records.
    """
    run = RunDir(root)
    config = resolve_config(config, table)
    run.create(config)
    keys = table.subjects if table.subjects is not None else table.ids
    if placement is None:
        placement = place(
            keys,
            table.ids,
            shards=config.sharding.shards,
            slices=config.sharding.slices,
            seed=config.training.seed,
            strategy=config.sharding.strategy,
            labels=table.labels,
            deletion_prob=table.deletion_prob,
        )
    index = RecordIndex.build(table.ids, placement, table.subjects)
    run.write_index(index)
    frame = table.frame()
    frame["_slice"] = placement["slice"].to_numpy(np.int32)
    frame["_order"] = placement["order"].to_numpy(np.uint64)
    frame["_row_hash"] = row_hashes(table.features, table.labels)
    frame = frame[["_record_id", "_label", "_slice", "_order", "_row_hash", *table.feature_names]]
    shard_of = placement["shard"].to_numpy()
    for s in range(config.sharding.shards):
        part = frame.loc[shard_of == s]
        part = part.sort_values(["_slice", "_order", "_record_id"], kind="stable").reset_index(drop=True)
        run.write_shard_frame(s, part)
    return run


def train_spec(run: RunDir, config: Config) -> TrainSpec:
    return TrainSpec(
        config=config,
        n_features=len(config.data.features),
        n_classes=len(config.data.classes),
        config_digest=config.digest(),
        checkpoint_root=str(run.checkpoint_root),
        device=config.training.device,
    )


def plan(
    run: RunDir, config: Config, shards: list[int], check: Callable[[str, str], None] | None = None
) -> tuple[list[ShardJob], dict[int, ShardData], dict]:
    """Jobs for the shards whose checkpoint chain is incomplete, their data, and their chains/checksums.

    Each shard data file is read once; ``check(relative path, sha256)`` vets its bytes before they are parsed."""
    digest, R = config.digest(), config.sharding.slices
    jobs, data, chains = [], {}, {}
    for s in shards:
        path = run.data_path(s)
        if not path.is_file():
            raise IntegrityError(path, "file is missing")
        raw = path.read_bytes()
        sha = sha256_bytes(raw)
        if check:
            check(f"data/{path.name}", sha)
        frame = parse_parquet(raw, path)
        d = shard_data(frame, config.data.features, R)
        fps = fingerprint_chain(digest, s, frame["_record_id"].to_numpy(), d.labels, d.features, d.slice_ends)
        chains[s] = {"fingerprints": fps, "records": int(len(frame)), "sha256": sha}
        first_missing = next(
            (k for k in range(R) if not is_complete(run.shard_checkpoints(s) / checkpoint_name(k, fps[k]))), R
        )
        if first_missing < R:
            jobs.append(ShardJob(s, first_missing, tuple(fps)))
            data[s] = d
    return jobs, data, chains


def refresh(
    run: RunDir, shards: list[int] | None = None, metrics: bool = True, staged: dict[str, str] | None = None
) -> RefreshReport:
    """Retrain what the stored data invalidated, swap the manifest, delete stale checkpoints. Caller holds the lock.

    Every data file it reads must match the old manifest or ``staged`` (the checksums a pending deletion recorded
    before writing): a corrupted file is never trained on. Refreshing a run that is already consistent changes
    nothing, not even the generation, so replaying an interrupted request is idempotent."""
    t0 = time.perf_counter()
    config = run.config()
    old = run.manifest()
    shards = list(range(config.sharding.shards)) if shards is None else sorted(set(shards))
    staged = staged or {}
    jobs, data, chains = plan(
        run, config, shards, lambda rel, sha: _check_files(run, old, {rel: sha}, staged)
    )
    current = {f"data/shard-{s:03d}.parquet": chains[s]["sha256"] for s in shards}
    index_files = {n: sha256_file(run.root / n) for n in ("index.parquet", "tombstones.parquet")}
    _check_files(run, old, index_files, staged)
    current.update(index_files)
    spec = train_spec(run, config)
    bar = _progress(config, len(jobs))
    results = run_jobs(
        spec, jobs, data, config.training.executor, on_done=(lambda r: bar.update(1)) if bar else None
    )
    if bar:
        bar.close()
    entries = {e["shard"]: e for e in (old["shards"] if old else [])}
    files = dict(old["files"]) if old else {}
    before = {s: entries[s]["fingerprint"] for s in shards if s in entries}
    for s in shards:
        fps = chains[s]["fingerprints"]
        entries[s] = {
            "shard": s,
            "records": chains[s]["records"],
            "fingerprint": fps[-1],
            "checkpoints": [checkpoint_name(k, fp) for k, fp in enumerate(fps)],
        }
    files.update(current)
    generation = (old["generation"] if old else 0) + 1
    manifest = {
        "generation": generation,
        "config_digest": config.digest(),
        "shards": [entries[s] for s in sorted(entries)],
        "files": files,
        "executor": config.training.executor,
        "metrics": old.get("metrics", {}) if old else {},
    }
    if old is not None and all(
        old.get(k) == manifest[k] for k in ("config_digest", "shards", "files", "executor")
    ):
        manifest, generation = old, old["generation"]  # nothing changed: keep the live generation
    else:
        if metrics:
            manifest["metrics"] = evaluate(run, config, manifest)
        run.write_manifest(manifest)
    collect_garbage(run, manifest, shards)
    return RefreshReport(
        generation,
        jobs,
        results,
        before,
        {s: entries[s]["fingerprint"] for s in shards},
        time.perf_counter() - t0,
    )


def _check_files(run: RunDir, old: dict | None, current: dict[str, str], staged: dict[str, str]) -> None:
    """Refuse to train on a data file that is neither the manifest's version nor one a deletion staged."""
    named = (old or {}).get("files", {})
    for rel, sha in current.items():
        if rel in named and sha not in (named[rel], staged.get(rel)):
            raise IntegrityError(run.root / rel, "checksum mismatch (file changed or truncated)")


def collect_garbage(run: RunDir, manifest: dict, shards: list[int]) -> None:
    """Delete every checkpoint folder of ``shards`` that the manifest does not name (real erasure)."""
    live = {e["shard"]: set(e["checkpoints"]) for e in manifest["shards"]}
    for s in shards:
        folder = run.shard_checkpoints(s)
        clean_temp_files(folder)
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name not in live.get(s, set()):
                    remove_tree(p)
    clean_temp_files(run.data_dir)
    clean_temp_files(run.root)


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
        df, config.data, config.data.test, classes=config.data.classes, feature_names=config.data.features
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


def train(
    root: str | Path,
    config: Config,
    data: pd.DataFrame | Table | None = None,
    *,
    resume: bool = False,
    placement: pd.DataFrame | None = None,
    wait_s: float = 0.0,
    runtime: list[str] | tuple[str, ...] = (),
) -> tuple[RunDir, RefreshReport]:
    """Train a SISA ensemble into ``root`` (or finish an interrupted training with ``resume``, where ``runtime``
    may override the run's runtime keys: :meth:`Config.with_runtime`)."""
    if runtime and not resume:
        raise ConfigError(
            ["train: runtime overrides are for resuming a run; a new run takes them in its config"]
        )
    run = RunDir(root, runtime)
    if resume and not run.exists():
        raise RunStateError(
            f"{root} holds no run to resume (no config.yaml); start one with `sisa train CONFIG`"
        )
    if resume:
        from .unlearning import recover  # unlearning builds on this module

        with writer_lock(run.root, wait_s, "train --resume"):
            recover(run, locked=True)  # an acknowledged deletion first, then whatever training left undone
            return run, refresh(run)
    if isinstance(data, pd.DataFrame):
        table = validate_table(data, config.data, "training data", classes=config.data.classes)
    else:
        table = data if data is not None else load_training_table(config)
    if config.data.test:  # a bad test table fails now, before anything is written
        load_test_table(resolve_config(config, table))
    Path(root).mkdir(parents=True, exist_ok=True)
    with writer_lock(Path(root), wait_s, "train"):
        run = create_run(root, config, table, placement)
        return run, refresh(run)


def _progress(config: Config, total: int):
    if not (config.training.progress and total and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="training shards", unit="shard", file=sys.stderr)
