"""Bringing a run's checkpoints in line with its stored data: the one mechanism (docs/design.md, "Refresh").

:func:`refresh` is behind training, resuming an interrupted training, deletion, crash recovery and repair: it
recomputes each shard's fingerprint chain from the stored shard data, trains every shard from the first slice
whose checkpoint (named by its fingerprint) is missing, swaps in a new manifest generation, and only then deletes
every checkpoint folder that the new generation does not name — which includes each checkpoint that was trained on
a deleted record.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Config
from .evaluation import evaluate
from .exceptions import IntegrityError
from .store.checkpoints import checkpoint_name, is_complete
from .store.files import clean_temp_files, parse_parquet, remove_tree, sha256_bytes, sha256_file
from .store.index import INDEX_FILE, TOMBSTONES_FILE
from .store.rundir import RunDir
from .store.shardfile import ShardData, data_file, fingerprints, shard_data
from .train.executors import run_jobs
from .train.shard import ShardJob, ShardResult, TrainSpec


@dataclass
class RefreshReport:
    generation: int
    jobs: list[ShardJob] = field(default_factory=list)
    results: list[ShardResult] = field(default_factory=list)
    before: dict[int, str] = field(default_factory=dict)  # shard -> last fingerprint before
    after: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0


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
            check(data_file(s), sha)
        frame = parse_parquet(raw, path)
        d = shard_data(frame, config.data.features, R)
        fps = fingerprints(digest, s, frame, d)
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
    current = {data_file(s): chains[s]["sha256"] for s in shards}
    index_files = {n: sha256_file(run.root / n) for n in (INDEX_FILE, TOMBSTONES_FILE)}
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


def _progress(config: Config, total: int):
    if not (config.training.progress and total and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="training shards", unit="shard", file=sys.stderr)
