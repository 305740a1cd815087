"""Bit-exact retrain certificates: is the served model exactly "trained without the deleted records"?

:func:`verify` retrains shards from scratch, from the current index and stored data, into a scratch folder and
compares every slice checkpoint with the live one bit for bit. On CPU (and on a GPU in deterministic mode, with the
same device, torch build and stacking) equal bits certify that the served model is exactly "trained without the
deleted records" — not merely similar to it.

The erasure check (what the run directory itself still holds) lives in :mod:`sisa.evidence.erasure`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config
from ..exceptions import IncompatibleCheckpointError, UsageError
from ..refresh import train_spec
from ..session import writer_session
from ..store.checkpoints import checkpoint_folder, checkpoint_name, load_checkpoint, read_meta, shard_folder
from ..store.rundir import RunDir
from ..store.shardfile import fingerprints, shard_data
from ..train.executors import run_jobs
from ..train.shard import ShardJob, device_name


# ---- verify: retrain and compare -------------------------------------------------------------------------------
@dataclass
class Certificate:
    """One shard's verdict: was the live model trained on exactly the stored records, bit for bit?"""

    shard: int
    records: int
    fingerprint: str | None  # the live manifest's (last named slice; None: rolled back before slice 0)
    recomputed_fingerprint: str | None  # from the stored data now
    checkpoints_compared: int
    bit_identical: bool
    max_abs_diff: float  # 0.0 when identical
    differing: list[str] = field(default_factory=list)  # "slice-001-…/model.safetensors:net.0.weight"
    seconds: float = 0.0
    rolled_back_to: int | None = None  # k: certified as trained from scratch on slices 0..k-1 only

    @property
    def ok(self) -> bool:
        return self.bit_identical and self.fingerprint == self.recomputed_fingerprint

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


def verify(
    root: str | Path, shards: list[int] | None = None, *, wait_s: float = 0.0, workdir: str | None = None
) -> list[Certificate]:
    """Retrain ``shards`` (default: all) from scratch into a scratch folder and compare with the live checkpoints.

    Holds the writer lock so the run cannot change underneath; replays pending deletions first. Raises
    :class:`IncompatibleCheckpointError` when the live checkpoints were made under a device, torch build, executor
    or (on GPU) stack width other than this process's, because bits are only comparable under the same ones.
    """
    with writer_session(root, "verify", wait_s) as run:
        config, manifest = run.config(), run.require_manifest()
        shards = select_shards(config, shards)
        entries = {e["shard"]: e for e in manifest["shards"]}
        _check_environment(run, config, entries, shards)
        with tempfile.TemporaryDirectory(prefix="sisa-verify-", dir=workdir) as scratch:
            spec = dataclasses.replace(train_spec(run, config), checkpoint_root=scratch)
            jobs, data, records = [], {}, {}
            for s in shards:
                rows = run.shard_rows(s)  # every slice file checksum-verified against the manifest
                data[s] = shard_data(rows, config.sharding.slices)
                fps = fingerprints(config.digest(), s, rows, config.sharding.slices)  # from the bytes
                jobs.append(ShardJob(s, 0, tuple(fps)))
                records[s] = len(rows)
            t0 = time.perf_counter()
            results = run_jobs(spec, jobs, data, config.training.executor)
            per_shard = (time.perf_counter() - t0) / max(len(jobs), 1)
            _check_stacking(run, config, entries, jobs, Path(scratch))
            return [
                _compare(run, entries[j.shard], j, Path(scratch), records[j.shard], r.seconds or per_shard)
                for j, r in zip(jobs, results, strict=True)
            ]


def select_shards(config: Config, shards: list[int] | None) -> list[int]:
    """The requested shards, validated (all bad numbers named at once); all shards when none are given."""
    n = config.sharding.shards
    if not shards:
        return list(range(n))
    bad = sorted({s for s in shards if not 0 <= s < n})
    if bad:
        raise UsageError([("shards", f"{s} is not a shard of this run (it has 0..{n - 1})") for s in bad])
    return sorted(set(shards))


