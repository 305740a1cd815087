"""Lockstep: the shards of one stacked group trained together, each on its own schedule.

Global step t runs "step t of every shard that still has one" (:func:`sisa.train.shard.shard_schedule` gives each
shard exactly the loop's epochs, permutations and batch boundaries). Between steps each shard's schedule is run up
to its next batch: an epoch start reseeds the shard's own dropout stream, a slice end writes the shard's checkpoint
in the loop's format. A shard without a batch at a step is masked out of the optimizer step (no change at all).
How one step is computed is the stacking mode's business (:mod:`sisa.train.stacked_models`): ``exact`` runs each shard's
own kernels on its slice, ``batched`` runs full-width calls, one per batch size present at the step.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

import numpy as np
import torch

from ..store.checkpoints import save_checkpoint
from .models import GLOBAL_RNG_LOCK, shard_model
from .optim import Optimizer
from .shard import (
    Batch,
    EpochStart,
    ShardData,
    ShardJob,
    ShardResult,
    SliceEnd,
    TrainSpec,
    batch_loss,
    checkpoint_dir,
    checkpoint_meta,
    initial_state,
    shard_schedule,
)
from .stacked_models import (
    ShardStack,
    SliceRunner,
    batched_forward,
    module_tensors,
    stacked_loss,
    zeros_like_state,
)


def group_arrays(shards: list[ShardData], device: str) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(features, labels, first row) of each shard. On CPU each shard's own arrays, shared with the caller (no copy
    of the group's data); elsewhere one concatenated device array for the group, so a step gathers once."""
    if device == "cpu":
        out = []
        for d in shards:
            f = d.features
            ok = f.dtype == np.float32 and f.flags.c_contiguous and f.flags.writeable
            X = torch.from_numpy(f) if ok else torch.as_tensor(np.array(f, dtype=np.float32, copy=True))
            out.append((X, torch.as_tensor(np.array(d.labels, dtype=np.int64, copy=True)), 0))
        return out
    n_f = shards[0].features.shape[1] if shards else 0
    X = torch.as_tensor(np.concatenate([d.features for d in shards]) if shards else np.zeros((0, n_f)))
    y = torch.as_tensor(np.concatenate([d.labels for d in shards]) if shards else np.zeros(0))
    X, y = X.to(device, torch.float32), y.to(device, torch.int64)
    offsets = np.cumsum([0] + [len(d.labels) for d in shards])
    return [(X, y, int(offsets[n])) for n in range(len(shards))]


class LaneStopped(Exception):
    """A lane ended early because training as a whole is ending (its checkpoints so far stay valid)."""


class Slot:
    """One shard's progress through its schedule inside a group, and where its rows are."""

    def __init__(
        self,
        spec: TrainSpec,
        slot: int,
        job: ShardJob,
        data: ShardData,
        arrays: tuple[torch.Tensor, torch.Tensor, int],
    ):
        self.slot, self.job = slot, job
        self.X, self.y, self.offset = arrays  # the shard's rows are X[offset : offset + n]
        self.events = shard_schedule(spec.config, job, data)
        self.result = ShardResult(job.shard, job.from_slice)
        self.rng: torch.Tensor | torch.Generator | None = None  # per-shard dropout stream

    def next_batch(self, on_epoch, on_slice) -> Batch | None:
        """Run the schedule up to the next batch (reseeding at epochs, checkpointing at slice ends)."""
        for event in self.events:
            if isinstance(event, Batch):
                return event
            if isinstance(event, EpochStart):
                on_epoch(self, event)
            else:
                on_slice(self, event)
        return None


