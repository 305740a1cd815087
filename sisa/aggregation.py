"""Aggregation: combine the shard sub-models' predictions into the ensemble's answer.

``soft`` averages the sub-models' class probabilities (optionally weighted); ``hard`` takes a (weighted) majority
vote with ties going to the lowest class index, and reports vote shares as probabilities. The aggregator never
learns from training data, so it never has to be unlearned.

The S sub-models share one architecture, so they can be evaluated as one batched call
(``sisa.train.stacked_models.batched_forward``: ``baddbmm`` for the MLP, a grouped convolution for the CNN, ``vmap`` over
``functional_call`` for any other module) instead of S sequential forwards; ``auto`` picks by batch size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import Config
from .exceptions import DataError, RunStateError
from .store.checkpoints import load_checkpoint
from .store.rundir import RunDir
from .train.models import shard_model
from .train.stacked_models import ShardStack, batched_forward, module_tensors

# ``auto`` inference: stacked for batches of at most this many rows. The stacked call saves the loop's per-model
# dispatch overhead; on CPU, once a batch is big enough for each model's matmuls to be compute-bound, that saving is
# gone and one big batched kernel runs slower than S separate ones. Measured on the 2-core dev machine (S=20 MLPs,
# 1 and 2 threads, stacked/loop; scripts/bench_unlearning.py and docs/performance.md): at 64 rows 1.3x (600-128-100)
# to 7.8x (6-16-3); at 256 rows 0.84x-3x; at 1024 rows 0.3x-1.15x. On CUDA stacked always wins (docs/design.md §7: 21x at
# batch 64, 3.4x at 4096 on an H100).
STACKED_MAX_BATCH = {"cpu": 256, "cuda": 1 << 62}


class Ensemble:
    """The live sub-models of one manifest generation, ready to predict."""

    def __init__(
        self, models: dict[int, nn.Module], config: Config, generation: int = 0, device: str = "cpu"
    ):
        self.models = dict(sorted(models.items()))
        self.config = config
        self.classes = list(config.data.classes or [])
        self.generation = generation
        self.device = device
        self._stacked = None

    @property
    def shards(self) -> list[int]:
        return list(self.models)

    @classmethod
    def from_manifest(
        cls,
        root: Path,
        config: Config,
        manifest: dict,
        exclude: set[int] | frozenset = frozenset(),
        device: str = "cpu",
    ) -> Ensemble:
        """Load the last-slice checkpoint of every serving shard named by ``manifest`` (verified on load)."""
        models = {}
        for entry in manifest["shards"]:
            s = entry["shard"]
            if s in exclude or entry["records"] == 0 or not entry["checkpoints"]:
                continue  # excluded, empty, or rolled back to before slice 0 (docs/design.md §4.2)
            name = entry["checkpoints"][-1]
            ck = load_checkpoint(RunDir(root).shard_checkpoints(s) / name, entry["fingerprint"])
            model = shard_model(config, 0)
            model.load_state_dict(ck.model)
            models[s] = model.to(device).eval()
        return cls(models, config, manifest.get("generation", 0), device)

    def without(self, shards: set[int]) -> Ensemble:
        """The same generation minus some shards (strict mode while they retrain)."""
        return Ensemble(
            {s: m for s, m in self.models.items() if s not in shards},
            self.config,
            self.generation,
            self.device,
        )

    # ---- inference --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def shard_probabilities(self, X: np.ndarray, mode: str | None = None) -> torch.Tensor:
        """[n_models, n, C] class probabilities of each serving sub-model."""
        if not self.models:
            raise RunStateError("no shard model is serving (every shard is retraining or empty)")
        x = torch.as_tensor(
            np.require(X, np.float32, ["C", "W"]), device=self.device
        )  # copies read-only input
        if self.inference_mode(len(x), mode) == "stacked":
            stack = self._stack()  # every model sees the same rows: a stride-0 view, no copy
            logits = batched_forward(stack, x.expand(stack.width, *x.shape), _no_dropout, stack.buffers)
        else:
            logits = torch.stack([m(x) for m in self.models.values()])
        return torch.softmax(logits.float(), dim=-1)

    def inference_mode(self, n_rows: int, mode: str | None = None) -> str:
        """``loop`` or ``stacked`` for a batch of ``n_rows`` (resolving ``auto`` by batch size and device)."""
        mode = mode or self.config.aggregation.inference
        if len(self.models) < 2:
            return "loop"
        if mode == "auto":
            limit = STACKED_MAX_BATCH.get(self.device.split(":")[0], STACKED_MAX_BATCH["cpu"])
            return "stacked" if n_rows <= limit else "loop"
        return mode

    def _stack(self) -> ShardStack:
        if self._stacked is None:
            models = list(self.models.values())
            self._stacked = ShardStack(models[0], [module_tensors(m) for m in models], self.device)
        return self._stacked

    def weights(self) -> torch.Tensor:
        w = self.config.aggregation.weights
        if w is None:
            return torch.ones(len(self.models), dtype=torch.float32)
        return torch.tensor([float(w[s]) for s in self.models], dtype=torch.float32)

    def predict_proba(self, X: np.ndarray, mode: str | None = None) -> np.ndarray:
        w = self.weights()
        if self.models and not float(w.sum()) > 0:  # all weight on excluded shards: 0/0 would answer NaN
            raise RunStateError(
                f"no serving shard has a positive aggregation weight (serving shards {self.shards}, "
                f"weights {w.tolist()}); wait for the retraining shards or change aggregation.weights"
            )
        probs = self.shard_probabilities(X, mode).cpu()
        if not bool(torch.isfinite(probs).all()):
            bad = np.flatnonzero(~torch.isfinite(probs).all(dim=(0, 2)).numpy())[:10].tolist()
            raise DataError(
                "prediction input",
                [
                    f"the model's output is not finite for instances {bad}: "
                    "feature values far outside the training range overflow it"
                ],
            )
        if self.config.aggregation.method == "hard":
            votes = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).float()
            agg = (votes * w[:, None, None]).sum(0)
        else:
            agg = (probs * w[:, None, None]).sum(0)
        return (agg / w.sum()).numpy()

    def predict_indices(self, X: np.ndarray, mode: str | None = None) -> np.ndarray:
        """Class indices; ties go to the lowest index (torch.argmax returns the first maximum)."""
        return torch.from_numpy(self.predict_proba(X, mode)).argmax(-1).numpy()

    def predict(self, X: np.ndarray, mode: str | None = None) -> np.ndarray:
        idx = self.predict_indices(X, mode)
        return np.asarray(self.classes, dtype=object)[idx] if self.classes else idx

    def accuracy(self, X: np.ndarray, label_idx: np.ndarray) -> float:
        return float((self.predict_indices(X) == label_idx).mean())


def _no_dropout(x: torch.Tensor) -> torch.Tensor:
    return x
