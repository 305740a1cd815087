"""Optimizers written for exactness: named state, per-shard step counts, masked (no-op) steps.

``torch.optim.Adam`` keeps one step counter per parameter tensor; when S shards are stacked into one tensor they
would share it, and a shard with no batch at a step would still be moved by its momentum. These optimizers keep a
step counter per stacked shard and take a boolean ``active`` mask: an inactive shard's parameters, moments and
step count stay bit for bit unchanged. The update uses only correctly rounded elementwise operations (no fused
multiply-add), so a shard's result is the same whether it is updated alone or inside a stack of any width.

State is a flat ``{name: tensor}`` mapping that goes straight into a safetensors file (no pickle).
"""

from __future__ import annotations

import torch

from .config import TrainingConfig

BETAS = (0.9, 0.999)
EPS = 1e-8


class Optimizer:
    """Adam or SGD(momentum) over named parameters whose leading dimension may be a stack of ``stack`` shards."""

    def __init__(self, cfg: TrainingConfig, params: dict[str, torch.Tensor], stack: int | None = None):
        self.kind = cfg.optimizer
        self.lr = float(cfg.lr)
        self.momentum = float(cfg.momentum)
        self.weight_decay = float(cfg.weight_decay)
        self.params = params
        self.stack = stack
        dev = next(iter(params.values())).device
        self.steps = torch.zeros(() if stack is None else (stack,), dtype=torch.int64)
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in params.items():
            slots = ("exp_avg", "exp_avg_sq") if self.kind == "adam" else ("momentum_buffer",)
            self.state[name] = {s: torch.zeros_like(p, device=dev) for s in slots}

    # ---- the update -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:
        """Apply one update from ``p.grad``. ``active`` ([stack] bool) masks shards that take no step."""
        if active is None:
            active = torch.ones(self.steps.shape, dtype=torch.bool)
        steps = torch.where(active, self.steps + 1, self.steps)
        scalars = self._scalars(steps)
        for name, p in self.params.items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if self.weight_decay:
                g = g + p * self.weight_decay
            st = self.state[name]
            new = self._adam(p, g, st, scalars) if self.kind == "adam" else self._sgd(p, g, st, steps)
            mask = self._view(active.to(p.device), p)
            for key, value in new.items():
                target = p if key == "param" else st[key]
                target.copy_(value if self.stack is None else torch.where(mask, value, target))
        self.steps = steps

    def _scalars(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-shard step size and sqrt of the second bias correction, computed in Python floats."""
        b1, b2 = BETAS
        sizes, roots = [], []
        for t in steps.reshape(-1).tolist():
            t = max(int(t), 1)
            sizes.append(self.lr / (1 - b1**t))
            roots.append((1 - b2**t) ** 0.5)
        shape = steps.shape
        return torch.tensor(sizes, dtype=torch.float32).reshape(shape), torch.tensor(
            roots, dtype=torch.float32
        ).reshape(shape)

    def _view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t if self.stack is None else t.reshape(-1, *([1] * (like.dim() - 1)))

    def _adam(self, p, g, st, scalars) -> dict[str, torch.Tensor]:
        b1, b2 = BETAS
        step_size, bc2_root = (self._view(s.to(p.device), p) for s in scalars)
        m = st["exp_avg"] * b1 + g * (1 - b1)
        v = st["exp_avg_sq"] * b2 + (g * g) * (1 - b2)
        denom = torch.sqrt(v) / bc2_root + EPS
        return {"exp_avg": m, "exp_avg_sq": v, "param": p - (m / denom) * step_size}

    def _sgd(self, p, g, st, steps) -> dict[str, torch.Tensor]:
        first = self._view((steps == 1).to(p.device), p)
        buf = torch.where(first, g, st["momentum_buffer"] * self.momentum + g) if self.momentum else g
        return {"momentum_buffer": buf, "param": p - buf * self.lr}

    # ---- state as flat tensors --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"step": self.steps.clone()}
        for name, slots in self.state.items():
            for slot, t in slots.items():
                out[f"{slot}.{name}"] = t.detach().to("cpu").contiguous()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps = state["step"].to(torch.int64).clone()
        for name, slots in self.state.items():
            for slot, t in slots.items():
                t.copy_(state[f"{slot}.{name}"])
