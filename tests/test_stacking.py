"""Stacked executor (issue 8): lockstep training of a group of shards as one model, exact on CPU.

- masked optimizer steps are no-ops bit for bit; a stack of any width updates each shard like an unstacked optimizer;
- stacked and loop give bit-identical checkpoints and predictions (ragged shards, last smaller batch, dropout, tanh,
  SGD, fractional epochs, a BatchNorm user module), also when shards resume from different slices;
- with the stacked executor, delete-then-retrain equals training from scratch (MLP and CNN, the engine's scenarios),
  and a retrain steps only the affected shards;
- the GPU rule (fixed slots at the full group width), exercised on CPU by switching the stacking mode;
- ``executor: auto`` and ``stack_size`` resolution, fallback for modules that cannot be stacked.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sisa.aggregation import Ensemble
from sisa.config import Config, TrainingConfig
from sisa.exceptions import ConfigError
from sisa.refresh import plan, train_spec
from sisa.store.checkpoints import read_meta
from sisa.store.rundir import RunDir
from sisa.tables.datasets import make_tabular
from sisa.train import units
from sisa.train.choice import (
    CPU_STACKED_MAX_PARAMS,
    choose_training,
    default_stack_size,
    parameter_count,
    shard_memory_bytes,
)
from sisa.train.optim import Optimizer
from sisa.train.shard import ShardJob
from sisa.train.stacking import plan_groups, train_stacked
from sisa.unlearning import delete
from tests.conftest import feature_matrix, small_config, train_run
from tests.test_exactness import CASES, delete_and_compare, rows_at

# ---- helpers ----------------------------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor (so -0.0 and 0.0 differ, unlike torch.equal)."""
    t = t.detach().contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def slice_tensors(run: RunDir) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Every live checkpoint's tensors by (shard, slice), whatever its fingerprint (the digest covers the executor)."""
    out = {}
    for entry in run.manifest()["shards"]:
        for k, name in enumerate(entry["checkpoints"]):
            folder = run.shard_checkpoints(entry["shard"]) / name
            tensors = {f"model/{n}": t for n, t in load_file(folder / "model.safetensors").items()}
            tensors.update(
                {f"optimizer/{n}": t for n, t in load_file(folder / "optimizer.safetensors").items()}
            )
            out[(entry["shard"], k)] = tensors
    return out


def slice_metas(run: RunDir) -> dict[tuple[int, int], dict]:
    return {
        (e["shard"], k): read_meta(run.shard_checkpoints(e["shard"]) / name)
        for e in run.manifest()["shards"]
        for k, name in enumerate(e["checkpoints"])
    }


def assert_same_checkpoints(a: RunDir, b: RunDir) -> None:
    ta, tb = slice_tensors(a), slice_tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert list(ta[key]) == list(tb[key]), key
        for name in ta[key]:
            assert same_bits(ta[key][name], tb[key][name]), f"{key} {name} differs"
    ma, mb = slice_metas(a), slice_metas(b)
    for key in ma:
        for field in ("records", "samples_this_slice", "optimizer_steps", "fingerprint"):
            if field != "fingerprint":  # the fingerprint covers the config digest, which covers the executor
                assert ma[key][field] == mb[key][field], (key, field)


def assert_same_predictions(a: RunDir, b: RunDir, X: np.ndarray) -> None:
    ea = Ensemble.from_manifest(a.root, a.config(), a.manifest())
    eb = Ensemble.from_manifest(b.root, b.config(), b.manifest())
    assert ea.shards == eb.shards
    assert same_bits(ea.shard_probabilities(X, "loop"), eb.shard_probabilities(X, "loop"))
    assert np.array_equal(ea.predict_proba(X, "loop"), eb.predict_proba(X, "loop"))


def with_executor(cfg: Config, executor: str, stack_size: int | None = None, lanes: int = 2) -> Config:
    """``lanes``: threads training the stack side by side (exact mode); 2 by default, the CPU's path on CI."""
    return cfg.with_overrides(
        [
            f"training.executor={executor}",
            f"training.stack_size={stack_size or 'null'}",
            f"training.stack_threads={lanes}",
        ]
    )


