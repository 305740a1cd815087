"""Work units: how a set of (shard, from-slice) jobs is split so that where a unit runs never changes its bits.

Shared by the executors (units across worker processes) and the stacked executor (units across lanes, groups of
a fixed width on CUDA). docs/design.md, "Stacked shards", says why each split is exact.
"""

from __future__ import annotations

import os

from .shard import ShardData, ShardJob, TrainSpec

# How a stack runs on each device type (sisa.train.stacked_models). Tests switch CPU to "batched" to exercise the
# GPU rule.
MODES = {"cpu": "exact", "cuda": "batched"}


def stacking_mode(device: str) -> str:
    return MODES.get(device.split(":")[0], "batched")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def fixed_groups(jobs: list[ShardJob], width: int) -> dict[int, list[ShardJob]]:
    """Jobs by fixed group ``shard // width`` (batched mode: a shard's bits depend on its group), in group order
    and shard order within a group."""
    groups: dict[int, list[ShardJob]] = {}
    for job in sorted(jobs, key=lambda j: j.shard):
        groups.setdefault(job.shard // width, []).append(job)
    return dict(sorted(groups.items()))


def work_units(
    spec: TrainSpec, jobs: list[ShardJob], data: dict[int, ShardData], executor: str, workers: int
) -> list[list[ShardJob]]:
    """Split the jobs into units that may run in different processes without changing any result.

    loop: one job per unit (largest first when there are several workers). stacked on CPU (exact mode: a
    shard's bits do not depend on its stack): one unit per worker, balanced by rows to retrain. stacked on CUDA
    (batched mode: a shard's bits depend on the group it trains in): one unit per fixed group
    ``shard // stack_size``, the groups the in-process executor forms.
    """
    if executor != "stacked":
        return [[jobs[i]] for i in (_largest_first(jobs, data) if workers > 1 else range(len(jobs)))]
    t = spec.config.training
    if stacking_mode(spec.device) != "exact":
        return list(fixed_groups(jobs, t.stack_size or spec.config.sharding.shards).values())
    bins: list[list[int]] = [[] for _ in range(max(1, min(workers, len(jobs))))]
    load = [0] * len(bins)
    for i in _largest_first(jobs, data):  # greedy: the next largest job to the least loaded worker
        b = load.index(min(load))
        bins[b].append(i)
        load[b] += int(data[jobs[i].shard].slice_ends[-1]) - _rows_before(jobs[i], data)
    return [[jobs[i] for i in sorted(b)] for b in bins if b]


def _rows_before(job: ShardJob, data: dict[int, ShardData]) -> int:
    return int(data[job.shard].slice_ends[job.from_slice - 1]) if job.from_slice else 0


def _largest_first(jobs: list[ShardJob], data: dict[int, ShardData]) -> list[int]:
    """Job positions, most rows to retrain first, so the last job to start is a short one."""
    return sorted(range(len(jobs)), key=lambda i: -int(data[jobs[i].shard].slice_ends[-1]))
