"""S shard models of one architecture held as stacked tensors, and the two ways to run them.

:class:`ShardStack` keeps every parameter and buffer as one ``[width, ...]`` tensor (one optimizer steps them
all) and reads and writes one shard's ``state_dict`` in the unstacked format, so checkpoints do not depend on the
executor.

- **exact** (CPU): each shard's forward and backward run the model's own operations on its slice of the stacked
  tensors (:class:`SliceRunner`): the same kernels, shapes, strides and memory alignment (:func:`aligned_stack`)
  as the per-shard loop, so every shard's bits
  equal the loop's at any stack width, for any ``nn.Module``. On this CPU a batched matmul (MKL batch GEMM) is not
  width-invariant for some shapes (an output width not a multiple of 4 with an odd batch, e.g. 10 classes and a
  last batch of 37 rows), and ``tanh``/``exp`` round differently in the vector body and the scalar tail of a
  kernel, so batching those would tie a shard's bits to its neighbours. What stacking saves on CPU is everything
  around the kernels: one optimizer update, one backward call and one Python step for the whole stack.
- **batched** (CUDA): one kernel per layer for the whole stack — ``baddbmm`` for the MLP, a grouped convolution
  for the CNN, ``torch.vmap`` over ``functional_call`` for any other module — on a fixed ``[width, batch]`` shape.
  There a shard's bits depend on the stack width (docs/design.md §7) but not on the other shards' values, so the stacking
  rule in :mod:`sisa.train.stacking` keeps every shard at the same width and position whenever it trains.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .models import CNN, MLP, fitted_scaling

Dropout = Callable[[torch.Tensor], torch.Tensor]


def module_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name (detached), the per-shard unit a stack is built from."""
    return {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}


ALIGN = 64  # bytes: PyTorch's CPU allocator aligns every tensor to 64


def aligned_stack(tensors: list[torch.Tensor], device: str) -> torch.Tensor:
    """``torch.stack`` whose every slice starts at a 64-byte boundary, like a separately allocated tensor.

    On this CPU a matmul's result can depend on its operands' alignment (MKL with a one-row batch reads a weight at
    an address that is not a multiple of 16 bytes differently), so a shard's weights sit where the loop's would."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape or t.dtype != first.dtype:
            raise ValueError(
                f"the shards' models are not one architecture: a tensor is {list(first.shape)} {first.dtype} "
                f"in one and {list(t.shape)} {t.dtype} in another"
            )
    n, size = first.numel(), first.element_size()
    step = -(-max(n, 1) * size // ALIGN) * ALIGN // size
    flat = torch.zeros(len(tensors), step, dtype=first.dtype, device=device)
    flat[:, :n] = torch.stack([t.reshape(-1) for t in tensors]).to(device)
    return flat[:, :n].view(len(tensors), *first.shape)


class ShardStack:
    """Stacked parameters (leaf tensors with grad) and buffers of ``width`` shard models of one architecture."""

    def __init__(self, template: nn.Module, states: list[dict[str, torch.Tensor]], device: str):
        self.template = template.to(device)
        self.width = len(states)
        self.param_names = [n for n, _ in template.named_parameters()]
        self.buffer_names = [n for n, _ in template.named_buffers()]
        self.state_keys = list(template.state_dict().keys())
        self.params = {
            n: aligned_stack([s[n] for s in states], device).requires_grad_(True) for n in self.param_names
        }
        self.buffers = {n: aligned_stack([s[n] for s in states], device) for n in self.buffer_names}

    def shard_state(self, i: int) -> dict[str, torch.Tensor]:
        """Shard ``i``'s ``state_dict`` (same keys and order as the unstacked model's), on CPU."""
        both = {**self.params, **self.buffers}
        return {k: both[k][i].detach().to("cpu").clone() for k in self.state_keys}

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None


def zeros_like_state(template: nn.Module) -> dict[str, torch.Tensor]:
    """An all-zero shard: fills the slots of a fixed-width stack that train no shard now."""
    return {n: torch.zeros_like(t) for n, t in module_tensors(template).items()}


# ---- exact: each shard's own kernels on its slice --------------------------------------------------------------
class SliceRunner:
    """One private copy of the model per slot whose parameters are views of the stack's slices.

    The copy's forward is the model's own code, so the operations (and their autograd backward) are exactly the
    loop's; gradients of all slots reach the stacked leaf tensors through one ``unbind`` (an exact copy)."""

    def __init__(self, stack: ShardStack):
        self.stack = stack
        self.modules = [copy.deepcopy(stack.template).train() for _ in range(stack.width)]
        self._params = [self._owners(m, stack.param_names) for m in self.modules]
        for i, m in enumerate(self.modules):  # buffers: views into the stack, updated in place (BatchNorm)
            for (owner, attr), name in zip(
                self._owners(m, stack.buffer_names), stack.buffer_names, strict=True
            ):
                owner._buffers[attr] = stack.buffers[name][i]

    @staticmethod
    def _owners(model: nn.Module, names: list[str]) -> list[tuple[nn.Module, str]]:
        out = []
        for name in names:
            path, _, attr = name.rpartition(".")
            out.append((model.get_submodule(path) if path else model, attr))
        return out

    def bind(self) -> None:
        """Point every slot's parameters at this step's views of the stacked leaf tensors."""
        views = {n: self.stack.params[n].unbind(0) for n in self.stack.param_names}
        for i, owners in enumerate(self._params):
            for (owner, attr), name in zip(owners, self.stack.param_names, strict=True):
                owner._parameters[attr] = views[name][i]

    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.modules[i](x)