# ---- user modules for the generic path (importable as tests.test_stacking:<name>) --------------------------------
class BatchNormNet(nn.Module):
    def __init__(self, n_features: int, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.inp = nn.Linear(n_features, 12)
        self.norm = nn.BatchNorm1d(12)
        self.out = nn.Linear(12, n_classes)
        self.dropout = dropout

    def forward(self, x):
        h = self.inp(x)
        h = torch.relu(
            self.norm(h) if h.shape[0] > 1 else h
        )  # BatchNorm needs 2+ rows (a last batch may have 1)
        return self.out(nn.functional.dropout(h, self.dropout, self.training) if self.dropout else h)


def make_bn_net(n_features: int, n_classes: int, dropout: float = 0.0) -> nn.Module:
    return BatchNormNet(n_features, n_classes, dropout)


def make_seed_shaped_net(n_features: int, n_classes: int) -> nn.Module:
    """A different hidden width for every initialisation: shards are not one architecture, so no stack."""
    return nn.Sequential(nn.Linear(n_features, int(torch.randint(3, 30, ())) + 1), nn.Linear(1, n_classes))


# ---- the optimizer ------------------------------------------------------------------------------------------------
OPTIMIZERS = {
    "adam": {"optimizer": "adam", "lr": 0.01},
    "adam_wd": {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.1},
    "sgd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
    "sgd_plain_wd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.01},
}


def random_grads(params: dict[str, torch.Tensor], g: torch.Generator) -> None:
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_masked_step_leaves_inactive_shards_bit_for_bit_unchanged(kind):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 5, 3, generator=g), "b": torch.randn(4, 3, generator=g)}
    opt = Optimizer(TrainingConfig(**OPTIMIZERS[kind]), params, stack=4)
    for _ in range(3):  # non-zero moments and step counts first
        random_grads(params, g)
        opt.step()
    before = {**{n: p.clone() for n, p in params.items()}, **opt.state_dict()}
    random_grads(params, g)  # every shard has a non-zero gradient, the masked ones too
    opt.step(torch.tensor([True, False, True, False]))
    after = {**params, **opt.state_dict()}
    assert opt.steps.tolist() == [4, 3, 4, 3]
    for name, old in before.items():
        if name == "step":
            continue
        for s in (1, 3):
            assert same_bits(after[name][s], old[s]), f"{name} of masked shard {s} changed"
        for s in (0, 2):
            assert not torch.equal(after[name][s], old[s]), f"{name} of active shard {s} did not move"
    opt.step(torch.zeros(4, dtype=torch.bool))  # nobody active: nothing at all happens
    assert opt.steps.tolist() == [4, 3, 4, 3]
    assert all(same_bits(after[n], t) for n, t in {**params, **opt.state_dict()}.items() if n != "step")


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 100])  # whole stack per call / one or two shards per call
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_stacked_optimizer_updates_each_shard_like_an_unstacked_one(monkeypatch, kind, chunk_bytes):
    """Adam/SGD over [S, ...] tensors with per-shard masks == S independent optimizers, bit for bit."""
    monkeypatch.setattr("sisa.train.optim.CHUNK_BYTES", chunk_bytes)
    cfg, S = TrainingConfig(**OPTIMIZERS[kind]), 5
    g = torch.Generator().manual_seed(1)
    shapes = {"w": (7, 13), "b": (13,)}
    stacked = {n: torch.randn(S, *shape, generator=g) for n, shape in shapes.items()}
    alone = [{n: t[s].clone() for n, t in stacked.items()} for s in range(S)]
    opt = Optimizer(cfg, stacked, stack=S)
    opts = [Optimizer(cfg, p) for p in alone]
    for _ in range(8):
        active = torch.rand(S, generator=g) < 0.6
        random_grads(stacked, g)
        opt.step(active)
        for s in np.flatnonzero(active.numpy()):
            for n in shapes:
                alone[s][n].grad = stacked[n].grad[s].clone()
            opts[s].step()
    for s in range(S):
        assert all(same_bits(stacked[n][s], alone[s][n]) for n in shapes)
        state, ref = opt.shard_state_dict(s), opts[s].state_dict()
        assert list(state) == list(ref)
        assert all(same_bits(state[k], ref[k]) for k in ref)


