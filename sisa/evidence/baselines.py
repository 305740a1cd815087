"""APPROXIMATE unlearning baselines, to compare with SISA's exact unlearning.

Each baseline takes one model trained on all the data and edits it so that it "looks like" it never saw the
forget set. None of them is exact: the result is not the model that retraining without the forget set would give,
and nothing certifies that the forget set's influence is gone. They are here to measure what the cheap
alternatives would do (``sisa compare``), and every name, docstring and output says APPROXIMATE.

One interface: ``unlearn(model, retain, forget, **opts) -> model``. The input model is never modified; the result
is a new model of the same architecture. Every random draw comes from generators seeded by ``seed``.

- ``approx-finetune``: train on the retained records only, relying on catastrophic forgetting.
- ``approx-gradient-ascent``: gradient ascent on the forget records' loss (NegGrad).
- ``approx-neggrad+``: descent on retained batches and ascent on forget batches, ``alpha`` weighting the two
  (Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023).
- ``approx-random-labels``: fine-tune on the retained records plus the forget records relabelled at random
  (Graves et al., "Amnesiac Machine Learning", AAAI 2021).
- ``approx-impair-repair``: learn error-maximising noise for the forgotten classes, train one "impair" epoch on
  that noise plus a sample of retained records at a high learning rate, then one "repair" epoch on the retained
  sample (Tarun et al., "Fast Yet Effective Machine Unlearning", IEEE TNNLS 2023). Forgets whole classes only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, TrainingConfig
from ..exceptions import ConfigError
from ..train.models import fit_prefix, shard_model
from ..train.optim import Optimizer
from ..train.shard import derive_seed

APPROXIMATE = "APPROXIMATE: the result is not the retrained model and no guarantee of forgetting holds"


@dataclass
class Records:
    """Features (float32 [n, F]) and class indices (int64 [n]) of one set of records."""

    features: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.features, dtype=torch.float32), torch.tensor(self.labels, dtype=torch.int64)


# ---- training helpers ---------------------------------------------------------------------------------------
def _batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded batches of row indices: one fresh permutation per pass."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


def _optimizer(model: nn.Module, lr: float) -> Optimizer:
    return Optimizer(TrainingConfig(optimizer="adam", lr=lr), dict(model.named_parameters()))


def _step(model: nn.Module, opt: Optimizer, loss: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    loss.backward()
    opt.step()


def _train_steps(model: nn.Module, records: Records, steps: int, lr: float, batch_size: int, seed: int):
    """Plain cross-entropy training for ``steps`` seeded mini-batches; modifies ``model`` in place."""
    X, y = records.tensors()
    opt = _optimizer(model, lr)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "dropout"))
        batches = _batches(len(y), batch_size, seed)
        for _ in range(steps):
            idx = next(batches)
            _step(model, opt, F.cross_entropy(model(X[idx]), y[idx]))
    model.eval()
    return model


def _steps(n: int, epochs: float, batch_size: int) -> int:
    return max(1, math.ceil(epochs * n / batch_size))


def fit_model(config: Config, records: Records, seed: int | None = None) -> nn.Module:
    """One model trained on ``records`` for ``training.epochs`` (the baselines' starting point, and the exact
    retrain-from-scratch reference when ``records`` is the retained set). Not a SISA shard: no slicing."""
    t = config.training
    seed = t.seed if seed is None else seed
    n_classes = len(config.data.classes or []) or int(records.labels.max()) + 1
    model = shard_model(config, derive_seed(seed, "init", "single"), records.features.shape[1], n_classes)
    # one model, no slices: a slice0 prefix is fitted on every record it trains on (which is why approximate
    # unlearning cannot remove a record from it, and why its exact reference refits on the retained set)
    fit_prefix(model, records.features)
    return _train_steps(
        model, records, _steps(len(records), t.epochs, t.batch_size), t.lr, t.batch_size, seed
    )


# ---- the baselines ------------------------------------------------------------------------------------------
def finetune(
    model: nn.Module,
    retain: Records,
    forget: Records,
    *,
    epochs: float = 2.0,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """APPROXIMATE: fine-tune on the retained records only (catastrophic forgetting of the forget set)."""
    out = copy.deepcopy(model)
    return _train_steps(out, retain, _steps(len(retain), epochs, batch_size), lr, batch_size, seed)


def neggrad_plus(
    model: nn.Module,
    retain: Records,
    forget: Records,
    *,
    alpha: float = 0.9,
    epochs: float = 1.0,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """APPROXIMATE: minimise alpha * loss(retain batch) - (1 - alpha) * loss(forget batch) (NegGrad+).

    ``alpha=0`` is pure gradient ascent on the forget set; the number of steps is ``epochs`` passes over the
    forget set (ascent) or over the retained set (``alpha > 0``)."""
    out = copy.deepcopy(model)
    Xr, yr = retain.tensors()
    Xf, yf = forget.tensors()
    opt = _optimizer(out, lr)
    steps = _steps(len(forget) if alpha == 0 else len(retain), epochs, batch_size)
    fb = _batches(len(yf), batch_size, derive_seed(seed, "forget"))
    rb = _batches(len(yr), batch_size, derive_seed(seed, "retain")) if alpha > 0 else None
    out.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "dropout"))
        for _ in range(steps):
            i = next(fb)
            loss = -(1.0 - alpha) * F.cross_entropy(out(Xf[i]), yf[i])
            if rb is not None:
                j = next(rb)
                loss = loss + alpha * F.cross_entropy(out(Xr[j]), yr[j])
            _step(out, opt, loss)
    return out.eval()


def gradient_ascent(
    model: nn.Module,
    retain: Records,
    forget: Records,
    *,
    epochs: float = 1.0,
    lr: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """APPROXIMATE: gradient ascent on the forget set's loss (NegGrad); unbounded, so few steps, small lr."""
    return neggrad_plus(
        model, retain, forget, alpha=0.0, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed
    )


