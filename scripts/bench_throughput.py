"""Throughput sections of the unlearning benchmark (``scripts/bench_unlearning.py``): framework overhead vs a
minimal torch loop, parallel and stacked training (processes, lanes), stacked vs looped ensemble inference."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_setup import HIDDEN, Setup, best_of, config, table, timed  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sisa.aggregation import Ensemble  # noqa: E402
from sisa.config import Config, TrainingConfig  # noqa: E402
from sisa.fitting import create_run, resolve_config  # noqa: E402
from sisa.refresh import plan, train_spec  # noqa: E402
from sisa.train.executors import run_jobs  # noqa: E402
from sisa.train.models import build_model  # noqa: E402
from sisa.train.optim import Optimizer  # noqa: E402
from sisa.train.shard import ShardData, ShardJob, TrainSpec, train_shard  # noqa: E402
from sisa.train.units import available_cores  # noqa: E402


# ---- framework overhead ----------------------------------------------------------------------------------------
def overhead(s: Setup, work: Path, df, out: dict) -> None:
    D, e = s.n // s.shards, s.par_epochs  # one shard of the speedup section, enough epochs for a steady state
    X = np.ascontiguousarray(df.iloc[:D, 2:].to_numpy(np.float32))
    y = np.array(df["label"].to_numpy(np.int64)[:D])
    res = {"rows": D, "epochs": e}
    minimal = best_of(s.reps, lambda: _minimal_loop(X, y, e, "torch"))
    same_opt = best_of(s.reps, lambda: _minimal_loop(X, y, e, "sisa"))
    for R in sorted({1, s.slices}):
        cfg = config(1, R, e, executor="loop")
        spec = TrainSpec(cfg, X.shape[1], 100, cfg.digest(), str(work / f"overhead-R{R}"), "cpu")
        job = ShardJob(0, 0, tuple(f"{k:064x}" for k in range(R)))
        data = ShardData(X, y, np.linspace(D / R, D, R).round().astype(np.int64))
        framework = best_of(s.reps, lambda spec=spec, job=job, data=data: train_shard(spec, job, data))
        key = "overhead_ratio" if R == 1 else "overhead_ratio_sliced"
        res[key] = minimal / framework
        res[f"framework_samples_per_s_R{R}"] = e * D / framework
    res["minimal_samples_per_s"] = e * D / minimal
    res["minimal_with_sisa_optimizer_samples_per_s"] = e * D / same_opt
    out["overhead"] = res
    table(
        f"per-shard training throughput, {D} rows x {e} epochs, 1 thread (samples/s)",
        ["path", "samples/s", "vs minimal loop"],
        [
            ["minimal torch loop (torch.optim.Adam)", res["minimal_samples_per_s"], 1.0],
            ["minimal loop with sisa.train.optim.Optimizer", res["minimal_with_sisa_optimizer_samples_per_s"],
             minimal / same_opt],
            *[[f"sisa train_shard, R={R}", res[f"framework_samples_per_s_R{R}"],
               res["overhead_ratio" if R == 1 else "overhead_ratio_sliced"]] for R in sorted({1, s.slices})],
        ],
    )  # fmt: skip


def _minimal_loop(X: np.ndarray, y: np.ndarray, epochs: float, optimizer: str) -> None:
    """What a user would write by hand: same model and batches, nothing else."""

    torch.set_num_threads(1)
    model = build_model(config(1, 1, 1).model, X.shape[1], 100, 0)
    if optimizer == "torch":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = Optimizer(TrainingConfig(), dict(model.named_parameters()))
    Xt, yt = torch.tensor(X), torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    for _ in range(int(epochs)):
        perm = torch.randperm(len(Xt), generator=g)
        for start in range(0, len(Xt), 128):
            idx = perm[start : start + 128]
            for p in model.parameters():
                p.grad = None
            torch.nn.functional.cross_entropy(model(Xt[idx]), yt[idx]).backward()
            opt.step()


# ---- parallel and stacked training -----------------------------------------------------------------------------
def parallel(s: Setup, work: Path, df, out: dict) -> None:
    n = s.n * s.par_shards // s.shards  # keep D = N/S of the speedup section
    data_table = _table(df.iloc[:n])
    cfg = config(s.par_shards, 1, s.epochs, executor="loop")
    run = create_run(work / "parallel", resolve_config(cfg, data_table), data_table)
    cfg = run.config()
    jobs, data, _ = plan(run, cfg, list(range(s.par_shards)))
    base = train_spec(run, cfg)

    lanes = available_cores()

    def spec(n_jobs: int, root: str, stack_threads: int = 1) -> TrainSpec:
        # stack_size null: a stacked executor's groups as a stacked run resolves them (the budget, per lane)
        training = {**cfg.to_dict()["training"], "n_jobs": n_jobs, "stack_threads": stack_threads}
        training["stack_size"] = None
        c = Config.from_dict({**cfg.to_dict(), "training": training})
        return dataclasses.replace(base, config=c, checkpoint_root=str(work / root))

    _, cold = timed(run_jobs, spec(2, "warm"), jobs[:2], data, "loop")  # starts the loky pool
    t = {}
    for name, n_jobs, executor, threads in (
        ("loop1", 1, "loop", 1), ("loop2", 2, "loop", 1),
        ("stacked1", 1, "stacked", 1), ("stacked_lanes", 1, "stacked", lanes), ("stacked2", 2, "stacked", 1),
    ):  # fmt: skip
        t[name] = best_of(
            s.reps,
            lambda n=n_jobs, e=executor, th=threads, r=f"ck-{name}": run_jobs(spec(n, r, th), jobs, data, e),
        )
    equal = _same_checkpoints(work / "ck-loop1", work / "ck-stacked_lanes")
    equal = equal and _same_checkpoints(work / "ck-loop1", work / "ck-stacked1")
    res = {
        "shards": s.par_shards,
        "lanes": lanes,
        "parallel_speedup": t["loop1"] / t["loop2"],
        "parallel_speedup_stacked": t["stacked1"] / t["stacked2"],
        # the stacked executor as a run resolves it (lanes = cores for this model) vs the loop (1 process)
        "stacked_train_speedup_cpu": t["loop1"] / t["stacked_lanes"],
        "stacked_train_speedup_cpu_one_lane": t["loop1"] / t["stacked1"],
        "stacked_vs_loop_n_jobs_2": t["loop2"] / t["stacked_lanes"],
        "stacked_equals_loop_cpu": equal,
        "seconds": t,
        "pool_cold_start_seconds_2_shards": cold,
    }
    res["stacked_train_speedup_gpu"] = (
        _gpu_stacked(base, jobs, data, work) if torch.cuda.is_available() else None
    )
    out["parallel"] = res
    table(
        f"training {s.par_shards} shards (D={n // s.par_shards}, {s.par_epochs} epochs, R=1)",
        ["executor", "1 process s", f"{lanes} lanes s", "n_jobs=2 s", "vs loop, 1 process"],
        [["loop", t["loop1"], "-", t["loop2"], 1.0],
         ["stacked, 1 lane", t["stacked1"], "-", t["stacked2"], res["stacked_train_speedup_cpu_one_lane"]],
         [f"stacked, {lanes} lanes", "-", t["stacked_lanes"], "-", res["stacked_train_speedup_cpu"]]],
    )  # fmt: skip
    print(f"  stacked ({lanes} lanes) vs loop (1 process): {res['stacked_train_speedup_cpu']:.2f}x, vs loop "
          f"n_jobs=2: {res['stacked_vs_loop_n_jobs_2']:.2f}x; bit-equal: {equal}; "
          f"GPU: {res['stacked_train_speedup_gpu']}")  # fmt: skip


def _table(df):
    from sisa.tables.table import validate_table

    return validate_table(df, Config().data, "benchmark data")


def _same_checkpoints(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    if not files or files != sorted(p.relative_to(b) for p in b.rglob("*.safetensors")):
        return False
    for f in files:
        ta, tb = load_file(a / f), load_file(b / f)
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def _gpu_stacked(base: TrainSpec, jobs, data, work: Path) -> float:
    spec = dataclasses.replace(base, device="cuda", checkpoint_root=str(work / "ck-gpu"))
    run_jobs(spec, jobs[:2], data, "stacked")  # CUDA start-up
    loop = min(timed(run_jobs, spec, jobs, data, "loop")[1] for _ in range(2))
    stacked = min(timed(run_jobs, spec, jobs, data, "stacked")[1] for _ in range(2))
    return loop / stacked


# ---- ensemble inference ----------------------------------------------------------------------------------------
def inference(s: Setup, ens: Ensemble | None, X_test, out: dict) -> None:
    """Purchase MLP (trained, from the accuracy grid) and an Adult-sized one (14-128-2), S=20, 1 thread."""
    torch.set_num_threads(1)
    if ens is None or len(ens.shards) < 20:
        ens = _random_ensemble(600, 100)
    small = _random_ensemble(14, 2)
    X_small = np.random.Generator(np.random.PCG64(0)).normal(size=(4096, 14)).astype(np.float32)
    res: dict = {"models": len(ens.shards), "threads": 1}
    rows = []
    for name, e, X_all in (("purchase_600_128_100", ens, X_test), ("adult_14_128_2", small, X_small)):
        res[name] = {}
        for B in (1, 64, 4096):
            X = np.ascontiguousarray(X_all[:B])
            calls = max(3, 2048 // B)
            loop, stacked = (
                best_of(
                    s.reps + 1,
                    lambda X=X, c=calls, m=mode, e=e: [e.shard_probabilities(X, m) for _ in range(c)],
                )
                for mode in ("loop", "stacked")
            )
            r = {"loop_rows_per_s": calls * B / loop, "stacked_rows_per_s": calls * B / stacked,
                 "stacked_vs_looped": loop / stacked, "auto": e.inference_mode(B, "auto")}  # fmt: skip
            res[name][f"batch_{B}"] = r
            rows.append(
                [name, B, r["loop_rows_per_s"], r["stacked_rows_per_s"], r["stacked_vs_looped"], r["auto"]]
            )
    res["stacked_vs_looped"] = res["purchase_600_128_100"]["batch_64"]["stacked_vs_looped"]
    res["stacked_vs_looped_small_model"] = res["adult_14_128_2"]["batch_64"]["stacked_vs_looped"]
    out["inference"] = res
    table(f"ensemble inference, S={len(ens.shards)}, 1 thread (rows/s)",
          ["model", "batch", "loop", "stacked", "stacked/loop", "auto picks"], rows)  # fmt: skip


def _random_ensemble(n_features: int, n_classes: int, models: int = 20) -> Ensemble:
    """Inference cost does not depend on the weights: untrained models of the right shape will do."""
    cfg = Config.from_dict({"data": {"classes": list(range(n_classes))}, "model": {"hidden": HIDDEN}})
    return Ensemble({k: build_model(cfg.model, n_features, n_classes, k).eval() for k in range(models)}, cfg)