def _check_environment(run: RunDir, config: Config, entries: dict, shards: list[int]) -> None:
    """Refuse before retraining when the live checkpoints' device or torch build differ from this process's."""
    device = config.training.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IncompatibleCheckpointError(
            f"{run.root} was trained on {device}, but this process has no CUDA device; verify it on the same "
            "GPU model (bit-exact comparison needs the same device, driver and torch build)"
        )
    here = {"device": device_name(device), "torch": torch.__version__}
    problems = set()
    for s in shards:
        for name in entries[s]["checkpoints"]:
            meta = read_meta(run.shard_checkpoints(s) / name)
            for key, value in here.items():
                if meta.get(key) != value:
                    problems.add(f"{key} {meta.get(key)!r} (this process: {value!r})")
            if device.startswith("cuda") and not meta.get("deterministic", True):
                problems.add("deterministic mode was off at training, so GPU bits are not reproducible")
    _refuse(problems, ". Run `sisa verify` where the run was trained")


def _refuse(problems: set[str], hint: str = "") -> None:
    if problems:
        made = "; ".join(sorted(problems))
        raise IncompatibleCheckpointError(
            f"cannot compare checkpoints bit for bit: live checkpoints were made with {made}{hint}"
        )


def _check_stacking(run: RunDir, config: Config, entries: dict, jobs: list[ShardJob], scratch: Path) -> None:
    """The retrain must have used the live checkpoints' executor (and, on GPU, stack width: docs/design.md §5)."""
    keys = ["executor", "stack_width"] if config.training.device.startswith("cuda") else ["executor"]
    problems = set()
    for job in jobs:
        for k, name in enumerate(entries[job.shard]["checkpoints"]):
            live = read_meta(run.shard_checkpoints(job.shard) / name)
            new = read_meta(checkpoint_folder(scratch, job.shard, k, job.fingerprints[k]))
            problems |= {
                f"{key} {live.get(key)!r} (retrain: {new.get(key)!r})"
                for key in keys
                if live.get(key) != new.get(key)
            }
    _refuse(problems)


def _compare(
    run: RunDir, entry: dict, job: ShardJob, scratch: Path, records: int, seconds: float
) -> Certificate:
    names = [checkpoint_name(k, fp) for k, fp in enumerate(job.fingerprints)]
    rolled = entry.get("rolled_back")
    if rolled:  # it serves checkpoint k-1: compared with training from scratch on its slices 0..k-1 (§4.2)
        names = names[: rolled["slice"]]
    recomputed = job.fingerprints[len(names) - 1] if names else None
    differing, max_diff = [], 0.0
    if names != entry["checkpoints"]:
        differing.append("checkpoint chain: the manifest names other fingerprints than the stored data gives")
    for k, name in enumerate(entry["checkpoints"]):
        live = load_checkpoint(run.shard_checkpoints(job.shard) / name)
        new = load_checkpoint(shard_folder(scratch, job.shard) / names[k], job.fingerprints[k])
        for part, a, b in (("model", live.model, new.model), ("optimizer", live.optimizer, new.optimizer)):
            for key in sorted(set(a) | set(b)):
                if key not in a or key not in b or a[key].shape != b[key].shape:
                    differing.append(f"{name}/{part}:{key} (missing or shape differs)")
                    max_diff = float("inf")
                elif not torch.equal(a[key], b[key]):
                    differing.append(f"{name}/{part}:{key}")
                    max_diff = max(max_diff, float((a[key].double() - b[key].double()).abs().max()))
    return Certificate(
        shard=job.shard,
        records=records,
        fingerprint=entry["fingerprint"],
        recomputed_fingerprint=recomputed,
        checkpoints_compared=len(entry["checkpoints"]),
        rolled_back_to=rolled["slice"] if rolled else None,
        bit_identical=not differing,
        max_abs_diff=max_diff,
        differing=differing,
        seconds=round(seconds, 4),
    )