class GroupTrainer:
    """The shards of one group, stacked, trained in lockstep to the end of their schedules."""

    def __init__(
        self,
        spec: TrainSpec,
        slots: list[ShardJob | None],
        data: dict[int, ShardData],
        mode: str,
        stop: threading.Event | None = None,
    ):
        self.spec, self.mode, self.device = spec, mode, spec.device
        self.stop = stop  # set when another lane failed or the caller was interrupted: end at the next step
        cfg = spec.config
        template = shard_model(cfg, 0, spec.n_features, spec.n_classes)
        states, opt_states = [], {}
        for i, job in enumerate(slots):
            if job is None:
                states.append(zeros_like_state(template))
                continue
            model, opt = initial_state(
                spec, job, data[job.shard]
            )  # the loop's own initialisation / checkpoint restore
            states.append(module_tensors(model))
            opt_states[i] = opt.state_dict()
        self.stack = ShardStack(template, states, spec.device)
        self.opt = Optimizer(cfg.training, self.stack.params, stack=len(slots))
        for i, state in opt_states.items():
            self.opt.load_shard_state(i, state)
        real = [(i, job) for i, job in enumerate(slots) if job is not None]
        arrays = group_arrays([data[job.shard] for _, job in real], spec.device)
        self.slots = {i: Slot(spec, i, job, data[job.shard], arrays[n]) for n, (i, job) in enumerate(real)}
        self.dropout = float(cfg.model.dropout) if cfg.model.name in ("mlp", "cnn") else None
        self.runner = SliceRunner(self.stack) if mode == "exact" else None

    # ---- the lockstep loop ----
    def run(self) -> dict[int, ShardResult]:
        t0 = time.perf_counter()
        self.stack.template.train()
        while True:
            if self.stop is not None and self.stop.is_set():
                raise LaneStopped("stopped: another lane failed or training was interrupted")
            batch = {}
            for i, slot in self.slots.items():
                b = slot.next_batch(self._reseed, self._checkpoint)
                if b is not None:
                    batch[i] = b
            if not batch:
                break
            if self.mode == "exact":
                self._step_exact(batch)
            else:
                self._step_batched(batch)
            active = torch.zeros(self.stack.width, dtype=torch.bool)
            active[list(batch)] = True
            self.opt.step(active)
            for i in batch:
                self.slots[i].result.optimizer_steps += 1
        seconds = (time.perf_counter() - t0) / max(len(self.slots), 1)
        for slot in self.slots.values():
            slot.result.seconds = seconds
        return {slot.job.shard: slot.result for slot in self.slots.values()}

    def _rows(self, slot: Slot, b: Batch) -> torch.Tensor:
        return (b.rows + slot.offset).to(self.device)

    def _inputs(self, members: list[int], batch: dict[int, Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' batches as ``[len(members), size, F]`` and ``[len(members), size]``."""
        slots = [self.slots[i] for i in members]
        rows = [self._rows(slot, batch[i]) for i, slot in zip(members, slots, strict=True)]
        if all(slot.X is slots[0].X for slot in slots):  # one array for the group (GPU): one gather
            flat = torch.cat(rows)
            x, y = slots[0].X.index_select(0, flat), slots[0].y.index_select(0, flat)
        else:
            x = torch.cat([slot.X.index_select(0, r) for slot, r in zip(slots, rows, strict=True)])
            y = torch.cat([slot.y.index_select(0, r) for slot, r in zip(slots, rows, strict=True)])
        return x.reshape(len(members), -1, x.shape[-1]), y.reshape(len(members), -1)

    def _step_exact(self, batch: dict[int, Batch]) -> None:
        """Each shard's own forward/backward on its slice: the loop's kernels, one backward call for the group."""
        self.stack.zero_grad()
        self.runner.bind()
        losses = []
        for i, b in batch.items():
            slot = self.slots[i]
            rows = self._rows(slot, b)
            with self._rng(slot):
                logits = self.runner.forward(i, slot.X.index_select(0, rows))
            losses.append(batch_loss(logits, slot.y.index_select(0, rows)))
        torch.autograd.backward(losses)

    def _step_batched(self, batch: dict[int, Batch]) -> None:
        """Full-width calls, one per batch size present at this step; each shard's gradient from its own call."""
        self.stack.zero_grad()
        params = list(self.stack.params.values())
        by_size: dict[int, list[int]] = defaultdict(list)
        for i, b in batch.items():
            by_size[len(b.rows)].append(i)
        grads = None
        for size, members in sorted(by_size.items()):
            slots = torch.tensor(members, device=self.device)
            xs, ys = self._inputs(members, batch)
            x = torch.zeros(self.stack.width, size, xs.shape[-1], device=self.device)
            y = torch.zeros(self.stack.width, size, dtype=torch.int64, device=self.device)
            x.index_copy_(0, slots, xs)
            y.index_copy_(0, slots, ys)
            buffers = {n: t.clone() for n, t in self.stack.buffers.items()}
            logits = batched_forward(self.stack, x, self._dropout_for(members), buffers)
            g = torch.autograd.grad(stacked_loss(logits, y, slots), params, allow_unused=True)
            g = [torch.zeros_like(p) if d is None else d for p, d in zip(params, g, strict=True)]
            for n, t in buffers.items():  # buffer updates (BatchNorm statistics) of this call's shards only
                self.stack.buffers[n].index_copy_(0, slots, t.index_select(0, slots))
            if len(by_size) == 1:
                grads = list(g)
                break
            grads = grads or [torch.zeros_like(p) for p in params]
            for acc, new in zip(grads, g, strict=True):
                acc.index_copy_(0, slots, new.index_select(0, slots))
        for p, g in zip(params, grads, strict=True):
            p.grad = g

    # ---- per-shard randomness and checkpoints ----
    def _reseed(self, slot: Slot, event: EpochStart) -> None:
        """The loop seeds the global RNG at every epoch; here each shard keeps its own stream."""
        if self.dropout == 0.0:
            return
        if self.mode == "exact":
            slot.rng = torch.Generator().manual_seed(event.dropout_seed).get_state()
        else:
            slot.rng = torch.Generator(device=self.device).manual_seed(event.dropout_seed)

    @contextlib.contextmanager
    def _rng(self, slot: Slot):
        """Run a shard's forward on its own dropout stream (the global CPU RNG, swapped in and out)."""
        if slot.rng is None:
            yield
            return
        with GLOBAL_RNG_LOCK:  # lanes of other threads borrow the same generator
            torch.set_rng_state(slot.rng)
            try:
                yield
            finally:
                slot.rng = torch.get_rng_state()

    def _dropout_for(self, members: list[int]):
        """Dropout as F.dropout does it (bernoulli noise, divided by 1-p), each shard drawing from its generator."""
        p = self.dropout or 0.0

        def drop(h: torch.Tensor) -> torch.Tensor:
            # contiguous, so each shard's draws fill its [batch, units] block row by row, whatever the stack's layout
            noise = torch.ones(h.shape, dtype=h.dtype, device=h.device)
            for i in members:
                noise[i].bernoulli_(1 - p, generator=self.slots[i].rng)
            return h * noise.div_(1 - p)

        return drop

    def _checkpoint(self, slot: Slot, event: SliceEnd) -> None:
        i, job, k = slot.slot, slot.job, event.slice
        steps = int(self.opt.steps[i])
        meta = checkpoint_meta(
            self.spec, job, k, event.records, event.samples, steps, "stacked", self.stack.width
        )
        folder = checkpoint_dir(self.spec, job.shard, k, job.fingerprints[k])
        state, opt_state = self.stack.shard_state(i), self.opt.shard_state_dict(i)
        save_checkpoint(folder, state, opt_state, meta, sync=self.spec.sync_checkpoints)
        slot.result.checkpoints.append(folder.name)
        slot.result.samples += event.samples
