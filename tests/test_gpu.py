"""CUDA only (skips cleanly without a GPU): the stacked executor's exactness rule on a GPU.

In deterministic mode a shard's bits on CUDA depend on the width of the batched kernels it runs in (docs/design.md §7), so
the stacked executor keeps every shard in a fixed slot of a fixed-width group whenever it trains (sisa.train.stacking).
These tests check that, with that rule, delete-then-retrain on the GPU is bit-identical to training from scratch
without the records, that training is reproducible, and that every checkpoint records device, torch version,
executor and stack width.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts, for deterministic cuBLAS

import pytest  # noqa: E402
import torch  # noqa: E402

from sisa.store.checkpoints import read_meta  # noqa: E402
from sisa.tables.datasets import make_tabular  # noqa: E402
from tests.conftest import assert_runs_identical, small_config, train_run  # noqa: E402
from tests.test_exactness import CASES, delete_and_compare  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODELS = {
    "mlp": {"hidden": [32, 16], "dropout": 0.2},
    "cnn": {"name": "cnn", "options": {"channels": [4, 8]}, "dropout": 0.2},
}


def gpu_config(model: str, **training):
    return small_config(
        sharding={"shards": 4},
        model=MODELS[model],
        training={
            "device": "cuda",
            "executor": "stacked",
            "stack_size": 3,
            "deterministic": True,
            **training,
        },
    )


def table():
    return make_tabular(480, seed=3, n_features=16, n_classes=3, string_labels=True)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model", list(MODELS))
def test_cuda_stacked_delete_equals_retrain_from_scratch(tmp_path, model, case):
    run, receipt, _ = delete_and_compare(tmp_path, table(), gpu_config(model), CASES[case])
    for s in receipt["shards_retrained"]:
        entry = next(e for e in run.manifest()["shards"] if e["shard"] == int(s))
        meta = read_meta(run.shard_checkpoints(int(s)) / entry["checkpoints"][-1])
        # the retrain ran in the shard's original group at its full width: {0,1,2} -> 3, {3} -> 1
        assert meta["stack_width"] == (3 if int(s) < 3 else 1)
        assert (meta["device"], meta["torch"], meta["executor"]) == (
            torch.cuda.get_device_name(),
            torch.__version__,
            "stacked",
        )


@pytest.mark.parametrize("model", list(MODELS))
def test_cuda_stacked_training_is_reproducible(tmp_path, model):
    a = train_run(tmp_path / "a", table(), gpu_config(model))
    b = train_run(tmp_path / "b", table(), gpu_config(model))
    assert_runs_identical(a, b)


def test_cuda_stack_width_is_in_the_config_digest(tmp_path):
    a = train_run(tmp_path / "a", table(), gpu_config("mlp"))
    b = train_run(tmp_path / "b", table(), gpu_config("mlp", stack_size=2))
    assert a.config().digest() != b.config().digest()
    names_a = [e["checkpoints"] for e in a.manifest()["shards"]]
    names_b = [e["checkpoints"] for e in b.manifest()["shards"]]
    assert names_a != names_b  # a checkpoint made at another width is never mistaken for this one


@pytest.mark.slow
def test_cuda_stacked_is_much_faster_than_the_loop():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_stacked import stacked_train_speedup

    result = stacked_train_speedup(records=40000, shards=20, device="cuda")
    print(result)
    assert result["speedup"] >= 5.0, result
