#!/usr/bin/env python
"""Benchmark SISA unlearning against retraining from scratch, on Purchase-like synthetic data.

    python scripts/bench_unlearning.py --json bench-results/bench.json      # full: 100k records, 600 features
    python scripts/bench_unlearning.py --quick --json /tmp/bench-quick.json  # reduced, a few minutes on 2 cores
    python scripts/bench_unlearning.py --quick --sections speedup,handloop,memory  # issue 14's numbers only

Sections (each prints a table; all numbers land in the JSON, ratios > 1 meaning "faster"):
  accuracy      SISA ensemble accuracy for S x R next to a single model on all data (S=1, R=1; same epochs)
  speedup       wall time of a full retrain / wall time of a deletion, K=1 and K=8 requests (batched), next to
                the paper's expected value (sisa.costs) and their ratio (target >= 0.9); deletion_overhead_share =
                (deletion wall - retrain wall) / deletion wall, the retrain being the run_jobs calls (target <=
                0.05 at full size); in-process (warm) and once via the CLI; the profile of one deletion
  handloop      in-process K=1 / K=8 deletions (K=8: 8 distinct shards) next to a minimal hand-written torch loop
                doing the same retrain, saving the same slice checkpoints without fsync (target <= 1.1x)
  overhead      per-shard training throughput of sisa vs a minimal hand-written torch loop on the same tensors
  parallel      all shards with training.n_jobs=2 vs 1 (joblib, warm pool); stacked vs loop executor training
  inference     stacked (vmap) vs looped ensemble inference, S=20, batch 1 / 64 / 4096
  aware         distribution-aware vs uniform placement: expected and measured cost, accuracy
  memory        peak RSS of `sisa train` (CLI subprocess) on 40k x 600 float32 features vs the matrix (target < 3x)
Ratios are measured within one run: the machine may be shared and noisy. Timings are min-of-repeats where cheap.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sisa import costs  # noqa: E402
from sisa.aggregation import Ensemble  # noqa: E402
from sisa.evaluation import evaluate  # noqa: E402
from sisa.fitting import train  # noqa: E402
from sisa.refresh import EarlyRetrain  # noqa: E402
from sisa.store.rundir import RunDir  # noqa: E402
from sisa.tables.datasets import PURCHASE_BENCH_FLIP, make_purchase  # noqa: E402
from sisa.unlearning import delete  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deletion import (  # noqa: E402
    TARGET_OVERHEAD_SHARE,
    TARGET_SPEEDUP_RATIO,
    handloop,
    overhead_share,
    timed_deletion,
)
from bench_memory import memory  # noqa: E402
from bench_setup import FULL, HIDDEN, QUICK, TINY, Setup, config, table, timed  # noqa: E402
from bench_throughput import inference, overhead, parallel  # noqa: E402

SECTIONS = ("accuracy", "speedup", "handloop", "overhead", "parallel", "inference", "aware", "memory")


# ---- accuracy --------------------------------------------------------------------------------------------------
def accuracy(s: Setup, work: Path, df, X_test, y_test, out: dict) -> Ensemble:
    grid, keep, widest = {}, None, max(s.grid_shards)
    for S in s.grid_shards:
        for R in s.grid_slices:
            root = work / f"acc-S{S}-R{R}"
            (run, _), secs = timed(train, root, config(S, R, s.epochs), df)
            ens = Ensemble.from_manifest(run.root, run.config(), run.manifest())
            grid[f"S{S}_R{R}"] = {"accuracy": ens.accuracy(X_test, y_test), "train_seconds": secs}
            if keep is None and widest == S:
                keep = ens
            shutil.rmtree(root)
    single = grid[f"S1_R{min(s.grid_slices)}"]["accuracy"] if 1 in s.grid_shards else None
    out["accuracy"] = {"grid": grid, "single_model": single, "epochs": s.epochs, "executor": "auto"}
    rows = [[S, *[grid[f"S{S}_R{R}"]["accuracy"] for R in s.grid_slices], single] for S in s.grid_shards]
    table("accuracy on held-out rows", ["S", *[f"R={R}" for R in s.grid_slices], "single model"], rows)
    return keep


# ---- unlearning speedup ----------------------------------------------------------------------------------------
def speedup(s: Setup, work: Path, df, out: dict, with_handloop: bool = True) -> None:
    cfg = config(s.shards, s.slices, s.speed_epochs, executor="loop")
    train(work / "warmup", config(2, 2, 1, executor="loop"), df.iloc[:500])  # imports, first Adam step
    shutil.rmtree(work / "warmup")
    root = work / "speedup"
    (run, report), t_full = timed(train, root, cfg, df)
    full_samples = sum(r.samples for r in report.results)
    full_training = sum(r.seconds for r in report.results)  # inside the shards; the rest is creating the run
    rng = np.random.Generator(np.random.PCG64(7))
    k1, k8 = [], []
    slices = np.unique(np.linspace(0, s.slices - 1, s.k1_deletions).round().astype(int))
    for j in slices:  # stratified over slices: the mean estimates E[cost] for a uniformly random record
        active = run.index(verify=False).active
        pool = active.loc[active["slice"] == j, "record_id"].to_numpy()
        receipt, secs, retrain = timed_deletion(root, [pool[rng.integers(len(pool))].item()])
        k1.append((secs, receipt["samples_retrained"], retrain))
    for _ in range(s.k8_batches):
        ids = run.index(verify=False).active["record_id"].to_numpy()
        receipt, secs, retrain = timed_deletion(root, rng.choice(ids, 8, replace=False).tolist())
        k8.append((secs, receipt["samples_retrained"], retrain))
    if with_handloop:
        handloop(root, work, rng, s.k1_deletions, s.k8_batches, out)
    profile = _profile_deletion(root, rng)
    cli_secs = _cli_deletion(root, rng)
    eval_secs = _evaluate_overhead(run, work, df)
    shutil.rmtree(root)
    t_again = timed(train, root, cfg, df)[
        1
    ]  # again at the end: the faster of the two (the machine is shared)
    t_full = min(t_full, t_again)
    shutil.rmtree(root)

    res = {
        "shards": s.shards,
        "slices": s.slices,
        "epochs": s.speed_epochs,
        "records": s.n,
        "executor": "loop",
    }
    res.update(
        full_retrain_seconds=t_full,
        full_retrain_seconds_second_run=t_again,
        full_retrain_samples=full_samples,
        full_retrain_shard_training_seconds=full_training,
    )
    for name, K, rows in (("k1", 1, k1), ("k8", 8, k8)):
        secs, samples = float(np.mean([r[0] for r in rows])), float(np.mean([r[1] for r in rows]))
        expected = costs.expected_speedup(s.shards, s.slices, K)
        res[f"speedup_{name}_measured"] = t_full / secs
        res[f"speedup_{name}_expected"] = expected
        res[f"speedup_{name}_ratio"] = t_full / secs / expected
        res[f"speedup_{name}_samples"] = full_samples / samples  # the cost model alone, no overheads
        res[f"deletion_{name}_seconds"] = secs
        res[f"deletion_{name}_requests"] = len(rows)
        res[f"retrain_{name}_seconds"] = float(np.mean([r[2] for r in rows]))
        share = overhead_share([r[0] for r in rows], [r[2] for r in rows])
        res[f"deletion_overhead_share_{name}"] = share
        res[f"deletion_overhead_share_{name}_target_met"] = share <= TARGET_OVERHEAD_SHARE
        res[f"speedup_{name}_ratio_target_met"] = res[f"speedup_{name}_ratio"] >= TARGET_SPEEDUP_RATIO
    res.update(cli_delete_seconds=cli_secs, cli_speedup_k1=t_full / cli_secs, deletion_profile=profile)
    res["deletion_profile_overhead_share"] = profile_share(profile)
    res["evaluate_seconds_per_deletion_if_data_test_set"] = eval_secs
    out["speedup"] = res
    table(
        f"unlearning speedup vs full retrain ({t_full:.1f} s; S={s.shards}, R={s.slices}, in-process)",
        ["K", "measured", "expected", f"ratio (>= {TARGET_SPEEDUP_RATIO})", "cost-model (samples)", "s/deletion",
         "retrain s", f"overhead share (<= {TARGET_OVERHEAD_SHARE})", "requests"],
        [
            [K, res[f"speedup_{n}_measured"], res[f"speedup_{n}_expected"], res[f"speedup_{n}_ratio"],
             res[f"speedup_{n}_samples"], res[f"deletion_{n}_seconds"], res[f"retrain_{n}_seconds"],
             res[f"deletion_overhead_share_{n}"], res[f"deletion_{n}_requests"]]
            for n, K in (("k1", 1), ("k8", 8))
        ],
    )  # fmt: skip
    print(f"  CLI `sisa delete` (new process): {cli_secs:.2f} s -> speedup {t_full / cli_secs:.2f}")
    print("  one K=1 deletion, seconds by part (inclusive):")
    for k, v in profile.items():
        print(f"    {k:45s} {v:7.3f}")
    print(
        f"    {'overhead share (total - run_jobs) / total':45s} {res['deletion_profile_overhead_share']:7.3f}"
    )


PARTS = {  # (file, function) -> label: inclusive time inside one deletion (parts may nest, e.g. config reads)
    ("executors.py", "run_jobs"): "retrain (run_jobs)",
    ("checkpoints.py", "save_checkpoint"): "checkpoint hand-over (inside retrain)",
    ("unlearning.py", "_resolve"): "find the IDs",
    ("unlearning.py", "_require_retrainable"): "verified reads before the acknowledgement",
    ("deletion.py", "roll_back"): "rollback (purge, index, rolled-back manifest, stale renamed)",
    ("refresh.py", "start"): "start the catch-up early (its plan; inside rollback)",
    ("garbage.py", "finish_erasure"): "wait for the stale checkpoints' removal",
    ("refresh.py", "plan"): "plan (fingerprint chains, shard arrays)",
    ("barrier.py", "barrier"): "durability barrier",
    ("rundir.py", "index"): "read index",
    ("rundir.py", "config"): "read config.yaml",
    ("rundir.py", "write_manifest"): "write manifest",
    ("journal.py", "begin"): "journal",
    ("journal.py", "stage"): "journal",
    ("journal.py", "roll_back"): "journal",
    ("journal.py", "complete"): "journal",
}


def _profile_deletion(root: Path, rng) -> dict:
    run = RunDir(root)
    ids = run.index(verify=False).active["record_id"].to_numpy()
    prof, early = cProfile.Profile(), cProfile.Profile()  # the catch-up that starts early trains on a thread
    train = EarlyRetrain._train
    EarlyRetrain._train = lambda self: early.runcall(train, self)
    try:
        t0 = time.perf_counter()
        prof.runcall(delete, root, [ids[rng.integers(len(ids))].item()])
        total = time.perf_counter() - t0
    finally:
        EarlyRetrain._train = train
    parts: dict[str, float] = {"total": total}
    stats = pstats.Stats(prof)
    if early.getstats():
        stats.add(early)
    for (path, _, func), (_, _, _, cum, _) in stats.stats.items():
        label = next((v for (f, fn), v in PARTS.items() if path.endswith(f) and fn == func), None)
        if label:
            parts[label] = parts.get(label, 0.0) + cum
    return {k: round(v, 4) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}


def profile_share(profile: dict) -> float:
    """(deletion wall - retrain wall) / deletion wall of one profiled deletion (cProfile inflates both; the retrain
    overlaps the rollback, so the parts add up to more than the total)."""
    return (profile["total"] - profile.get("retrain (run_jobs)", 0.0)) / profile["total"]


def _cli_deletion(root: Path, rng) -> float:
    ids = RunDir(root).index(verify=False).active["record_id"].to_numpy()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "sisa.cli.main",
        "delete",
        "--run",
        str(root),
        str(ids[rng.integers(len(ids))]),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def _evaluate_overhead(run: RunDir, work: Path, df) -> float:
    """What refresh adds to every deletion when the config names a test table (sisa.evaluation.evaluate)."""
    test_path = work / "test.parquet"
    df.iloc[:4096].to_parquet(test_path)
    cfg = run.config().with_overrides([f"data.test={test_path}"])  # a copy: the run's config is shared
    return min(timed(evaluate, run, cfg, run.manifest())[1] for _ in range(2))


# ---- distribution-aware placement ------------------------------------------------------------------------------
def aware(s: Setup, work: Path, df, X_test, y_test, out: dict) -> None:
    n = s.n * s.aware_shards // s.shards
    part = df.iloc[:n].copy()
    rng = np.random.Generator(np.random.PCG64(11))
    volatile = rng.random(n) < 0.1  # 10 % of the people are likely to leave
    part["p"] = np.where(volatile, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.05, n))
    S, R = s.aware_shards, s.aware_slices
    res = {"records": n, "shards": S, "slices": R, "volatile_share": float(volatile.mean())}
    draws = [rng.choice(n, 8, replace=False, p=part["p"] / part["p"].sum()) for _ in range(s.aware_batches)]
    for strategy in ("uniform", "distribution_aware"):
        cfg = config(S, R, s.epochs, executor="loop", strategy=strategy, prob_column="p")
        (run, _), secs = timed(train, work / strategy, cfg, part)
        ens = Ensemble.from_manifest(run.root, run.config(), run.manifest())
        idx = run.index(verify=False).active.merge(part[["record_id", "p"]], on="record_id")
        kw = {"shards": S, "slices": R, "epochs": s.epochs}
        r = {"accuracy": ens.accuracy(X_test, y_test), "train_seconds": secs}
        r["training_samples"] = costs.placement_training_cost(idx["shard"], idx["slice"], **kw)
        for K in (1, 8):
            r[f"expected_samples_k{K}"] = costs.placement_cost(
                idx["shard"], idx["slice"], idx["p"], requests=K, **kw
            )
        measured = [timed(delete, run.root, part["record_id"].iloc[d].tolist()) for d in draws]
        r["measured_samples_k8"] = float(np.mean([m[0]["samples_retrained"] for m in measured]))
        r["measured_seconds_k8"] = float(np.mean([m[1] for m in measured]))
        res[strategy] = r
        shutil.rmtree(run.root)
    u, a = res["uniform"], res["distribution_aware"]
    res["expected_cost_ratio_k1"] = u["expected_samples_k1"] / a["expected_samples_k1"]
    res["expected_cost_ratio_k8"] = u["expected_samples_k8"] / a["expected_samples_k8"]
    res["measured_cost_ratio_k8"] = u["measured_samples_k8"] / a["measured_samples_k8"]
    res["measured_time_ratio_k8"] = u["measured_seconds_k8"] / a["measured_seconds_k8"]
    out["aware"] = res
    table(
        f"distribution-aware vs uniform placement ({n} records, 10 % volatile, requests drawn by probability)",
        ["strategy", "accuracy", "E[cost] K=1", "E[cost] K=8", "measured K=8", "s per K=8", "training samples"],
        [[k, v["accuracy"], v["expected_samples_k1"], v["expected_samples_k8"], v["measured_samples_k8"],
          v["measured_seconds_k8"], v["training_samples"]] for k, v in (("uniform", u), ("distribution_aware", a))],
    )  # fmt: skip


# ---- output ----------------------------------------------------------------------------------------------------
def summary(out: dict) -> dict:
    sp, ov, par, inf, hl, mem = (
        out.get(k, {}) for k in ("speedup", "overhead", "parallel", "inference", "handloop", "memory")
    )
    keys = {
        "speedup_k1_measured": sp.get("speedup_k1_measured"),
        "speedup_k1_expected": sp.get("speedup_k1_expected"),
        "speedup_k8_measured": sp.get("speedup_k8_measured"),
        "speedup_k8_expected": sp.get("speedup_k8_expected"),
        "speedup_k1_ratio": sp.get("speedup_k1_ratio"),
        "speedup_k8_ratio": sp.get("speedup_k8_ratio"),
        "speedup_k1_ratio_target_met": sp.get("speedup_k1_ratio_target_met"),
        "speedup_k8_ratio_target_met": sp.get("speedup_k8_ratio_target_met"),
        "deletion_overhead_share_k1": sp.get("deletion_overhead_share_k1"),
        "deletion_overhead_share_k8": sp.get("deletion_overhead_share_k8"),
        "deletion_overhead_share_k1_target_met": sp.get("deletion_overhead_share_k1_target_met"),
        "deletion_overhead_share_k8_target_met": sp.get("deletion_overhead_share_k8_target_met"),
        "deletion_vs_hand_loop_k1": hl.get("deletion_vs_hand_loop_k1"),
        "deletion_vs_hand_loop_k8": hl.get("deletion_vs_hand_loop_k8"),
        "deletion_vs_hand_loop_k1_target_met": hl.get("k1", {}).get("deletion_vs_hand_loop_target_met"),
        "deletion_vs_hand_loop_k8_target_met": hl.get("k8", {}).get("deletion_vs_hand_loop_target_met"),
        "train_peak_rss_vs_features": mem.get("peak_rss_vs_features"),
        "train_peak_rss_above_imports_vs_features": mem.get("peak_rss_above_imports_vs_features"),
        "train_peak_rss_target_met": mem.get("target_met"),
        "overhead_ratio": ov.get("overhead_ratio"),
        "parallel_speedup": par.get("parallel_speedup"),
        "stacked_vs_looped": inf.get("stacked_vs_looped"),
        "stacked_train_speedup_cpu": par.get("stacked_train_speedup_cpu"),
        "stacked_train_speedup_gpu": par.get("stacked_train_speedup_gpu"),
        "stacked_equals_loop_cpu": par.get("stacked_equals_loop_cpu"),
    }
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in keys.items()}


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    acc = out.get("accuracy", {})
    grid = acc.get("grid", {})
    shards = sorted({int(k.split("_")[0][1:]) for k in grid})
    for R in sorted({int(k.split("_R")[1]) for k in grid}):
        left.plot(shards, [grid[f"S{S}_R{R}"]["accuracy"] for S in shards], "o-", label=f"SISA, R={R}")
    if acc.get("single_model") is not None:
        left.axhline(acc["single_model"], color="k", ls="--", label="single model, all data")
    left.set(xlabel="shards S", ylabel="test accuracy", title="Accuracy vs shards", xticks=shards)
    left.legend()
    sp = out.get("speedup")
    if sp:
        ks = np.arange(1, 33)
        right.plot(ks, [costs.expected_speedup(sp["shards"], sp["slices"], int(k)) for k in ks], "-",
                   label=f"expected (S={sp['shards']}, R={sp['slices']})")  # fmt: skip
        right.plot(
            [1, 8], [sp["speedup_k1_measured"], sp["speedup_k8_measured"]], "o", label="measured, wall time"
        )
        right.plot(
            [1, 8], [sp["speedup_k1_samples"], sp["speedup_k8_samples"]], "x", label="measured, samples"
        )
        right.set(xscale="log", yscale="log", xlabel="requests K (batched)", ylabel="speedup vs full retrain",
                  title="Unlearning speedup vs K")  # fmt: skip
        right.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        right.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="reduced sizes (20k records), a few minutes on 2 cores"
    )
    ap.add_argument("--json", type=Path, help="write every number to this JSON file")
    ap.add_argument("--plot", type=Path, help="PNG plot (default: next to --json, else bench-results/)")
    ap.add_argument("--work", type=Path, help="scratch folder for run directories (default: a temp folder)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke test of the script, seconds)")
    ap.add_argument("--only", "--sections", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")  # fmt: skip
    ap.add_argument("--speed-epochs", type=float, help="epochs of the speedup section (default 10; quick 8)")
    a = ap.parse_args(argv)
    s = TINY if a.tiny else QUICK if a.quick else FULL
    if a.speed_epochs:
        s = dataclasses.replace(s, speed_epochs=a.speed_epochs)
    only = set(a.only.split(","))
    if only - set(SECTIONS):
        ap.error(f"unknown section(s) {sorted(only - set(SECTIONS))}; choose from {list(SECTIONS)}")
    work = Path(a.work or tempfile.mkdtemp(prefix="sisa-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0, load_before = time.perf_counter(), os.getloadavg()
    full = make_purchase(s.n + s.n_test, seed=0, flip=PURCHASE_BENCH_FLIP)
    df, test = full.iloc[: s.n].reset_index(drop=True), full.iloc[s.n :]
    X_test, y_test = (
        np.array(test.iloc[:, 2:].to_numpy(np.float32)),
        np.array(test["label"].to_numpy(np.int64)),
    )
    print(f"Purchase-like data: {s.n} train + {s.n_test} test records, 600 features, 100 classes, "
          f"flip={PURCHASE_BENCH_FLIP}; MLP 600-{HIDDEN[0]}-100{'; QUICK (reduced sizes)' if a.quick else ''}")  # fmt: skip
    out: dict = {"quick": a.quick, "setup": dataclasses.asdict(s)}
    ens = None
    try:
        if "accuracy" in only:
            ens = accuracy(s, work, df, X_test, y_test, out)
        if "speedup" in only or "handloop" in only:  # the hand loop retrains what the speedup run deletes
            speedup(s, work, df, out, with_handloop="handloop" in only)
        if "overhead" in only:
            overhead(s, work, df, out)
        if "parallel" in only:
            parallel(s, work, df, out)
        if "inference" in only:
            inference(s, ens, X_test, out)
        if "aware" in only:
            aware(s, work, df, X_test, y_test, out)
        if "memory" in only:
            memory(s, work, out)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    out["environment"] = {
        "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }  # fmt: skip
    out = {**summary(out), **out}
    print("\n" + json.dumps(summary(out), indent=1))
    print(f"total {out['environment']['seconds']} s")
    plot_path = a.plot or (a.json.with_suffix(".png") if a.json else ROOT / "bench-results" / "bench.png")
    plot(out, plot_path)
    print(f"plot: {plot_path}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1, default=float) + "\n")
        print(f"json: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
