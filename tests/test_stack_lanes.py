"""Lanes: a stacked run's shards trained side by side by threads of one process (exact mode, CPU).

Bit-equality of lanes with the loop is in tests/test_stacking.py (every equality case at 1 and 2 lanes, and the
delete-exactness scenarios, which resolve ``stack_threads`` to the machine's cores); here: that lanes really are
threads running at once, that global state they share stays consistent, and how ``stack_threads`` resolves.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from sisa.config import Config, ModelConfig
from sisa.exceptions import ConfigError
from sisa.fitting import create_run, resolve_config
from sisa.refresh import plan, train_spec
from sisa.tables.datasets import make_tabular
from sisa.tables.table import validate_table
from sisa.train import choice, lockstep, stacking, units
from sisa.train.models import GLOBAL_RNG_LOCK, build_model
from sisa.train.stacking import stack_lanes, train_stacked
from sisa.train.units import available_cores
from tests.conftest import small_config, train_run
from tests.test_stacking import resolved


def lane_config(**training) -> Config:
    return small_config(sharding={"shards": 4, "slices": 2}, training={"executor": "stacked", **training})


def test_lanes_are_threads_training_at_the_same_time(tmp_path, monkeypatch):
    spans: list[tuple[str, float, float]] = []
    real_run = lockstep.GroupTrainer.run

    def timed_run(self):
        t0 = time.perf_counter()
        time.sleep(0.2)  # long enough that two lanes started together must overlap
        out = real_run(self)
        spans.append((threading.current_thread().name, t0, time.perf_counter()))
        return out

    monkeypatch.setattr(lockstep.GroupTrainer, "run", timed_run)
    monkeypatch.setattr(units, "available_cores", lambda: 2)  # lanes are capped at the cores
    df = make_tabular(400, seed=3, n_features=5, n_classes=3)
    run = train_run(tmp_path / "run", df, lane_config(stack_threads=2, stack_size=2))
    assert run.config().training.stack_threads == 2
    names = {name for name, _, _ in spans}
    assert len(names) == 2 and all(n.startswith("sisa-stack") for n in names), spans
    (a, a0, a1), (b, b0, b1) = sorted(spans, key=lambda s: s[1])[:2]
    assert a != b and b0 < a1, spans  # the second lane started before the first finished


def test_one_lane_trains_in_the_calling_thread(tmp_path, monkeypatch):
    names = []
    real_run = lockstep.GroupTrainer.run
    monkeypatch.setattr(
        lockstep.GroupTrainer,
        "run",
        lambda self: names.append(threading.current_thread().name) or real_run(self),
    )
    df = make_tabular(300, seed=3, n_features=5, n_classes=3)
    train_run(tmp_path / "run", df, lane_config(stack_threads=1))
    assert set(names) == {threading.current_thread().name}


def _lane_setup(tmp_path, monkeypatch, fail_shard: int | None):
    """A 4-shard run's jobs in 2 lanes whose steps are slowed down; records how each lane's group ended."""
    df = make_tabular(400, seed=3, n_features=5, n_classes=3)
    cfg = lane_config(stack_threads=2, stack_size=2, epochs=20)
    table = validate_table(df, cfg.data, "test data")
    run = create_run(tmp_path / "run", resolve_config(cfg, table), table)
    config = run.config()
    jobs, data, _ = plan(run, config, [0, 1, 2, 3])
    ended: dict[tuple, str] = {}
    real_run, real_step = lockstep.GroupTrainer.run, lockstep.GroupTrainer._step_exact

    def slow_step(self, batch):
        time.sleep(0.005)
        return real_step(self, batch)

    def watched_run(self):
        shards = tuple(sorted(slot.job.shard for slot in self.slots.values()))
        try:
            if fail_shard in shards:
                time.sleep(0.1)
                raise RuntimeError(f"lane with shard {fail_shard} failed")
            out = real_run(self)
        except BaseException as exc:
            ended[shards] = type(exc).__name__
            raise
        ended[shards] = "finished"
        return out

    monkeypatch.setattr(lockstep.GroupTrainer, "_step_exact", slow_step)
    monkeypatch.setattr(lockstep.GroupTrainer, "run", watched_run)
    monkeypatch.setattr(units, "available_cores", lambda: 2)
    return train_spec(run, config), jobs, data, ended


def _lane_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sisa-stack")]


def test_a_failing_lane_stops_the_others_and_its_error_is_raised_once_all_ended(tmp_path, monkeypatch):
    spec, jobs, data, ended = _lane_setup(tmp_path, monkeypatch, fail_shard=0)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="lane with shard 0 failed"):
        train_stacked(spec, jobs, data)
    assert time.perf_counter() - t0 < 5  # the other lane (20 epochs of slowed steps) did not run to its end
    assert sorted(ended.values()) == ["LaneStopped", "RuntimeError"], ended
    assert _lane_threads() == []


def test_an_interrupt_stops_every_lane_promptly(tmp_path, monkeypatch):
    spec, jobs, data, ended = _lane_setup(tmp_path, monkeypatch, fail_shard=None)

    def interrupted_wait(futures, return_when):
        time.sleep(0.2)
        raise KeyboardInterrupt  # Ctrl-C while the main thread waits for its lanes

    monkeypatch.setattr(stacking, "wait", interrupted_wait)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        train_stacked(spec, jobs, data)
    assert time.perf_counter() - t0 < 5
    assert sorted(ended.values()) == ["LaneStopped", "LaneStopped"], ended
    assert _lane_threads() == []


def test_concurrent_model_builds_draw_only_their_own_seed():
    """Initialisation borrows torch's global generator: builds from many threads, while another thread borrows it
    for dropout draws the way a lane does, give exactly the sequential result."""
    cfg = ModelConfig(hidden=[32, 16])
    expected = {seed: build_model(cfg, 20, 4, seed).state_dict() for seed in range(12)}
    got: dict[int, dict] = {}
    stop = threading.Event()

    def noise():  # a lane's dropout draws: its own stream swapped into the global generator
        state = torch.Generator().manual_seed(99).get_state()
        while not stop.is_set():
            with GLOBAL_RNG_LOCK:
                saved = torch.get_rng_state()
                torch.set_rng_state(state)
                torch.nn.functional.dropout(torch.ones(256), 0.5)
                state = torch.get_rng_state()
                torch.set_rng_state(saved)

    def build(seed):
        got[seed] = build_model(cfg, 20, 4, seed).state_dict()

    disturber = threading.Thread(target=noise)
    disturber.start()
    threads = [threading.Thread(target=build, args=(s,)) for s in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    disturber.join()
    for seed, state in expected.items():
        assert all(torch.equal(state[k], got[seed][k]) for k in state), seed


def test_stack_threads_resolves_to_the_cores_for_exact_stacking_and_stays_out_of_the_digest(monkeypatch):
    big = small_config(model={"hidden": [128]}, training={"device": "cpu", "executor": "stacked"})
    assert resolved(big, 600, range(100)).training.stack_threads == available_cores()
    small = resolved(small_config(training={"device": "cpu", "executor": "stacked"}))
    assert small.training.stack_threads == 1  # overhead-bound: one lane
    loop = resolved(small_config(training={"executor": "loop"}))
    assert loop.training.stack_threads == 1
    kept = resolved(small_config(training={"executor": "stacked", "stack_threads": 3}))
    assert kept.training.stack_threads == 3
    # lanes do not change a bit in exact mode, so the digest (and every fingerprint) ignores them
    one = resolved(small_config(training={"executor": "stacked", "stack_threads": 1}))
    assert kept.digest() == one.digest()
    monkeypatch.setitem(units.MODES, "cpu", "batched")  # the CUDA rule: one stream, no lanes
    assert resolved(small_config(training={"executor": "stacked"})).training.stack_threads == 1


def test_memory_budget_is_shared_by_the_lanes():
    training = {"executor": "stacked", "stack_threads": 1, "memory_budget_mb": 64}
    base = resolved(small_config(sharding={"shards": 512}, model={"hidden": [512, 512]}, training=training))
    assert 4 < choice.default_stack_size(base) < 512  # the budget binds
    per_lane = base.with_overrides(["training.stack_threads=4", "training.stack_size=null"])
    assert choice.default_stack_size(per_lane) == max(1, choice.default_stack_size(base) // 4)


def test_lanes_only_where_this_process_is_the_only_trainer(monkeypatch):
    monkeypatch.setattr(units, "available_cores", lambda: 8)
    cfg = small_config(training={"stack_threads": 4})
    assert stack_lanes(cfg, "exact", 10) == 4
    monkeypatch.setattr(units, "available_cores", lambda: 2)  # a run trained on a bigger machine
    assert stack_lanes(cfg, "exact", 10) == 2
    monkeypatch.setattr(units, "available_cores", lambda: 8)
    assert stack_lanes(cfg, "exact", 3) == 3  # never more lanes than jobs
    assert stack_lanes(cfg, "batched", 10) == 1  # GPU: one stream of full-width calls
    assert stack_lanes(cfg.with_overrides(["training.n_jobs=2"]), "exact", 10) == 1  # each worker is a lane
    assert stack_lanes(cfg.with_overrides(["training.backend=dask"]), "exact", 10) == 1


def test_stack_threads_must_be_a_positive_integer():
    with pytest.raises(ConfigError) as err:
        small_config(training={"stack_threads": 0})
    assert err.value.problems == ["training.stack_threads: expected an integer >= 1, got 0"]
