"""Optimizers written for exactness: named state, per-shard step counts, masked (no-op) steps.

``torch.optim.Adam`` keeps one step counter per parameter tensor; when S shards are stacked into one tensor they
would share it, and a shard with no batch at a step would still be moved by its momentum. These optimizers keep a
step counter per stacked shard and take a boolean ``active`` mask: an inactive shard's parameters, moments and
step count stay bit for bit unchanged (its rows are not even written). The update uses only correctly rounded
elementwise operations (multiply, add, divide, square root; no fused multiply-add), whose result for an element
does not depend on where it sits in a tensor — so a shard's result is the same whether it is updated alone or
inside a stack of any width (tests/test_stacking.py proves it bit for bit).

State is a flat ``{name: tensor}`` mapping that goes straight into a safetensors file (no pickle). A stacked
optimizer reads and writes one shard's state in exactly the format of an unstacked one
(:meth:`Optimizer.shard_state_dict`, :meth:`Optimizer.load_shard_state`), so a checkpoint does not depend on the
executor that wrote it.
"""

from __future__ import annotations

import torch

from ..config import TrainingConfig

BETAS = (0.9, 0.999)
EPS = 1e-8
CHUNK_BYTES = 1 << 20


class Optimizer:
    """Adam or SGD(momentum) over named parameters whose leading dimension may be a stack of ``stack`` shards."""

    def __init__(self, cfg: TrainingConfig, params: dict[str, torch.Tensor], stack: int | None = None):
        self.kind = cfg.optimizer
        self.lr = float(cfg.lr)
        self.momentum = float(cfg.momentum)
        self.weight_decay = float(cfg.weight_decay)
        self.params = params
        self.stack = stack
        self.steps = torch.zeros(() if stack is None else (stack,), dtype=torch.int64)
        self.slots = ("exp_avg", "exp_avg_sq") if self.kind == "adam" else ("momentum_buffer",)
        self.state: dict[str, dict[str, torch.Tensor]] = {
            name: {s: torch.zeros_like(p) for s in self.slots} for name, p in params.items()
        }

    # ---- the update -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:
        """Apply one update from ``p.grad``. ``active`` ([stack] bool) masks shards that take no step at all."""
        if self.stack is None:
            steps = self.steps + 1
            step_size, bc2_root = self._scalars(steps)
            for name, p in self.params.items():
                self._update(p, self._grad(p), self.state[name], step_size, bc2_root, steps)
            self.steps = steps
            return
        mask = torch.ones(self.stack, dtype=torch.bool) if active is None else active.to("cpu", torch.bool)
        runs = _runs(mask.tolist())
        if not runs:
            return
        steps = self.steps + mask.to(torch.int64)
        step_size, bc2_root = self._scalars(steps)
        for name, p in self.params.items():
            g, st = self._grad(p), self.state[name]
            # views of consecutive active shards (no gather, no copy), a cache-sized chunk at a time
            for a, b in _chunks(runs, self._chunk(p)):
                part = {k: v[a:b] for k, v in st.items()}
                self._update(p[a:b], g[a:b], part, step_size[a:b], bc2_root[a:b], steps[a:b])
        self.steps = steps

    @staticmethod
    def _grad(p: torch.Tensor) -> torch.Tensor:
        return p.grad if p.grad is not None else torch.zeros_like(p)

    def _chunk(self, p: torch.Tensor) -> int:
        """Shards per update call: on CPU about CHUNK_BYTES per tensor, so the update's operands stay in cache
        (one pass over a 20-shard stack's tensors is memory-bound and slower than 20 per-shard updates)."""
        if p.device.type != "cpu":
            return self.stack
        per_shard = max(p[0].numel() * p.element_size(), 1)
        return max(1, CHUNK_BYTES // per_shard)

    def _update(self, p, g, st, step_size, bc2_root, steps) -> None:
        """In place on ``p`` and ``st``; every operation is a single correctly rounded elementwise op."""
        if self.weight_decay:
            g = g + p * self.weight_decay
        if self.kind == "adam":
            b1, b2 = BETAS
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.mul_(b1).add_(g * (1 - b1))  # m*b1 + g*(1-b1)
            v.mul_(b2).add_((g * g).mul_(1 - b2))  # v*b2 + (g*g)*(1-b2)
            denom = torch.sqrt(v).div_(self._view(bc2_root, p)).add_(EPS)
            p.sub_(torch.div(m, denom).mul_(self._view(step_size, p)))  # p - (m/denom)*step_size
        else:
            buf = st["momentum_buffer"]
            if self.momentum:
                first = self._view((steps == 1).to(p.device), p)
                buf.copy_(torch.where(first, g, buf * self.momentum + g))
            else:
                buf.copy_(g)
            p.sub_(buf * self.lr)

    def _scalars(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-shard step size and sqrt of the second bias correction, computed in Python floats."""
        b1, b2 = BETAS
        sizes, roots = [], []
        for t in steps.reshape(-1).tolist():
            t = max(int(t), 1)
            sizes.append(self.lr / (1 - b1**t))
            roots.append((1 - b2**t) ** 0.5)
        dev = next(iter(self.params.values())).device
        return (
            torch.tensor(sizes, dtype=torch.float32, device=dev).reshape(steps.shape),
            torch.tensor(roots, dtype=torch.float32, device=dev).reshape(steps.shape),
        )

    def _view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t if self.stack is None else t.reshape(-1, *([1] * (like.dim() - 1)))

    # ---- state as flat tensors --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy (the live tensors are updated in place)."""
        out = {"step": self.steps.clone()}
        for name, slots in self.state.items():
            for slot, t in slots.items():
                out[f"{slot}.{name}"] = t.detach().to("cpu").clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps = state["step"].to(torch.int64).clone()
        for name, slots in self.state.items():
            for slot, t in slots.items():
                t.copy_(state[f"{slot}.{name}"])

    def shard_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Shard ``i`` of a stack, in the format of an unstacked optimizer's :meth:`state_dict`."""
        out = {"step": self.steps[i].clone()}
        for name, slots in self.state.items():
            for slot, t in slots.items():
                out[f"{slot}.{name}"] = t[i].detach().to("cpu").clone()
        return out

    def load_shard_state(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Load an unstacked optimizer's state (e.g. from a checkpoint) into shard ``i`` of a stack."""
        self.steps[i] = state["step"].to(torch.int64).reshape(())
        for name, slots in self.state.items():
            for slot, t in slots.items():
                t[i].copy_(state[f"{slot}.{name}"])


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[a, b) ranges of consecutive True entries."""
    out, start = [], None
    for i, on in enumerate([*mask, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            out.append((start, i))
            start = None
    return out


def _chunks(runs: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, b)) for start, b in runs for a in range(start, b, size)]
