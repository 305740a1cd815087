"""Sub-model architectures: a tabular MLP, a small image CNN, or a user's own ``torch.nn.Module``.

Models are built from the config and the data's shape. Input preprocessing that the models do (a fixed scale, a
reshape to an image) is fixed in config, never fitted on training rows (docs/design.md §2.5). Initialisation draws from a
generator seeded by (seed, shard) only.
"""

from __future__ import annotations

import importlib
import math
import threading

import torch
from torch import nn

from ..config import ModelConfig
from ..exceptions import ConfigError

# Held by whoever borrows torch's global CPU generator (initialisation here, a stacked shard's dropout draws in
# sisa.train.lockstep), so that threads of one process never draw from each other's stream.
GLOBAL_RNG_LOCK = threading.RLock()


class Scale(nn.Module):
    """Multiply inputs by a fixed constant (e.g. 1/255 for pixels). No state."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.factor == 1.0 else x * self.factor


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        torch.manual_seed(init_seed)
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