def test_shard_state_round_trips_through_a_stack():
    cfg = TrainingConfig(optimizer="adam")
    single = Optimizer(cfg, {"w": torch.zeros(3, 2)})
    single.state["w"]["exp_avg"].fill_(0.5)
    single.steps = torch.tensor(7)
    stacked = Optimizer(cfg, {"w": torch.zeros(4, 3, 2)}, stack=4)
    stacked.load_shard_state(2, single.state_dict())
    assert stacked.steps.tolist() == [0, 0, 7, 0]
    out = stacked.shard_state_dict(2)
    assert out["step"].shape == () and int(out["step"]) == 7
    assert all(same_bits(out[k], v) for k, v in single.state_dict().items())


# ---- stacked == loop on CPU -------------------------------------------------------------------------------------
EQUALITY_CASES = {
    "relu": ({}, {}),
    "tanh_dropout_two_layers_odd_batch": (
        {"hidden": [10, 7], "activation": "tanh", "dropout": 0.3},
        {"batch_size": 37, "seed": 3},
    ),
    "single_row_batches": (  # M=1 matmuls: MKL's result depends on the weight's alignment (slices are aligned)
        {"hidden": [7], "activation": "tanh"},
        {"batch_size": 1, "epochs": 1},
    ),
    "sgd_weight_decay_fractional_epochs": (
        {"hidden": [9]},
        {"optimizer": "sgd", "lr": 0.05, "weight_decay": 0.01, "epochs": 1.5, "batch_size": 25, "threads": 2},
    ),
}


@pytest.mark.parametrize("lanes", [1, 2])
@pytest.mark.parametrize("case", list(EQUALITY_CASES))
def test_stacked_equals_loop_bit_for_bit(tmp_path, case, lanes):
    """Ragged shards (different sizes, different last-batch sizes), stacks of width 2 and 1, trained by one thread
    or by two side by side."""
    model, training = EQUALITY_CASES[case]
    df = make_tabular(450, seed=7, n_features=9, n_classes=10)  # 10 classes: an MKL batch-GEMM trap shape
    cfg = small_config(model=model, training=training)
    loop = train_run(tmp_path / "loop", df, with_executor(cfg, "loop"))
    stacked = train_run(tmp_path / "stacked", df, with_executor(cfg, "stacked", 2, lanes))
    assert loop.config().training.executor == "loop" and stacked.config().training.executor == "stacked"
    sizes = [e["records"] for e in stacked.manifest()["shards"]]
    assert len(set(sizes)) == 3, sizes  # ragged shards
    assert_same_checkpoints(loop, stacked)
    assert_same_predictions(loop, stacked, feature_matrix(df))
    widths = {k: m["stack_width"] for k, m in slice_metas(stacked).items()}
    assert {m["executor"] for m in slice_metas(stacked).values()} == {"stacked"}
    if lanes == 1:
        assert widths == {(s, k): (2 if s < 2 else 1) for s in range(3) for k in range(3)}
    else:  # lanes balanced by rows: the largest shard alone, the other two together
        assert sorted(widths.values()) == [1] * 3 + [2] * 6, widths
    assert {(m["executor"], m["stack_width"]) for m in slice_metas(loop).values()} == {("loop", 1)}


def test_stacked_cnn_equals_loop_bit_for_bit(tmp_path):
    """On CPU the CNN stacks exactly too (its own kernels per shard), dropout streams included."""
    df = make_tabular(300, seed=9, n_features=16, n_classes=4)
    cfg = small_config(model={"name": "cnn", "options": {"channels": [3, 4]}, "dropout": 0.3})
    loop = train_run(tmp_path / "loop", df, with_executor(cfg, "loop"))
    stacked = train_run(tmp_path / "stacked", df, with_executor(cfg, "stacked"))
    assert_same_checkpoints(loop, stacked)
    assert_same_predictions(loop, stacked, feature_matrix(df))


