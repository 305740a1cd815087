"""Slice-by-slice training of one shard, with a checkpoint after every slice.

This module holds the parts every executor shares: the job description (:class:`ShardJob`), the shard's arrays
(:class:`ShardData`), the epoch schedule, seed derivation, torch set-up and :func:`train_shard` — the per-shard
loop that the ``loop`` executor runs in-process, in joblib workers or on Dask workers. The stacked executor
(``sisa.train.stacking``) trains several shards at once and writes the same checkpoints.

Step k trains on the cumulative slices 0..k, resuming from checkpoint k-1, for ``2e/(R+1)`` epochs (e' = 2R/(R+1)·e
over the R steps, so the total sample passes equal e epochs of an unsliced shard). A fractional epoch trains on a
prefix of that epoch's permutation. Every random draw comes from a generator seeded by (seed, shard, slice, epoch).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config
from ..store.barrier import writes_drained
from ..store.checkpoints import checkpoint_folder, load_checkpoint, save_checkpoint
from ..store.shardfile import ShardData
from .models import fit_prefix, seed_global_rng, shard_model
from .optim import Optimizer


@dataclass(frozen=True)
class TrainSpec:
    """Everything a worker needs besides the data: picklable, no open files."""

    config: Config
    n_features: int
    n_classes: int
    config_digest: str
    checkpoint_root: str  # run_dir/checkpoints
    device: str  # resolved: cpu | cuda
    # fsync every checkpoint as it is written; False where the caller syncs once before trusting them (one
    # barrier for this machine's filesystem: docs/design.md §4)
    sync_checkpoints: bool = True


@dataclass(frozen=True)
class ShardJob:
    """Train ``shard`` from slice ``from_slice`` (0 = from initialisation) to its last slice."""

    shard: int
    from_slice: int
    fingerprints: tuple[str, ...]  # expected fingerprint of every slice of the shard


@dataclass
class ShardResult:
    shard: int
    from_slice: int
    checkpoints: list[str] = field(default_factory=list)  # names of the checkpoints written, slice order
    optimizer_steps: int = 0
    samples: int = 0
    seconds: float = 0.0


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed derived from the root seed and a purpose path, e.g. ("perm", shard, slice, epoch)."""
    text = "/".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def epochs_per_slice(epochs: float, slices: int) -> float:
    return 2.0 * float(epochs) / (slices + 1)


def epoch_rows(epochs: float, slices: int, n_rows: int) -> list[int]:
    """Rows visited by each (possibly partial) epoch of one slice step over ``n_rows`` cumulative rows."""
    eps = epochs_per_slice(epochs, slices)
    full = math.floor(eps + 1e-9)
    frac = eps - full
    rows = [n_rows] * full
    if frac > 1e-9:
        rows.append(int(round(frac * n_rows)))
    return rows


def resolve_device(device: str) -> str:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must precede CUDA start for determinism
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def configure_torch(spec: TrainSpec) -> None:
    """Per-process torch settings that are part of the result: thread count and determinism (docs/design.md §2.7).

    Deterministic mode is switched on for CUDA, where it selects deterministic kernels. On CPU the kernels sisa
    uses are deterministic at a fixed thread count already (the exactness tests prove it), and switching the mode
    imports torch._dynamo: about 2 s added to every CLI process and every fresh worker, for nothing."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.get_num_threads() != spec.config.training.threads:
        torch.set_num_threads(spec.config.training.threads)
    want = bool(spec.config.training.deterministic) and spec.device.startswith("cuda")
    if torch.are_deterministic_algorithms_enabled() != want:
        torch.use_deterministic_algorithms(want)
    torch.backends.cudnn.benchmark = False


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def batch_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one batch (the stacked executor sums this over shards)."""
    return F.cross_entropy(logits, targets)


def checkpoint_dir(spec: TrainSpec, shard: int, slice_idx: int, fingerprint: str) -> Path:
    return checkpoint_folder(spec.checkpoint_root, shard, slice_idx, fingerprint)


def checkpoint_meta(
    spec: TrainSpec,
    job: ShardJob,
    k: int,
    records: int,
    samples: int,
    steps: int,
    executor: str,
    stack_width: int,
) -> dict:
    t = spec.config.training
    return {
        "shard": job.shard,
        "slice": k,
        "fingerprint": job.fingerprints[k],
        "parent": job.fingerprints[k - 1] if k else None,
        "config_digest": spec.config_digest,
        "records": records,
        "samples_this_slice": samples,
        "optimizer_steps": steps,
        "device": device_name(spec.device),
        "torch": torch.__version__,
        "executor": executor,
        "stack_width": stack_width,
        "threads": t.threads,
        "deterministic": t.deterministic,
    }


