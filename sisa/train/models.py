"""Sub-model architectures: a tabular MLP, a small image CNN, or a user's own ``torch.nn.Module``.

Models are built from the config and the data's shape by ONE factory, :func:`shard_model`, wherever a shard model
is made (training, the stacked executor, the ensemble, the server, the baselines). Input preprocessing that the
models do is fixed in config (a scale, a reshape to an image), or — for ``scaling: slice0`` columns of a
``data.schema`` — held in the shard model itself: :class:`FittedScaling` is fitted on that shard's first slice
only, when the shard trains from scratch, and restored from its checkpoints otherwise (docs/design.md §2.5,
docs/preprocessing.md). Initialisation draws from a generator seeded by (seed, shard) only.
"""

from __future__ import annotations

import importlib
import math
import threading

import numpy as np
import torch
from torch import nn

from ..config import Config, ModelConfig, fitted_columns
from ..exceptions import ConfigError

# Held by whoever borrows torch's global CPU generator (initialisation here, a stacked shard's dropout draws in
# sisa.train.lockstep), so that threads of one process never draw from each other's stream.
GLOBAL_RNG_LOCK = threading.RLock()


def seed_global_rng(seed: int, device: str | torch.device = "cpu") -> None:
    """Seed torch's global generators that ``device`` draws from, as ``torch.manual_seed`` does for them: the CPU
    one, and CUDA's when training there (or once it is initialised). ``torch.manual_seed`` itself formats a stack
    trace per backend that is not initialised, to replay later (0.2-0.5 ms a call, once per epoch here)."""
    torch.default_generator.manual_seed(seed)
    if torch.device(device).type == "cuda" or torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


class Scale(nn.Module):
    """Multiply inputs by a fixed constant (e.g. 1/255 for pixels). No state."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.factor == 1.0 else x * self.factor


class FittedScaling(nn.Module):
    """A non-trainable prefix: ``(x - center) * factor`` on the ``slice0`` columns, identity elsewhere.

    ``center`` is the mean and ``factor`` 1/std of the column's observed (non-missing) values in the shard's first
    slice (:meth:`fit`); where the column's missing indicator is 1 the output is 0 (the slice-0 mean). Other columns
    have center 0 and factor 1, which leaves their values bit for bit as they are. The buffers are in the state
    dict, so checkpoints carry them and a resumed shard never refits."""

    def __init__(self, n_features: int, columns: list[tuple[int, int | None]]):
        super().__init__()
        self.columns = [(int(v), None if m is None else int(m)) for v, m in columns]
        self.register_buffer("center", torch.zeros(n_features))
        self.register_buffer("factor", torch.ones(n_features))
        # column j is zeroed where column mask_index[j] is 1; index n_features is a padded zero column
        index = torch.full((n_features,), n_features, dtype=torch.int64)
        for v, m in self.columns:
            if m is not None:
                index[v] = m
        self.register_buffer("mask_index", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fitted_scaling(x, self.center, self.factor, self.mask_index)

    @torch.no_grad()
    def fit(self, rows: np.ndarray) -> None:
        """Statistics of ``rows`` (the shard's slice-0 rows, encoded), in float64 with exactly rounded sums
        (``math.fsum``: independent of row order). A column with no observed value in slice 0 (an empty slice 0,
        or all missing) gets center 0, factor 1; one with zero variance gets its mean and factor 1."""
        center, factor = self.center.clone(), self.factor.clone()
        for v, m in self.columns:
            observed = rows[:, v] if m is None else rows[rows[:, m] < 0.5, v]
            c, f = column_statistics(np.asarray(observed, dtype=np.float64))
            center[v], factor[v] = c, f
        self.center.copy_(center)
        self.factor.copy_(factor)


def column_statistics(values: np.ndarray) -> tuple[float, float]:
    """(mean, 1/std) of ``values`` as float32-representable numbers; (0, 1) when empty, factor 1 when constant."""
    n = len(values)
    if n == 0:
        return 0.0, 1.0
    mean = math.fsum(values.tolist()) / n
    var = math.fsum(((values - mean) ** 2).tolist()) / n
    std = math.sqrt(var)
    return float(np.float32(mean)), float(np.float32(1.0 / std)) if std > 0 and math.isfinite(std) else 1.0


def fitted_scaling(
    x: torch.Tensor, center: torch.Tensor, factor: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """The prefix's arithmetic, shared by one model and a stack (``center``/``factor`` broadcast over rows)."""
    mask = nn.functional.pad(x, (0, 1)).index_select(-1, index)
    return (x - center) * factor * (1.0 - mask)


class Prefixed(nn.Module):
    """A user's module behind a :class:`FittedScaling` prefix."""

    def __init__(self, fitted: FittedScaling, inner: nn.Module):
        super().__init__()
        self.fitted, self.inner = fitted, inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.fitted(x))


