"""Repair: rebuild what a run can rebuild from itself (docs/design.md, "Durability")."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .exceptions import IntegrityError, UnrepairableError
from .refresh import plan, refresh
from .session import replay, writer_session
from .store.checkpoints import checkpoint_name, load_checkpoint
from .store.files import remove_tree
from .store.journal import Journal
from .store.rundir import RunDir


def repair(
    root: str | Path,
    shards: list[int] | None = None,
    *,
    wait_s: float = 0.0,
    runtime: list[str] | tuple[str, ...] = (),
) -> dict:
    """Rebuild what the run can rebuild from itself: every corrupted, truncated or missing checkpoint.

    Data files (index, tombstones, shard data) are checked first: a bad one cannot be rebuilt from the run alone
    (:class:`UnrepairableError`, nothing changed). Then every checkpoint the manifest names is loaded and verified;
    a bad one is deleted and :func:`refresh` retrains its shard from the last valid slice, bit-identical to the
    original on the same device. Pending deletions are replayed too.
    """
    t0 = time.perf_counter()
    with writer_session(root, "repair", wait_s, runtime, replay_first=False) as run:
        config, manifest = run.config(), run.require_manifest()
        shards = sorted(set(shards)) if shards else list(range(config.sharding.shards))
        for s in shards:
            _require_intact(lambda s=s: run.shard_rows(s))
        _require_intact(run.index)
        chains = plan(run, config, shards)[2]
        named = {e["shard"]: e["checkpoints"] for e in manifest["shards"]}
        removed = []
        for s in shards:
            removed += _remove_bad_checkpoints(run, s, chains[s]["fingerprints"], named.get(s, []))
        replayed = replay(run, Journal(run.journal_dir))
        report = refresh(run, shards)
    return {
        "run": str(run.root),
        "shards_checked": shards,
        "checkpoints_rebuilt": removed,
        "shards_retrained": {str(j.shard): j.from_slice for j in report.jobs},
        "deletions_replayed": [r["request_id"] for r in replayed],
        "generation": report.generation,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def _require_intact(read: Callable[[], object]) -> None:
    try:
        read()
    except IntegrityError as exc:
        raise UnrepairableError(exc.path, exc.reason) from None


def _remove_bad_checkpoints(run: RunDir, shard: int, fingerprints: list[str], named: list[str]) -> list[str]:
    """Delete each checkpoint of the shard's chain (as the stored data gives it) that fails verification.

    Returns the run-relative paths of those and of checkpoints the manifest names that are missing; both are
    rebuilt by the refresh that follows. Stale checkpoints of a pending deletion are left to its replay."""
    removed = []
    for k, fp in enumerate(fingerprints):
        folder = run.shard_checkpoints(shard) / checkpoint_name(k, fp)
        rel = folder.relative_to(run.root).as_posix()
        if not folder.exists():
            removed += [rel] if folder.name in named else []
            continue
        try:
            load_checkpoint(folder, fp)
        except IntegrityError:
            remove_tree(folder)
            removed.append(rel)
    return removed
