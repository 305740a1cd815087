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
- CUDA (``batched`` mode): a shard's bits depend on the width of the kernels it runs in (DESIGN §7), not on the
  other shards' values. So shards are grouped by shard number (group ``shard // width``, slot ``shard % width``)
  and every step runs the full group width — a retrain puts the affected shards in their original slots and fills
  the rest with idle zero shards (unaffected shards "ride along" as placeholders and nothing of them is kept).
  Shards with different batch sizes at a step (an epoch's last batch) run as separate full-width calls, one per
  batch size, so a shard's kernels never depend on its neighbours' row counts.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import torch
import torch.nn.functional as F

from ..config import Config
from ..exceptions import ConfigError
from .executors import work_units
from .lockstep import GroupTrainer, LaneStopped
from .models import build_model
from .optim import Optimizer
from .shard import (
    ShardData,
    ShardJob,
    ShardResult,
    TrainSpec,
    batch_loss,
    configure_torch,
    resolve_device,
)
from .stacked_models import ShardStack, SliceRunner, batched_forward, module_tensors, stacked_loss

log = logging.getLogger("sisa")

# How a stack runs on each device type (sisa.train.stacked_models). Tests switch CPU to "batched" to exercise the GPU rule.
MODES = {"cpu": "exact", "cuda": "batched"}

# executor: auto on CPU (exact mode). Exact stacking runs the loop's own kernels, so on one core what it saves is
# per-step overhead (one optimizer update and one backward call for the group, no per-shard Python step), and
# lanes (stack_threads) add the other cores. Measured with scripts/bench_stacked.py on this 2-core CPU
# (docs/stacking.md): models of <50k parameters are overhead-bound, so one lane stacks them 1.5-1.8x faster than
# the loop and two lanes are slower (1.25-1.37x: their Python steps take turns); models whose matmuls or
# convolutions dominate (600-128-100 Purchase MLP: 90k parameters, 784-256-10: 200k, the CNN) gain nothing from
# stacking on one core (0.95-1.05x) and 1.6-1.76x from two lanes. On CUDA (batched mode) the stack replaces S launch-bound shards by
# one: DESIGN §7 measured 13-35x (MLP) and 2.9x (CNN) on an H100.
CPU_STACKED_MAX_PARAMS = 50_000


def stacking_mode(device: str) -> str:
    return MODES.get(device.split(":")[0], "batched")


def model_kind(config: Config) -> str:
    return config.model.name if config.model.name in ("mlp", "cnn") else "custom"


# ---- resolving the executor and the stack width ------------------------------------------------------------------
def choose_executor(config: Config) -> str:
    """Resolve ``training.executor`` (``auto`` -> fastest for this model and device) for a config being resolved.

    Also resolves ``training.stack_size`` when it is null (from ``memory_budget_mb`` for ``stacked``, 1 for the
    loop), in place on ``config``, so the saved config and its digest record the stacking the run used. A model
    that cannot be stacked falls back to the loop under ``auto`` with a one-line logged reason; under an explicit
    ``stacked`` it is a ConfigError.
    """
    t = config.training
    device = resolve_device(t.device)
    executor = t.executor
    if executor != "loop":
        reason = stacking_obstacle(config, device)
        if reason and executor == "stacked":
            name = config.model.name
            raise ConfigError(
                [f"training.executor: stacked cannot train model {name!r} ({reason}); use loop or auto"]
            )
        if reason:
            log.warning(
                "training.executor auto: model %s cannot be stacked (%s); using loop",
                config.model.name,
                reason,
            )
            executor = "loop"
        elif executor == "auto":
            executor = auto_executor(config, device)
    if t.stack_threads is None:
        t.stack_threads = default_stack_threads(config, device) if executor == "stacked" else 1
    if t.stack_size is None:
        t.stack_size = default_stack_size(config) if executor == "stacked" else 1
    return executor


def auto_executor(config: Config, device: str) -> str:
    """The faster executor for this model on this device (see CPU_STACKED_MAX_PARAMS)."""
    if stacking_mode(device) != "exact" or overhead_bound(config):
        return "stacked"
    return "stacked" if available_cores() > 1 else "loop"


def default_stack_threads(config: Config, device: str) -> int:
    """Lanes for a stacked run: the cores for models whose kernels dominate; one for overhead-bound models (their
    Python steps would contend for the GIL) and on CUDA (one stream of full-width calls)."""
    if stacking_mode(device) != "exact" or overhead_bound(config):
        return 1
    return available_cores()


def overhead_bound(config: Config) -> bool:
    """A model small enough that per-step overhead, not its kernels, sets the pace on CPU."""
    return model_kind(config) != "cnn" and parameter_count(config) <= CPU_STACKED_MAX_PARAMS


def parameter_count(config: Config) -> int:
    n_f, n_c = len(config.data.features or []), len(config.data.classes or [])
    model = build_model(config.model, max(n_f, 1), max(n_c, 2), 0)
    return sum(p.numel() for p in model.parameters())


def stacking_obstacle(config: Config, device: str) -> str | None:
    """None when the model trains stacked on ``device``; else a one-line reason (tried on a tiny probe step)."""
    if model_kind(config) != "custom" or not config.data.features or not config.data.classes:
        return None
    try:
        with torch.random.fork_rng(devices=[]):  # a user's dropout must not move the caller's RNG
            _probe_step(config, device)
    except Exception as exc:  # any failure of a user's module means "cannot stack", never a crash here
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"{type(exc).__name__}: {first}"
    return None


def _probe_step(config: Config, device: str) -> None:
    n_f, n_c = len(config.data.features), len(config.data.classes)
    models = [build_model(config.model, n_f, n_c, seed) for seed in (1, 2)]
    stack = ShardStack(models[0], [module_tensors(m) for m in models], device)
    x = torch.randn(2, 3, n_f, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.zeros(2, 3, dtype=torch.int64, device=device)
    if stacking_mode(device) == "exact":
        runner = SliceRunner(stack)
        runner.bind()
        losses = [batch_loss(runner.forward(i, x[i, : 3 - i]), y[i, : 3 - i]) for i in range(2)]
        torch.autograd.backward(losses)
    else:
        logits = batched_forward(stack, x, lambda h: h, stack.buffers)
        if logits.shape != (2, 3, n_c):
            raise ValueError(f"stacked logits have shape {tuple(logits.shape)}, expected (2, 3, {n_c})")
        stacked_loss(logits, y, torch.arange(2, device=device)).backward()
    Optimizer(config.training, stack.params, stack=2).step()


def shard_memory_bytes(config: Config) -> int:
    """Estimated bytes one shard adds to a stacked group: parameters with their gradients, optimizer state and
    temporaries (6x), one batch's input, and its saved activations and their gradients (2x)."""
    n_f, n_c = len(config.data.features or []), len(config.data.classes or [])
    bs = config.training.batch_size
    model = build_model(config.model, max(n_f, 1), max(n_c, 2), 0)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return 6 * params + 2 * _activation_bytes(model, bs, max(n_f, 1), max(n_c, 2)) + 2 * bs * n_f * 4


def _activation_bytes(model: torch.nn.Module, bs: int, n_f: int, n_c: int) -> int:
    """Bytes autograd saves for one batch's backward, counted on the meta device (no memory, no compute)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    try:
        meta = copy.deepcopy(model).to("meta")
        x = torch.zeros(bs, n_f, device="meta")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.cross_entropy(meta(x), torch.zeros(bs, dtype=torch.int64, device="meta"))
    except Exception:  # a module that cannot run on meta: assume a few activations of the input's size
        return 4 * bs * (n_f + n_c) * 4
    return total


def default_stack_size(config: Config) -> int:
    """Shards per group so that the groups training at once (one per lane) stay within
    ``training.memory_budget_mb`` together (at least 1, at most S)."""
    per_shard = max(shard_memory_bytes(config), 1)
    budget = config.training.memory_budget_mb * 2**20 // max(1, config.training.stack_threads or 1)
    return int(max(1, min(config.sharding.shards, budget // per_shard)))


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
    with torch.random.fork_rng(devices=[]):
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
    return max(1, min(t.stack_threads or 1, n_jobs, available_cores()))


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
        results.update(GroupTrainer(spec, slots, data, mode, stop).run())
    return results


def plan_groups(jobs: list[ShardJob], width: int, mode: str, n_shards: int) -> list[list[ShardJob | None]]:
    """Slots of each group. exact: the jobs themselves, ``width`` at a time. batched: the fixed groups
    ``range(g*width, (g+1)*width)`` of every shard number that has a job; slots without a job stay empty."""
    if mode == "exact":
        return [list(jobs[i : i + width]) for i in range(0, len(jobs), width)]
    by_group: dict[int, list[ShardJob | None]] = {}
    for job in sorted(jobs, key=lambda j: j.shard):
        g = job.shard // width
        slots = by_group.setdefault(g, [None] * (min(n_shards, (g + 1) * width) - g * width))
        slots[job.shard % width] = job
    return [by_group[g] for g in sorted(by_group)]