def initial_state(spec: TrainSpec, job: ShardJob, data: ShardData):
    """A fresh model and optimizer for the shard, or both restored from checkpoint ``from_slice - 1``.

    A fresh model's fitted prefix (``scaling: slice0`` columns) is fitted on the shard's slice-0 rows only
    (docs/preprocessing.md): a deletion there retrains from here, and a later one restores the statistics."""
    cfg = spec.config
    seed = derive_seed(cfg.training.seed, "init", job.shard)
    model = shard_model(cfg, seed, spec.n_features, spec.n_classes)
    if job.from_slice == 0:
        fit_prefix(model, np.asarray(data.features[: int(data.slice_ends[0])], dtype=np.float32))
    model = model.to(spec.device)
    opt = Optimizer(cfg.training, dict(model.named_parameters()))
    if job.from_slice > 0:
        k = job.from_slice - 1
        ck = load_checkpoint(checkpoint_dir(spec, job.shard, k, job.fingerprints[k]), job.fingerprints[k])
        model.load_state_dict(ck.model)
        opt.load_state_dict(ck.optimizer)
    return model, opt


def train_shard(spec: TrainSpec, job: ShardJob, data: ShardData, executor: str = "loop") -> ShardResult:
    """Train one shard from ``job.from_slice`` to the end, writing a checkpoint after every slice (each on the
    filesystem when this returns)."""
    with writes_drained():
        return _train_shard(spec, job, data, executor)


def _train_shard(spec: TrainSpec, job: ShardJob, data: ShardData, executor: str) -> ShardResult:
    configure_torch(spec)
    t0 = time.perf_counter()
    model, opt = initial_state(spec, job, data)
    # copied only when not already a writable float32 array of its own (refresh.plan builds one per shard)
    X = torch.as_tensor(np.require(data.features, np.float32, ["C", "W"]), device=spec.device)
    y = torch.as_tensor(np.require(data.labels, np.int64, ["C", "W"]), device=spec.device)
    result = ShardResult(job.shard, job.from_slice)
    model.train()
    for event in shard_schedule(spec.config, job, data):
        if isinstance(event, EpochStart):
            seed_global_rng(event.dropout_seed, spec.device)
        elif isinstance(event, Batch):
            idx = event.rows.to(spec.device)
            for p in model.parameters():
                p.grad = None
            # index_select, not X[idx]: 4x faster for a row gather, and it releases the GIL (lanes, servers)
            batch_loss(model(X.index_select(0, idx)), y.index_select(0, idx)).backward()
            opt.step()
            result.optimizer_steps += 1
        else:
            result.samples += event.samples
            meta = checkpoint_meta(
                spec, job, event.slice, event.records, event.samples, int(opt.steps), executor, 1
            )
            folder = checkpoint_dir(spec, job.shard, event.slice, job.fingerprints[event.slice])
            save_checkpoint(folder, model.state_dict(), opt.state_dict(), meta, sync=spec.sync_checkpoints)
            result.checkpoints.append(folder.name)
    result.seconds = time.perf_counter() - t0
    return result


@dataclass(frozen=True)
class EpochStart:
    """A (slice, epoch) begins: dropout draws restart from a generator seeded by (seed, shard, slice, epoch)."""

    slice: int
    epoch: int
    dropout_seed: int


@dataclass(frozen=True)
class Batch:
    """One optimizer step on these rows of the shard (indices into its arrays, in batch order)."""

    rows: torch.Tensor


@dataclass(frozen=True)
class SliceEnd:
    """Slice ``slice`` is done: checkpoint it. ``records`` rows (slices 0..k), ``samples`` visited this step."""

    slice: int
    records: int
    samples: int


def shard_schedule(config: Config, job: ShardJob, data: ShardData) -> Iterator[EpochStart | Batch | SliceEnd]:
    """The shard's whole training schedule as events, from ``job.from_slice`` to its last slice.

    Every executor runs exactly this sequence (the stacked one runs several in lockstep), so epochs, permutations
    and batch boundaries depend only on (seed, shard, slice, epoch) and the shard's own rows."""
    t, R = config.training, config.sharding.slices
    for k in range(job.from_slice, R):
        n_k = int(data.slice_ends[k])
        samples = 0
        for j, rows in enumerate(epoch_rows(t.epochs, R, n_k)):
            perm = epoch_permutation(t.seed, job.shard, k, j, n_k)[:rows]
            yield EpochStart(k, j, derive_seed(t.seed, "dropout", job.shard, k, j))
            for start in range(0, rows, t.batch_size):
                yield Batch(perm[start : start + t.batch_size])
            samples += rows
        yield SliceEnd(k, n_k, samples)


def epoch_permutation(seed: int, shard: int, slice_idx: int, epoch: int, n_rows: int) -> torch.Tensor:
    """The batch order of one epoch: a permutation drawn from a generator seeded by (seed, shard, slice, epoch)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "perm", shard, slice_idx, epoch))
    return torch.randperm(n_rows, generator=g)