def test_user_module_with_batchnorm_and_dropout_stacks_exactly(tmp_path):
    """The generic path: any nn.Module, its buffers (BatchNorm statistics) and dropout streams included."""
    df = make_tabular(400, seed=2, n_features=5, n_classes=3)
    name = "tests.test_stacking:make_bn_net"
    cfg = small_config(model={"name": name, "options": {"dropout": 0.25}}, training={"batch_size": 30})
    loop = train_run(tmp_path / "loop", df, with_executor(cfg, "loop"))
    stacked = train_run(tmp_path / "stacked", df, cfg)  # auto -> stacked
    assert stacked.config().training.executor == "stacked"
    assert "model/norm.running_mean" in slice_tensors(stacked)[(0, 2)]
    assert_same_checkpoints(loop, stacked)
    assert_same_predictions(loop, stacked, feature_matrix(df))


def test_shards_resuming_from_different_slices_step_in_lockstep(tmp_path):
    """A job set with a different from_slice per shard (as a crash or a deletion leaves it) == the loop."""
    df = make_tabular(500, seed=4, n_features=6, n_classes=3)
    cfg = small_config(sharding={"shards": 3, "slices": 4}, model={"dropout": 0.2})
    loop = train_run(tmp_path / "loop", df, with_executor(cfg, "loop"))
    run = train_run(tmp_path / "stacked", df, with_executor(cfg, "stacked"))
    metas = slice_metas(run)
    start = {0: 0, 1: 2, 2: 3}
    for entry in run.manifest()["shards"]:
        for name in entry["checkpoints"][start[entry["shard"]] :]:
            shutil.rmtree(run.shard_checkpoints(entry["shard"]) / name)
    config = run.config()
    jobs, data, _ = plan(run, config, [0, 1, 2])
    assert [(j.shard, j.from_slice) for j in jobs] == [(0, 0), (1, 2), (2, 3)]
    results = train_stacked(train_spec(run, config), jobs, data)
    for r in results:  # each shard took exactly the steps of its own remaining slices
        last = metas[(r.shard, 3)]["optimizer_steps"]
        first = metas[(r.shard, r.from_slice - 1)]["optimizer_steps"] if r.from_slice else 0
        assert r.optimizer_steps == last - first
        assert len(r.checkpoints) == 4 - r.from_slice
    assert_same_checkpoints(loop, run)