class MLP(nn.Module):
    """Linear layers with ReLU/Tanh between them; dropout after each hidden activation when configured."""

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        hidden: list[int],
        activation: str = "relu",
        dropout: float = 0.0,
        input_scale: float = 1.0,
    ):
        super().__init__()
        self.scale = Scale(input_scale)
        widths = [n_features, *hidden, n_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.activation = activation
        self.dropout = float(dropout)
        self.fitted: FittedScaling | None = None  # set by shard_model for a schema with slice0 columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fitted is not None:
            x = self.fitted(x)
        x = self.scale(x)
        act = torch.relu if self.activation == "relu" else torch.tanh
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = act(x)
                if self.dropout and self.training:
                    x = nn.functional.dropout(x, self.dropout, training=True)
        return x


class CNN(nn.Module):
    """Two conv blocks and a linear head, for small images given as flat feature rows."""

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        input_shape: list[int] | None = None,
        input_scale: float = 1.0,
        dropout: float = 0.0,
        channels: tuple[int, int] = (16, 32),
    ):
        super().__init__()
        if input_shape is None:
            side = math.isqrt(n_features)
            if side * side != n_features:
                raise ConfigError(
                    [
                        f"model.input_shape: {n_features} features are not a square image; "
                        "set model.input_shape: [channels, height, width]"
                    ]
                )
            input_shape = [1, side, side]
        c, h, w = (int(v) for v in input_shape)
        if c * h * w != n_features:
            raise ConfigError(
                [
                    f"model.input_shape: {input_shape} holds {c * h * w} values but the data has "
                    f"{n_features} features"
                ]
            )
        self.shape = (c, h, w)
        self.scale = Scale(input_scale)
        c1, c2 = channels
        self.conv1 = nn.Conv2d(c, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.head = nn.Linear(c2 * (h // 4) * (w // 4), n_classes)
        self.dropout = float(dropout)
        self.fitted: FittedScaling | None = None  # set by shard_model for a schema with slice0 columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fitted is not None:
            x = self.fitted(x)
        x = self.scale(x).reshape(-1, *self.shape)
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        if self.dropout and self.training:
            x = nn.functional.dropout(x, self.dropout, training=True)
        return self.head(x)


def build_model(cfg: ModelConfig, n_features: int, n_classes: int, init_seed: int) -> nn.Module:
    """Build the configured model with parameters drawn from a generator seeded by ``init_seed`` only.

    Thread-safe: initialisation draws from torch's global generator (a user's module may too), so concurrent
    builds (the stacked executor's threads, the server) take turns with each other and with dropout draws."""
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        seed_global_rng(init_seed)
        if cfg.name == "mlp":
            return MLP(n_features, n_classes, cfg.hidden, cfg.activation, cfg.dropout, cfg.input_scale)
        if cfg.name == "cnn":
            return CNN(n_features, n_classes, cfg.input_shape, cfg.input_scale, cfg.dropout, **cfg.options)
        factory = load_factory(cfg.name)
        model = factory(n_features, n_classes, **cfg.options)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                [f"model.name: {cfg.name} returned {type(model).__name__}, expected a torch.nn.Module"]
            )
        return model


def shard_model(
    config: Config, init_seed: int, n_features: int | None = None, n_classes: int | None = None
) -> nn.Module:
    """THE shard model of a run: :func:`build_model`, behind a :class:`FittedScaling` prefix when the run's schema
    has ``slice0`` columns (its statistics at their defaults until :func:`fit_prefix` or a checkpoint sets them).
    ``n_features`` / ``n_classes`` default to the resolved config's feature and class lists."""
    n_f = len(config.data.features or []) if n_features is None else n_features
    n_c = len(config.data.classes or []) if n_classes is None else n_classes
    model = build_model(config.model, n_f, n_c, init_seed)
    columns = fitted_columns(config.data)
    if not columns:
        return model
    fitted = FittedScaling(n_f, columns)
    if isinstance(model, (MLP, CNN)):
        model.fitted = fitted
        return model
    return Prefixed(fitted, model)


def prefix_of(model: nn.Module) -> FittedScaling | None:
    fitted = getattr(model, "fitted", None)
    return fitted if isinstance(fitted, FittedScaling) else None


def fit_prefix(model: nn.Module, first_slice: np.ndarray) -> None:
    """Fit the model's prefix (if any) on its shard's slice-0 rows: the only rows it may ever depend on."""
    fitted = prefix_of(model)
    if fitted is not None:
        fitted.fit(first_slice)


def load_factory(path: str):
    """Import ``package.module:Factory``."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            [
                f"model.name: cannot import {path!r} ({exc}); expected 'package.module:Factory' "
                "importable from the current environment"
            ]
        ) from None
