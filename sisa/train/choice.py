"""Choosing how a run's shards train: executor, lanes and stack width, decided once when its config is resolved.

The choice is saved in the run's frozen config (``training.executor``, ``stack_threads``, ``stack_size``), so a
retrain trains as the original training did (docs/design.md, "Stacked shards").
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Config
from ..exceptions import ConfigError
from . import units
from .models import shard_model
from .optim import Optimizer
from .shard import batch_loss, resolve_device
from .stacked_models import ShardStack, SliceRunner, batched_forward, module_tensors, stacked_loss
from .units import stacking_mode

log = logging.getLogger("sisa")

# executor: auto on CPU (exact mode). Exact stacking runs the loop's own kernels, so on one core what it saves is
# per-step overhead (one optimizer update and one backward call for the group, no per-shard Python step), and
# lanes (stack_threads) add the other cores. Measured with scripts/bench_stacked.py on this 2-core CPU
# (docs/stacking.md): models of <50k parameters are overhead-bound, so one lane stacks them 1.5-1.8x faster than
# the loop and two lanes are slower (1.25-1.37x: their Python steps take turns); models whose matmuls or
# convolutions dominate (600-128-100 Purchase MLP: 90k parameters, 784-256-10: 200k, the CNN) gain nothing from
# stacking on one core (0.95-1.05x) and 1.6-1.76x from two lanes. On CUDA (batched mode) the stack replaces S launch-bound shards by
# one: docs/design.md §7 measured 13-35x (MLP) and 2.9x (CNN) on an H100.
CPU_STACKED_MAX_PARAMS = 50_000


def model_kind(config: Config) -> str:
    return config.model.name if config.model.name in ("mlp", "cnn") else "custom"


@dataclass(frozen=True)
class TrainingChoice:
    """What resolving a config decides about how its shards train (saved in the run's frozen config)."""

    executor: str  # loop | stacked
    stack_threads: int  # lanes: threads that train stacked groups side by side (outside the digest)
    stack_size: int  # shards per stacked group


def choose_training(config: Config) -> TrainingChoice:
    """Resolve ``training.executor`` (``auto`` -> fastest for this model and device), ``stack_threads`` and
    ``stack_size`` (null -> from ``memory_budget_mb`` for ``stacked``, 1 for the loop) for a config being
    resolved; the config is not changed. The model is built once, on its shapes only. A model that cannot be
    stacked falls back to the loop under ``auto`` with a one-line logged reason; under an explicit ``stacked`` it
    is a ConfigError.
    """
    t = config.training
    device = resolve_device(t.device)
    model = shape_model(config)
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
            executor = auto_executor(config, device, model)
    stacked = executor == "stacked"
    threads = t.stack_threads or (default_stack_threads(config, device, model) if stacked else 1)
    size = t.stack_size or (default_stack_size(config, model, threads) if stacked else 1)
    return TrainingChoice(executor, threads, size)


def shape_model(config: Config) -> torch.nn.Module:
    """The config's model at its run's shapes (any seed): what sizing decisions look at."""
    n_f, n_c = len(config.data.features or []), len(config.data.classes or [])
    return shard_model(config, 0, max(n_f, 1), max(n_c, 2))


def auto_executor(config: Config, device: str, model: torch.nn.Module | None = None) -> str:
    """The faster executor for this model on this device (see CPU_STACKED_MAX_PARAMS)."""
    if stacking_mode(device) != "exact" or overhead_bound(config, model):
        return "stacked"
    return "stacked" if units.available_cores() > 1 else "loop"


def default_stack_threads(config: Config, device: str, model: torch.nn.Module | None = None) -> int:
    """Lanes for a stacked run: the cores for models whose kernels dominate; one for overhead-bound models (their
    Python steps would contend for the GIL) and on CUDA (one stream of full-width calls)."""
    if stacking_mode(device) != "exact" or overhead_bound(config, model):
        return 1
    return units.available_cores()


def overhead_bound(config: Config, model: torch.nn.Module | None = None) -> bool:
    """A model small enough that per-step overhead, not its kernels, sets the pace on CPU."""
    return model_kind(config) != "cnn" and parameter_count(config, model) <= CPU_STACKED_MAX_PARAMS


def parameter_count(config: Config, model: torch.nn.Module | None = None) -> int:
    model = model if model is not None else shape_model(config)
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
    models = [shard_model(config, seed, n_f, n_c) for seed in (1, 2)]
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


def shard_memory_bytes(config: Config, model: torch.nn.Module | None = None) -> int:
    """Estimated bytes one shard adds to a stacked group: parameters with their gradients, optimizer state and
    temporaries (6x), one batch's input, and its saved activations and their gradients (2x)."""
    n_f, n_c = len(config.data.features or []), len(config.data.classes or [])
    bs = config.training.batch_size
    model = model if model is not None else shape_model(config)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return 6 * params + 2 * _activation_bytes(model, bs, max(n_f, 1), max(n_c, 2)) + 2 * bs * n_f * 4


def _activation_bytes(model: torch.nn.Module, bs: int, n_f: int, n_c: int) -> int:
    """Bytes autograd saves for one batch's backward: counted on real forwards of 2 and 3 rows on the CPU (in
    training mode, on a forked RNG) and extended linearly to ``bs`` rows (saved tensors are the parameters plus per-row activations). Not on the meta
    device: its kernels import torch._dynamo and sympy, 70 MB that training never needs."""

    def saved(rows: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.zeros(rows, n_f)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.cross_entropy(probe(x), torch.zeros(rows, dtype=torch.int64))
        return total

    try:
        probe = copy.deepcopy(model).to("cpu").train()
        with torch.random.fork_rng(devices=[]):
            two, three = saved(2), saved(3)
    except Exception:  # a module that cannot run on a few rows: assume a few activations of the input's size
        return 4 * bs * (n_f + n_c) * 4
    return two + (three - two) * (bs - 2)


def default_stack_size(config: Config, model: torch.nn.Module | None = None, lanes: int | None = None) -> int:
    """Shards per group so that the groups training at once (one per lane) stay within
    ``training.memory_budget_mb`` together (at least 1, at most S)."""
    per_shard = max(shard_memory_bytes(config, model), 1)
    lanes = lanes or config.training.stack_threads or 1
    budget = config.training.memory_budget_mb * 2**20 // max(1, lanes)
    return int(max(1, min(config.sharding.shards, budget // per_shard)))
