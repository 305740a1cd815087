"""Bringing a run's checkpoints in line with its stored data: the one mechanism (docs/design.md, "Refresh").

:func:`refresh` is behind training, resuming an interrupted training, deletion, crash recovery and repair: it
recomputes each shard's fingerprint chain from the stored shard data, trains every shard from the first slice
whose checkpoint (named by its fingerprint) is missing, swaps in a new manifest generation, and only then deletes
every checkpoint folder that the new generation does not name — which includes each checkpoint that was trained on
a deleted record.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Config
from .evaluation import evaluate
from .exceptions import IntegrityError
from .store.barrier import barrier
from .store.checkpoints import checkpoint_name, fingerprint_chain, is_complete, load_checkpoint
from .store.files import (
    crash_testing,
    read_checked,
    remove_tree,
    sha256_file,
)
from .store.garbage import collect_garbage
from .store.index import TOMBSTONES_FILE, index_file
from .store.rundir import RunDir
from .store.shardfile import (
    ShardData,
    ShardRows,
    from_bytes,
    shard_data_of,
    slice_digest,
    slice_file,
)
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
        # this machine's processes share its page cache: one barrier before the manifest swap makes their
        # checkpoints durable; Dask workers may write through another machine's cache: each syncs its own
        sync_checkpoints=config.training.backend == "dask",
    )


Check = Callable[[str, str], None]


def plan(
    run: RunDir,
    config: Config,
    shards: list[int],
    check: Check | None = None,
    changed: dict[int, set[int]] | None = None,
    loaded: dict | None = None,
    manifest: dict | None = None,
) -> tuple[list[ShardJob], dict[int, ShardData], dict]:
    """Jobs for the shards whose checkpoint chain is incomplete, their data, and their chains and files.

    ``changed``: per shard, the slices whose files a request rewrote; only those are read to recompute their
    digests, the others' come from the live manifest (training reads every slice file of a shard it retrains,
    each checked). None: every digest from the bytes (training, verify, repair). ``check(relative path, sha256)``
    vets each file's bytes before they are parsed; ``loaded``: (shard, slice) -> (rows, sha256) this process
    already read and verified (they are vetted again by their checksum, not read again); ``manifest``: the live one
    as the caller read it (default: read it now)."""
    digest, R, n_f = config.digest(), config.sharding.slices, len(config.data.features)
    manifest = (run.manifest() if manifest is None else manifest) or {}
    live = {e["shard"]: e for e in manifest.get("shards", [])}
    files_sha = manifest.get("files", {})
    jobs, data, chains = [], {}, {}
    for s in shards:
        entry = live.get(s)
        known = changed is not None and entry is not None and "digests" in entry
        reread = set(range(R)) if not known else set(changed.get(s, ()))
        parts, shas = {}, {}
        for k in sorted(reread):
            parts[k], shas[k] = _read_slice(run, s, k, n_f, check, loaded)
        digests = [slice_digest(parts[k]) if k in parts else entry["digests"][k] for k in range(R)]
        counts = [len(parts[k]) if k in parts else entry["slice_records"][k] for k in range(R)]
        fps = fingerprint_chain(digest, s, digests)
        first = _first_missing(run, s, fps, set(entry["checkpoints"]) if entry else set())
        if first < R:
            for k in range(R):
                if k not in parts:
                    parts[k], shas[k] = _read_slice(run, s, k, n_f, check, loaded)
            jobs.append(ShardJob(s, first, tuple(fps)))
            data[s] = shard_data_of([parts[k] for k in range(R)], R)
        files = {slice_file(s, k): shas.get(k) or files_sha.get(slice_file(s, k)) for k in range(R)}
        chains[s] = {"fingerprints": fps, "digests": digests, "slice_records": counts, "files": files}
    return jobs, data, chains


def _read_slice(
    run: RunDir, shard: int, k: int, n_features: int, check: Check | None, loaded: dict | None
) -> tuple[ShardRows, str]:
    rel = slice_file(shard, k)
    if loaded and (shard, k) in loaded:
        rows, sha = loaded[(shard, k)]
    else:
        raw, sha = read_checked(run.root / rel)
        rows = None
    if check:
        check(rel, sha)
    return (rows if rows is not None else from_bytes(raw, run.root / rel, n_features)), sha


def _first_missing(run: RunDir, shard: int, fps: list[str], live: set[str]) -> int:
    """The first slice whose checkpoint is missing. A complete folder the live manifest does not name (left by an
    interrupted retrain, written before its durability barrier) is trusted only after a full checksum load."""
    for k, fp in enumerate(fps):
        folder = run.shard_checkpoints(shard) / checkpoint_name(k, fp)
        if not is_complete(folder):
            return k
        if folder.name not in live:
            try:
                load_checkpoint(folder, fp)
            except IntegrityError:
                remove_tree(folder)
                return k
    return len(fps)


def refresh(
    run: RunDir,
    shards: list[int] | None = None,
    metrics: bool = True,
    staged: dict[str, str] | None = None,
    changed: dict[int, set[int]] | None = None,
    loaded: dict | None = None,
    early: EarlyRetrain | None = None,
) -> RefreshReport:
    """Retrain what the stored data invalidated, swap the manifest, delete stale checkpoints. Caller holds the lock.

    Every data file it reads must match the old manifest or ``staged`` (the checksums a pending request recorded
    before writing): a corrupted file is never trained on. ``changed``: the slices a request rewrote (see
    :func:`plan`). ``metrics``: score the test table into the manifest (training only; a deletion never waits for
    it). Refreshing a run that is already consistent changes nothing, not even the generation, so replaying an
    interrupted request is idempotent. ``early``: a deletion's catch-up training already under way
    (:class:`EarlyRetrain`); its results stand in for the shards whose chains it planned right."""
    t0 = time.perf_counter()
    config = run.config()
    old = run.manifest()
    shards = list(range(config.sharding.shards)) if shards is None else sorted(set(shards))
    staged = staged or {}
    early_jobs, early_chains, early_results = early.take(old, shards) if early else ([], {}, [])
    jobs, data, chains = plan(
        run,
        config,
        [s for s in shards if s not in early_chains],
        lambda rel, sha: _check_files(run, old, {rel: sha}, staged),
        changed,
        loaded,
        old,
    )
    chains.update(early_chains)
    current = {rel: sha for s in shards for rel, sha in chains[s]["files"].items()}
    index_files = {n: sha256_file(run.root / n) for n in (TOMBSTONES_FILE, *(index_file(s) for s in shards))}
    _check_files(run, old, index_files, staged)
    current.update(index_files)
    spec = train_spec(run, config)
    bar = _progress(config, len(jobs))
    results = early_results + run_jobs(
        spec, jobs, data, config.training.executor, on_done=(lambda r: bar.update(1)) if bar else None
    )
    jobs = early_jobs + jobs
    if bar:
        bar.close()
    if jobs and not spec.sync_checkpoints:  # the one barrier: every new checkpoint durable before it is named
        barrier(
            run.checkpoint_root, [run.shard_checkpoints(r.shard) / n for r in results for n in r.checkpoints]
        )
    entries = {e["shard"]: e for e in (old["shards"] if old else [])}
    files = dict(old["files"]) if old else {}
    before = {s: entries[s]["fingerprint"] for s in shards if s in entries}
    for s in shards:
        fps = chains[s]["fingerprints"]
        entries[s] = {
            "shard": s,
            "records": int(sum(chains[s]["slice_records"])),
            "fingerprint": fps[-1],
            "checkpoints": [checkpoint_name(k, fp) for k, fp in enumerate(fps)],
            "digests": chains[s]["digests"],
            "slice_records": [int(n) for n in chains[s]["slice_records"]],
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
            manifest["metrics"] = {**evaluate(run, config, manifest), "generation": generation}
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


class EarlyRetrain:
    """A deletion's catch-up training, started on a thread as soon as its rows are purged in memory, while the
    rollback writes and fsyncs its files (docs/design.md §4, "The catch-up starts early").

    :meth:`start` (called by :func:`sisa.deletion.roll_back`) plans the affected shards from the live manifest and
    the purged slices, the rollback changing nothing else, and trains them; :func:`refresh` then :meth:`take` s the
    results of each shard whose chain the rolled-back manifest confirms (the same slice digests and counts) and
    plans any other shard again. The checkpoints it writes are unnamed until refresh's manifest names them, like any
    retrain's before its barrier, so a crash meanwhile leaves the request to its replay. Under crash tests the
    training runs where refresh would train (in :meth:`take`), so crash points keep their order."""

    def __init__(self, run: RunDir, shards: list[int]):
        self.run, self.shards = run, sorted(shards)
        self._args: tuple | None = None
        self._thread: threading.Thread | None = None
        self._out: dict = {}

    def start(self, manifest: dict, loaded: dict, changed: dict[int, set[int]]) -> None:
        """Plan ``self.shards`` from the purged ``loaded`` slices (``changed``), then train them on a thread."""
        self._args = (manifest, dict(loaded), {s: set(ks) for s, ks in changed.items()})
        if not crash_testing():
            try:  # here: on the thread it would wait for the GIL behind the rollback's Python work
                self._plan()
            except Exception:  # never in the rollback's way: refresh plans these shards itself, and says why
                self._args = None
                return
            self._thread = threading.Thread(target=self._train, name="sisa-early-retrain", daemon=True)
            self._thread.start()

    def _plan(self) -> None:
        manifest, loaded, changed = self._args
        vetted = {slice_file(s, k): sha for (s, k), (_, sha) in loaded.items()}
        self._out["plan"] = plan(
            self.run,
            self.run.config(),
            self.shards,
            lambda rel, sha: _check_files(self.run, manifest, {rel: sha}, vetted),
            changed,
            loaded,
            manifest,
        )

    def names(self, shard: int) -> set[str]:
        """The checkpoint folders the planned chain of ``shard`` names (a complete one already there included,
        trusted after a full load); empty when not planned yet."""
        chain = self._out.get("plan", (None, None, {}))[2].get(shard)
        return {checkpoint_name(k, fp) for k, fp in enumerate(chain["fingerprints"])} if chain else set()

    def _train(self) -> None:
        try:
            if "plan" not in self._out:
                self._plan()
            jobs, data, _ = self._out["plan"]
            config = self.run.config()
            self._out["results"] = run_jobs(
                train_spec(self.run, config), jobs, data, config.training.executor
            )
        except BaseException as exc:  # re-raised by wait() in the caller's thread
            self._out["error"] = exc

    def wait(self) -> None:
        """Let the training finish (run it here under crash tests); raise what it raised."""
        if self._args is None:
            return
        if self._thread is None and "results" not in self._out and "error" not in self._out:
            self._train()
        elif self._thread is not None:
            self._thread.join()
        if "error" in self._out:
            raise self._out["error"]

    def take(
        self, manifest: dict | None, shards: list[int]
    ) -> tuple[list[ShardJob], dict, list[ShardResult]]:
        """Jobs, chains and results of the shards among ``shards`` whose chains ``manifest`` (the rolled-back one)
        confirms; nothing when it never started."""
        self.wait()
        if self._args is None:
            return [], {}, []
        jobs, _, chains = self._out["plan"]
        self._out["plan"] = (jobs, None, chains)  # the shard arrays: not kept past the training
        live = {e["shard"]: e for e in (manifest or {}).get("shards", [])}
        ok = {
            s
            for s in shards
            if s in chains
            and s in live
            and live[s].get("digests") == chains[s]["digests"]
            and live[s].get("slice_records") == chains[s]["slice_records"]
        }
        self._args = None  # taken once
        return (
            [j for j in jobs if j.shard in ok],
            {s: chains[s] for s in ok},
            [r for r in self._out["results"] if r.shard in ok],
        )


def _check_files(run: RunDir, old: dict | None, current: dict[str, str], staged: dict[str, str]) -> None:
    """Refuse to train on a data file that is neither the manifest's version nor one a deletion staged."""
    named = (old or {}).get("files", {})
    for rel, sha in current.items():
        if rel in named and sha not in (named[rel], staged.get(rel)):
            raise IntegrityError(run.root / rel, "checksum mismatch (file changed or truncated)")


def _progress(config: Config, total: int):
    if not (config.training.progress and total and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="training shards", unit="shard", file=sys.stderr)
