"""Shared fixtures: small seeded synthetic data and helpers to train and compare runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sisa.config import Config
from sisa.fitting import train
from sisa.store.rundir import RunDir
from sisa.tables.datasets import make_tabular


def small_config(**sections) -> Config:
    """A fast config: 3 shards x 3 slices, tiny MLP, 2 epochs. ``sections`` override per section."""
    raw = {
        "sharding": {"shards": 3, "slices": 3},
        "model": {"hidden": [16]},
        "training": {"epochs": 2, "batch_size": 32, "seed": 0, "progress": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Config.from_dict(raw)


@pytest.fixture
def tabular():
    """600 rows, 6 features, 3 string classes, int record IDs 0..599."""
    return make_tabular(600, seed=1, n_features=6, n_classes=3, string_labels=True)


def train_run(root: Path, df, config: Config, **kw) -> RunDir:
    run, _ = train(root, config, df, **kw)
    return run


def checkpoint_tensors(run: RunDir) -> dict[str, dict[str, torch.Tensor]]:
    """Every live checkpoint's tensors keyed by 'shard/slice-name/file'."""
    out = {}
    for entry in run.manifest()["shards"]:
        s = entry["shard"]
        for name in entry["checkpoints"]:
            folder = run.shard_checkpoints(s) / name
            for f in ("model.safetensors", "optimizer.safetensors"):
                out[f"{s}/{name}/{f}"] = load_file(folder / f)
    return out


def assert_runs_identical(a: RunDir, b: RunDir) -> None:
    """Same checkpoint names (fingerprints) and bit-identical weights and optimizer state everywhere."""
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].keys() == tb[key].keys(), key
        for name in ta[key]:
            assert torch.equal(ta[key][name], tb[key][name]), f"{key}:{name} differs"


def feature_matrix(df) -> np.ndarray:
    return df[[c for c in df.columns if c.startswith("x")]].to_numpy(np.float32)