def random_labels(
    model: nn.Module,
    retain: Records,
    forget: Records,
    *,
    epochs: float = 1.0,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """APPROXIMATE: fine-tune on retained records plus forget records given random wrong labels."""
    n_classes = _n_classes(model, retain)
    rng = np.random.default_rng(derive_seed(seed, "labels"))
    wrong = (forget.labels + rng.integers(1, n_classes, len(forget))) % n_classes
    mixed = Records(
        np.concatenate([retain.features, forget.features]), np.concatenate([retain.labels, wrong])
    )
    out = copy.deepcopy(model)
    return _train_steps(out, mixed, _steps(len(mixed), epochs, batch_size), lr, batch_size, seed)


def error_maximising_noise(
    model: nn.Module,
    n_features: int,
    label: int,
    *,
    rows: int = 64,
    steps: int = 100,
    lam: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """Inputs that maximise the model's loss on ``label``: argmin_N -CE(model(N), label) + lam * mean(N^2)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "noise", label))
    noise = torch.randn(rows, n_features, generator=g).requires_grad_(True)
    target = torch.full((rows,), int(label), dtype=torch.int64)
    opt = Optimizer(TrainingConfig(optimizer="adam", lr=0.1), {"noise": noise})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            noise.grad = None
            (-F.cross_entropy(model(noise), target) + lam * noise.pow(2).mean()).backward()
            opt.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return noise.detach()


def impair_repair(
    model: nn.Module,
    retain: Records,
    forget: Records,
    *,
    retain_per_class: int = 200,
    noise_rows: int = 64,
    noise_copies: int = 4,
    impair_lr: float = 2e-2,
    repair_lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """APPROXIMATE: UNSIR impair-repair (Tarun et al.) for forgetting whole classes.

    Needs every record of the forgotten classes in ``forget`` (none in ``retain``)."""
    classes = sorted(set(forget.labels.tolist()))
    left = sorted(set(classes) & set(retain.labels.tolist()))
    if left:
        raise ConfigError(
            [f"approx-impair-repair forgets whole classes, but retained records still have classes {left}"]
        )
    rng = np.random.default_rng(derive_seed(seed, "subset"))
    keep = np.concatenate(
        [
            rng.permutation(np.flatnonzero(retain.labels == c))[:retain_per_class]
            for c in sorted(set(retain.labels.tolist()))
        ]
    )
    subset = Records(retain.features[keep], retain.labels[keep])
    out = copy.deepcopy(model)
    noise = [
        error_maximising_noise(out, retain.features.shape[1], c, rows=noise_rows, seed=seed) for c in classes
    ]
    noisy = Records(
        np.concatenate([subset.features, *[n.numpy() for n in noise for _ in range(noise_copies)]]),
        np.concatenate(
            [subset.labels, *[np.full(noise_rows, c) for c in classes for _ in range(noise_copies)]]
        ),
    )
    _train_steps(
        out, noisy, _steps(len(noisy), 1.0, batch_size), impair_lr, batch_size, derive_seed(seed, "impair")
    )
    return _train_steps(
        out, subset, _steps(len(subset), 1.0, batch_size), repair_lr, batch_size, derive_seed(seed, "repair")
    )


def _n_classes(model: nn.Module, records: Records) -> int:
    with torch.no_grad():
        return int(model.eval()(torch.tensor(records.features[:1])).shape[-1])


Unlearner = Callable[..., nn.Module]
METHODS: dict[str, Unlearner] = {
    "approx-finetune": finetune,
    "approx-gradient-ascent": gradient_ascent,
    "approx-neggrad+": neggrad_plus,
    "approx-random-labels": random_labels,
    "approx-impair-repair": impair_repair,
}
CLASS_ONLY = {"approx-impair-repair"}


def apply_baseline(method: str, model: nn.Module, retain: Records, forget: Records, **opts) -> nn.Module:
    """Run the APPROXIMATE baseline ``method`` (a key of :data:`METHODS`) and return the edited copy."""
    if method not in METHODS:
        raise ConfigError([f"unknown unlearning baseline {method!r}; expected one of {', '.join(METHODS)}"])
    return METHODS[method](model, retain, forget, **opts)
