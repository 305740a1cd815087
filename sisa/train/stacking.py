"""Stacked shards: train a set of (shard, from-slice) jobs as one batched model, exactly.

SISA trains S small models of one architecture; trained one after another each spends most of its time on per-step
overhead (a GPU launches a handful of tiny kernels per step). The stacked executor holds a group of shards' weights
as ``[width, ...]`` tensors and steps the whole group at once with one optimizer (:mod:`sisa.train.optim` keeps a step
count per shard and skips masked shards bit for bit).

**Lockstep.** Every shard runs its own schedule (:func:`sisa.train.shard.shard_schedule`: the same epochs,
permutations and batch boundaries as the loop); the group executes global step t as "step t of every shard that
still has one". Shards of different sizes, or resuming from different slices, simply finish at different steps; a
shard with no batch at a step takes no optimizer step at all. Checkpoints are written per shard per slice, in the
loop's format, the moment that shard finishes a slice.

**Exactness and the stacking rule** (:mod:`sisa.train.stacked_models` has the two modes, :mod:`sisa.train.lockstep` the loop):

- CPU (``exact`` mode): a shard's bits equal the loop's, at any stack width, for any model. So a retrain stacks
  only the affected shards: its cost grows with the number of affected shards, not with S. The jobs are split into
  ``training.stack_threads`` lanes, threads that train their own groups side by side on the other cores.
- CUDA (``batched`` mode): a shard's bits depend on the width of the kernels it runs in (docs/design.md §7), not on the
  other shards' values. So shards are grouped by shard number (group ``shard // width``, slot ``shard % width``)
  and every step runs the full group width — a retrain puts the affected shards in their original slots and fills
  the rest with idle zero shards (unaffected shards "ride along" as placeholders and nothing of them is kept).
  Shards with different batch sizes at a step (an epoch's last batch) run as separate full-width calls, one per
  batch size, so a shard's kernels never depend on its neighbours' row counts.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import torch

from ..config import Config
from ..store.barrier import writes_drained
from . import units
from .choice import default_stack_size
from .lockstep import GroupTrainer, LaneStopped
from .shard import ShardData, ShardJob, ShardResult, TrainSpec, configure_torch, train_shard
from .units import fixed_groups, stacking_mode, work_units


# ---- training ----------------------------------------------------------------------------------------------------
def train_stacked(spec: TrainSpec, jobs: list[ShardJob], data: dict[int, ShardData]) -> list[ShardResult]:
    """Train every job, a group of shards at a time; results in job order.

    In exact mode the jobs are split into ``training.stack_threads`` balanced lanes that train side by side in
    threads of this process, each shard's kernels single-threaded as in the loop, so a stack uses every core
    without changing a bit (a shard's result does not depend on its stack, its lane or its neighbours)."""
    configure_torch(spec)
    mode = stacking_mode(spec.device)
    cfg = spec.config
    width = cfg.training.stack_size or default_stack_size(cfg)
    lanes = stack_lanes(cfg, mode, len(jobs))
    # exact mode swaps each shard's dropout stream in and out of the global RNG: leave the caller's as it was
    with writes_drained(), torch.random.fork_rng(devices=[]):
        if lanes == 1:
            results = _train_groups(spec, jobs, data, width, mode)
        else:
            results = _train_lanes(spec, work_units(spec, jobs, data, "stacked", lanes), data, width, mode)
    return [results[j.shard] for j in jobs]


def _train_lanes(
    spec: TrainSpec, units: list[list[ShardJob]], data: dict[int, ShardData], width: int, mode: str
) -> dict[int, ShardResult]:
    """One thread per unit. When a lane fails, or the caller is interrupted (Ctrl-C), the other lanes stop at their
    next step; the first error is raised once every lane has ended (checkpoints written so far stay valid)."""
    stop, results = threading.Event(), {}
    with ThreadPoolExecutor(len(units), thread_name_prefix="sisa-stack") as pool:
        futures = [pool.submit(_train_groups, spec, unit, data, width, mode, stop) for unit in units]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            if not all(f.done() and f.exception() is None for f in futures):
                stop.set()
        errors = [f.exception() for f in futures if f.exception() is not None]
        first = next((e for e in errors if not isinstance(e, LaneStopped)), errors[0] if errors else None)
        if first is not None:
            raise first
        for future in futures:
            results.update(future.result())
    return results


def stack_lanes(config: Config, mode: str, n_jobs: int) -> int:
    """Threads that train this process's stacked jobs: ``stack_threads`` in exact mode when this process is the
    only trainer (with ``n_jobs`` > 1 or Dask each worker process is already one lane), else 1. Never more than
    this machine's cores (a run trained on a bigger machine keeps its saved value; lanes do not change bits) or
    than the jobs."""
    t = config.training
    if mode != "exact" or t.n_jobs > 1 or t.backend != "local":
        return 1
    return max(1, min(t.stack_threads or 1, n_jobs, units.available_cores()))


def _train_groups(
    spec: TrainSpec,
    jobs: list[ShardJob],
    data: dict[int, ShardData],
    width: int,
    mode: str,
    stop: threading.Event | None = None,
) -> dict[int, ShardResult]:
    # OpenMP keeps its thread count per thread: set it in every lane, so its kernels run as the loop's do
    torch.set_num_threads(spec.config.training.threads)
    results: dict[int, ShardResult] = {}
    for slots in plan_groups(jobs, width, mode, spec.config.sharding.shards):
        if mode == "exact" and len(slots) == 1 and stop is None:
            # a stack of one in exact mode computes what the loop does, bit for bit (tests/test_stacking.py):
            # run the loop's code, without the stack's per-step bookkeeping (a one-shard deletion's retrain)
            (job,) = slots
            results[job.shard] = train_shard(spec, job, data[job.shard], executor="stacked")
            continue
        results.update(GroupTrainer(spec, slots, data, mode, stop).run())
    return results


def plan_groups(jobs: list[ShardJob], width: int, mode: str, n_shards: int) -> list[list[ShardJob | None]]:
    """Slots of each group. exact: the jobs themselves, ``width`` at a time. batched: the fixed groups
    ``range(g*width, (g+1)*width)`` of every shard number that has a job; slots without a job stay empty."""
    if mode == "exact":
        return [list(jobs[i : i + width]) for i in range(0, len(jobs), width)]
    out = []
    for g, members in fixed_groups(jobs, width).items():
        slots: list[ShardJob | None] = [None] * (min(n_shards, (g + 1) * width) - g * width)
        for job in members:
            slots[job.shard % width] = job
        out.append(slots)
    return out