# ---- batched: one kernel per layer for the whole stack --------------------------------------------------------
def batched_forward(
    stack: ShardStack, x: torch.Tensor, dropout: Dropout, buffers: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Logits ``[width, batch, classes]`` for inputs ``[width, batch, features]``; ``buffers`` (stacked) may be
    updated in place (BatchNorm statistics of a generic module)."""
    model, p = stack.template, stack.params
    if type(model) is MLP:
        return _mlp(model, p, _prefix(model, buffers, x), dropout)
    if type(model) is CNN:
        return _cnn(model, p, _prefix(model, buffers, x), dropout)
    return _vmap(model, p, buffers, x)


def _prefix(model: MLP | CNN, buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The shards' fitted prefixes (sisa.train.models.FittedScaling), each with its own statistics."""
    if model.fitted is None:
        return x
    center, factor = buffers["fitted.center"].unsqueeze(1), buffers["fitted.factor"].unsqueeze(1)
    # the mask layout comes from the schema, the same for every shard: the template's (an idle slot's is zeros)
    return fitted_scaling(x, center, factor, model.fitted.mask_index)


def _mlp(model: MLP, p: dict[str, torch.Tensor], x: torch.Tensor, dropout: Dropout) -> torch.Tensor:
    x = model.scale(x)
    act = torch.relu if model.activation == "relu" else torch.tanh
    n = len(model.layers)
    for i in range(n):
        x = torch.baddbmm(p[f"layers.{i}.bias"].unsqueeze(1), x, p[f"layers.{i}.weight"].transpose(1, 2))
        if i < n - 1:
            x = act(x)
            if model.dropout and model.training:
                x = dropout(x)
    return x


def _cnn(model: CNN, p: dict[str, torch.Tensor], x: torch.Tensor, dropout: Dropout) -> torch.Tensor:
    """Both convolutions as one grouped convolution each: shard s owns channel group s."""
    w, b = x.shape[:2]
    c, h, wd = model.shape
    x = model.scale(x).reshape(w, b, c, h, wd).transpose(0, 1).reshape(b, w * c, h, wd)
    for name in ("conv1", "conv2"):
        weight = p[f"{name}.weight"]
        x = F.conv2d(
            x, weight.reshape(-1, *weight.shape[2:]), p[f"{name}.bias"].reshape(-1), padding=1, groups=w
        )
        x = F.max_pool2d(torch.relu(x), 2)
    x = x.reshape(b, w, -1).transpose(0, 1)  # [w, b, c2*h/4*w/4], channel-major like CNN's flatten(1)
    if model.dropout and model.training:
        x = dropout(x)
    return torch.baddbmm(p["head.bias"].unsqueeze(1), x, p["head.weight"].transpose(1, 2))


def _vmap(base: nn.Module, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    """Any other module: ``vmap`` of ``functional_call`` over the stacked tensors; random ops are refused (a
    shared random stream would tie a shard's draws to its neighbours)."""

    def one(p, b, xi):
        return functional_call(base, (p, b), (xi,))

    return torch.vmap(one, randomness="error")(params, buffers, x)


def stacked_loss(logits: torch.Tensor, targets: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Σ over the given slots of each shard's mean cross-entropy (the per-shard loop's loss, summed)."""
    w, b, c = logits.shape
    ce = F.cross_entropy(logits.reshape(w * b, c), targets.reshape(w * b), reduction="none").reshape(w, b)
    return ce.mean(1).index_select(0, slots).sum()