# ---- exact unlearning with the stacked executor ------------------------------------------------------------------
@pytest.mark.parametrize("lanes", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_stacked_mlp_delete_equals_retrain_from_scratch(tmp_path, tabular, case, lanes):
    training = {"executor": "stacked", "stack_size": 2, "stack_threads": lanes}
    cfg = small_config(model={"hidden": [16, 8], "dropout": 0.2}, training=training)
    run, receipt, _ = delete_and_compare(tmp_path, tabular, cfg, CASES[case])
    retrained = {int(s) for s in receipt["shards_retrained"]}
    widths = {m["stack_width"] for (s, _), m in slice_metas(run).items() if s in retrained}
    assert max(widths) <= 2


@pytest.mark.parametrize("case", list(CASES))
def test_stacked_cnn_delete_equals_retrain_from_scratch(tmp_path, case):
    df = make_tabular(360, seed=5, n_features=16, n_classes=3, string_labels=True)  # 4x4 "images"
    cfg = small_config(
        model={"name": "cnn", "options": {"channels": [3, 4]}, "dropout": 0.2},
        training={"executor": "stacked", "stack_size": 2, "batch_size": 24, "stack_threads": 2},
    )
    delete_and_compare(tmp_path, df, cfg, CASES[case])


def test_retrain_steps_only_the_affected_shards(tmp_path):
    """Cost grows with the number of affected shards, not with S: count per-shard optimizer steps."""
    df = make_tabular(800, seed=6, n_features=6, n_classes=3)
    training = {"executor": "stacked", "stack_threads": 1}  # one lane: the affected shards form one stack
    cfg = small_config(sharding={"shards": 6, "slices": 2}, training=training)
    run = train_run(tmp_path / "run", df, cfg)
    assert run.config().training.stack_size == 6  # the whole ensemble fits the memory budget in one stack
    metas = slice_metas(run)
    last_slice_steps = {
        s: metas[(s, 1)]["optimizer_steps"] - metas[(s, 0)]["optimizer_steps"] for s in range(6)
    }

    one = delete(run.root, rows_at(run, 2, 1)[:1])
    assert one["shards_retrained"] == {"2": 1}
    assert one["optimizer_steps"] == last_slice_steps[2]
    assert slice_metas(run)[(2, 1)]["stack_width"] == 1  # on CPU only the affected shard is stacked

    three = delete(run.root, rows_at(run, 0, 1)[:1] + rows_at(run, 3, 1)[:1] + rows_at(run, 5, 1)[:1])
    assert three["optimizer_steps"] == sum(last_slice_steps[s] for s in (0, 3, 5))
    assert three["optimizer_steps"] < sum(last_slice_steps.values())
    assert {slice_metas(run)[(s, 1)]["stack_width"] for s in (0, 3, 5)} == {3}


# ---- the GPU rule, exercised on CPU ------------------------------------------------------------------------------
def test_plan_groups_fixed_slots_for_batched_and_affected_only_for_exact():
    jobs = [ShardJob(5, 1, ()), ShardJob(1, 0, ()), ShardJob(2, 2, ())]
    groups = plan_groups(jobs, 4, "batched", n_shards=7)
    assert [[j and j.shard for j in g] for g in groups] == [[None, 1, 2, None], [None, 5, None]]
    assert [[j.shard for j in g] for g in plan_groups(jobs, 2, "exact", n_shards=7)] == [[5, 1], [2]]


@pytest.mark.parametrize("model", ["mlp", "cnn", "bn_net"])
def test_batched_mode_delete_is_exact_with_fixed_slots(tmp_path, monkeypatch, model):
    """The CUDA rule (full-width calls, shards in fixed slots, idle placeholders) run on CPU: still exact, and
    the retrain's checkpoints record the group's full width while only affected shards take steps."""
    monkeypatch.setitem(units.MODES, "cpu", "batched")
    df = make_tabular(360, seed=8, n_features=16, n_classes=3)
    models = {
        "mlp": {"hidden": [12], "dropout": 0.2},
        "cnn": {"name": "cnn", "options": {"channels": [3, 4]}},
        "bn_net": {"name": "tests.test_stacking:make_bn_net"},
    }
    cfg = small_config(
        sharding={"shards": 4}, model=models[model], training={"executor": "stacked", "stack_size": 3}
    )
    run, receipt, _ = delete_and_compare(tmp_path, df, cfg, lambda r: rows_at(r, 1, 2)[:2])
    metas = slice_metas(run)
    assert metas[(1, 2)]["stack_width"] == 3 and metas[(3, 2)]["stack_width"] == 1  # groups {0,1,2} and {3}
    assert receipt["optimizer_steps"] == metas[(1, 2)]["optimizer_steps"] - metas[(1, 1)]["optimizer_steps"]


# ---- resolving executor and stack size -----------------------------------------------------------------------
def resolved(cfg: Config, n_features: int = 6, classes=(0, 1, 2)) -> Config:
    out = Config.from_dict(cfg.to_dict())
    out.data.features = [f"x{i}" for i in range(n_features)]
    out.data.classes = list(classes)
    chosen = choose_training(out)
    out.training.executor = chosen.executor
    out.training.stack_threads, out.training.stack_size = chosen.stack_threads, chosen.stack_size
    return out


def test_auto_picks_the_faster_executor_per_model_and_device(monkeypatch):
    small = resolved(small_config(training={"device": "cpu"}))
    assert (small.training.executor, small.training.stack_size) == ("stacked", 3)
    assert small.training.stack_size == default_stack_size(small)
    assert small.training.stack_threads == 1  # overhead-bound: one lane (two would contend for the GIL)
    # on CPU, models whose matmuls dominate gain only from lanes (docs/stacking.md): Purchase MLP, the CNN
    purchase = small_config(model={"hidden": [128]})
    assert parameter_count(resolved(purchase, 600, range(100))) == 600 * 128 + 128 + 128 * 100 + 100
    assert parameter_count(resolved(purchase, 600, range(100))) > CPU_STACKED_MAX_PARAMS
    monkeypatch.setattr(units, "available_cores", lambda: 1)
    assert resolved(purchase, 600, range(100)).training.executor == "loop"
    assert resolved(small_config(model={"name": "cnn"}), 16).training.executor == "loop"
    monkeypatch.setattr(units, "available_cores", lambda: 4)
    for cfg in (resolved(purchase, 600, range(100)), resolved(small_config(model={"name": "cnn"}), 16)):
        assert (cfg.training.executor, cfg.training.stack_threads) == ("stacked", 4)
    monkeypatch.setitem(units.MODES, "cpu", "batched")  # the CUDA rule: every model stacks
    assert resolved(purchase, 600, range(100)).training.executor == "stacked"
    assert resolved(small_config(model={"name": "cnn"}), 16).training.executor == "stacked"


def test_stack_size_is_resolved_and_covered_by_the_digest():
    loop = resolved(small_config(training={"executor": "loop"}))
    assert (loop.training.executor, loop.training.stack_size) == ("loop", 1)
    kept = resolved(small_config(training={"stack_size": 2}))
    assert (kept.training.executor, kept.training.stack_size) == ("stacked", 2)
    assert kept.digest() != resolved(small_config(training={"stack_size": 1})).digest()
    assert kept.digest() != resolved(small_config(training={"executor": "loop", "stack_size": 2})).digest()


def test_stack_size_follows_the_memory_budget():
    cfg = resolved(small_config(sharding={"shards": 50}, model={"hidden": [512, 512]}), n_features=300)
    per_shard = shard_memory_bytes(cfg)
    params = 300 * 512 + 512 + 512 * 512 + 512 + 512 * 3 + 3
    assert per_shard > 6 * 4 * params  # parameters, gradients, moments and more
    small = cfg.with_overrides(["training.memory_budget_mb=8", "training.stack_size=null"])
    assert default_stack_size(small) == max(1, 8 * 2**20 // per_shard) < 50
    assert default_stack_size(small.with_overrides(["training.memory_budget_mb=1"])) == 1
    assert default_stack_size(small.with_overrides(["training.memory_budget_mb=100000"])) == 50
    bigger_batch = small.with_overrides(["training.batch_size=1024"])
    assert shard_memory_bytes(bigger_batch) > per_shard


def test_unstackable_user_module_falls_back_to_loop_with_a_reason(caplog):
    name = "tests.test_stacking:make_seed_shaped_net"
    with caplog.at_level(logging.WARNING, logger="sisa"):
        cfg = resolved(small_config(model={"name": name}))
    assert cfg.training.executor == "loop" and cfg.training.stack_size == 1
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"training.executor auto: model {name} cannot be stacked (ValueError: the shards'")
    assert line.endswith("; using loop") and "\n" not in line
    with pytest.raises(ConfigError) as err:
        resolved(small_config(model={"name": name}, training={"executor": "stacked"}))
    assert err.value.problems == [
        f"training.executor: stacked cannot train model {name!r} (ValueError: the shards' models are not one "
        "architecture: a tensor is [8, 6] torch.float32 in one and [13, 6] torch.float32 in another); use loop or auto"
    ]


def test_random_ops_cannot_be_vmapped_so_batched_mode_falls_back(monkeypatch, caplog):
    """In batched (GPU) mode a user module's dropout would share one random stream across shards: refused."""
    monkeypatch.setitem(units.MODES, "cpu", "batched")
    name = "tests.test_stacking:make_bn_net"
    with caplog.at_level(logging.WARNING, logger="sisa"):
        cfg = resolved(small_config(model={"name": name, "options": {"dropout": 0.5}}))
    assert cfg.training.executor == "loop"
    assert "vmap: called random operation while in randomness error mode" in caplog.records[0].getMessage()
    ok = resolved(small_config(model={"name": name}))  # without dropout it stacks (BatchNorm buffers and all)
    assert ok.training.executor == "stacked"


def test_stacked_run_records_its_stacking(tmp_path, tabular):
    run = train_run(tmp_path / "run", tabular, small_config(training={"stack_size": 2}))
    cfg = run.config()
    assert (cfg.training.executor, cfg.training.stack_size) == ("stacked", 2)
    assert run.manifest()["executor"] == "stacked"
    meta = slice_metas(run)[(0, 0)]
    assert (meta["executor"], meta["stack_width"], meta["device"]) == ("stacked", 2, "cpu")
    assert meta["config_digest"] == cfg.digest()
    assert Path(run.config_path).read_text().count("stack_size: 2") == 1
