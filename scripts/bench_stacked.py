"""Stacked vs loop executor: training throughput, bit-equality, and peak memory, on Purchase-like data.

    python scripts/bench_stacked.py                     # S=20, 20k records, 1 epoch; JSON on stdout
    python scripts/bench_stacked.py --records 100000 --rss   # also the peak RSS of a stacked training (child process)
    python scripts/bench_stacked.py --more                   # also the 784-256-10 MLP and the CNN (28x28 inputs)

"stacked" is the executor as a run resolves it (lanes = ``stack_threads`` for the model and this machine); "one
lane" the same with ``stack_threads=1``. ``make bench`` measures the same comparison on a longer training
(``scripts/bench_throughput.py``). Throughput counts training only (the executor's wall time for every shard of a
run, checkpoint writes included; not writing the run's data files or evaluation).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sisa.config import Config  # noqa: E402
from sisa.fitting import create_run, resolve_config, train  # noqa: E402
from sisa.refresh import plan, train_spec  # noqa: E402
from sisa.store.rundir import RunDir  # noqa: E402
from sisa.tables.datasets import make_purchase  # noqa: E402
from sisa.tables.table import validate_table  # noqa: E402
from sisa.train.executors import run_jobs  # noqa: E402
from sisa.unlearning import delete  # noqa: E402


def purchase_config(shards: int, executor: str, device: str = "cpu", **training) -> Config:
    """The Purchase-like setting of docs/design.md §7: 600 -> 128 -> 100 MLP, batch 128, one epoch, one slice."""
    return Config.from_dict(
        {
            "sharding": {"shards": shards, "slices": 1},
            "model": {"hidden": [128]},
            "training": {
                "epochs": 1,
                "batch_size": 128,
                "device": device,
                "executor": executor,
                "threads": 1,
                "progress": False,
                **training,
            },
        }
    )


def train_throughput(config: Config, df, workdir: Path, repeats: int = 3) -> dict:
    """Samples per second of the executor training every shard of a fresh run (best of ``repeats``: the
    development machine is shared, so the fastest repeat is the least disturbed one)."""
    table = validate_table(df, config.data, "benchmark data")
    run = create_run(workdir, resolve_config(config, table), table)
    config = run.config()
    jobs, data, _ = plan(run, config, list(range(config.sharding.shards)))
    spec = train_spec(run, config)
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = run_jobs(spec, jobs, data, config.training.executor)
        seconds = time.perf_counter() - t0
        best = seconds if best is None else min(best, seconds)
    samples = sum(r.samples for r in results)
    return {
        "samples": samples,
        "seconds": round(best, 3),
        "samples_s": round(samples / best, 1),
        "stack_threads": config.training.stack_threads,
    }


def stacked_train_speedup(
    records: int = 20000,
    shards: int = 20,
    device: str = "cpu",
    seed: int = 0,
    repeats: int = 3,
    shape: tuple[int, int, int] = (600, 128, 100),
    model: tuple[str, ...] = (),
    lanes: int | None = None,
) -> dict:
    """Train the same data with the loop and the stacked executor; report both throughputs and the ratio.
    ``shape`` is (features, hidden, classes): the default is the Purchase MLP; ``model`` more ``model.*``
    overrides (e.g. the CNN); ``lanes`` pins the stacked run's ``stack_threads`` (default: as a run resolves it)."""
    n_f, hidden, n_c = shape
    df = make_purchase(records, seed=seed, n_features=n_f, n_classes=n_c)
    out = {"records": records, "shards": shards, "device": device, "repeats": repeats, "mlp": list(shape)}
    if model:
        out["model"] = list(model)
    with tempfile.TemporaryDirectory(prefix="sisa-bench-stacked-", dir=_scratch_dir()) as tmp:
        # "stacked": as a run resolves it (lanes = stack_threads from the model and the cores); then one lane
        for name, executor, threads in (
            ("loop", "loop", None),
            ("stacked", "stacked", lanes),
            ("one_lane", "stacked", 1),
        ):
            overrides = [f"model.hidden=[{hidden}]", f"training.stack_threads={threads or 'null'}", *model]
            cfg = purchase_config(shards, executor, device).with_overrides(overrides)
            r = train_throughput(cfg, df, Path(tmp) / name, repeats)
            out[f"{name}_samples_s"], out[f"{name}_seconds"] = r["samples_s"], r["seconds"]
            if name == "stacked":
                out["lanes"] = r["stack_threads"]
    out["speedup"] = round(out["stacked_samples_s"] / out["loop_samples_s"], 3)
    out["speedup_one_lane"] = round(out["one_lane_samples_s"] / out["loop_samples_s"], 3)
    return out


def stacked_train_speedup_cpu(records: int = 20000, shards: int = 20) -> float:
    """Stacked / loop training throughput on CPU (JSON key ``stacked_train_speedup_cpu``)."""
    return stacked_train_speedup(records, shards, "cpu")["speedup"]


def stacked_train_speedup_gpu(records: int = 100000, shards: int = 20) -> float | None:
    """Stacked / loop training throughput on CUDA, or None without a GPU (``stacked_train_speedup_gpu``)."""
    if not torch.cuda.is_available():
        return None
    return stacked_train_speedup(records, shards, "cuda")["speedup"]


def batched_deletion_seconds(
    records: int = 20000, shards: int = 20, slices: int = 5, k: int = 8, repeats: int = 3
) -> dict:
    """Wall time of one request deleting ``k`` random records (retraining their shards), per executor: best of
    ``repeats``, each on a fresh copy of the trained run."""
    df = make_purchase(records, seed=2)
    ids = np.random.default_rng(0).choice(df["record_id"].to_numpy(), size=k, replace=False).tolist()
    out = {"records": records, "shards": shards, "slices": slices, "k": k, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="sisa-bench-delete-", dir=_scratch_dir()) as tmp:
        for executor in ("loop", "stacked"):
            cfg = purchase_config(shards, executor).with_overrides([f"sharding.slices={slices}"])
            run, _ = train(Path(tmp) / executor, cfg, df)
            best = None
            for rep in range(repeats):
                copy = Path(tmp) / f"{executor}-{rep}"
                shutil.copytree(run.root, copy)
                t0 = time.perf_counter()
                receipt = delete(copy, ids)
                seconds = time.perf_counter() - t0
                best = seconds if best is None else min(best, seconds)
                shutil.rmtree(copy)
            out[f"{executor}_seconds"] = round(best, 3)
            out[f"{executor}_shards_retrained"] = len(receipt["shards_retrained"])
            out[f"{executor}_optimizer_steps"] = receipt["optimizer_steps"]
    out["speedup"] = round(out["loop_seconds"] / out["stacked_seconds"], 3)
    return out


def _scratch_dir() -> str | None:
    """tmpfs when there is one: the benchmark measures training, not the disk's fsync latency."""
    return "/dev/shm" if Path("/dev/shm").is_dir() else None


def checkpoints_equal(a: RunDir, b: RunDir) -> bool:
    """Every (shard, slice) checkpoint's model and optimizer tensors bit-identical (names differ: the digest
    covers the executor)."""
    ea, eb = a.manifest()["shards"], b.manifest()["shards"]
    if [len(e["checkpoints"]) for e in ea] != [len(e["checkpoints"]) for e in eb]:
        return False
    for x, y in zip(ea, eb, strict=True):
        for na, nb in zip(x["checkpoints"], y["checkpoints"], strict=True):
            for f in ("model.safetensors", "optimizer.safetensors"):
                ta = load_file(a.shard_checkpoints(x["shard"]) / na / f)
                tb = load_file(b.shard_checkpoints(y["shard"]) / nb / f)
                if ta.keys() != tb.keys() or not all(
                    torch.equal(
                        ta[k].view(torch.int32) if ta[k].is_floating_point() else ta[k],
                        tb[k].view(torch.int32) if tb[k].is_floating_point() else tb[k],
                    )
                    for k in ta
                ):
                    return False
    return True


def stacked_equals_loop_cpu(records: int = 3000, shards: int = 5) -> bool:
    """Train Purchase-like data with both executors (3 slices, 2 epochs) and compare every checkpoint bit for bit."""
    df = make_purchase(records, seed=1)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="sisa-bench-equal-") as tmp:
        for executor in ("loop", "stacked"):
            cfg = purchase_config(shards, executor).with_overrides(["sharding.slices=3", "training.epochs=2"])
            runs[executor], _ = train(Path(tmp) / executor, cfg, df)
        return checkpoints_equal(runs["loop"], runs["stacked"])


def stacked_peak_rss_mb(records: int = 100000, shards: int = 20, executor: str = "stacked") -> float:
    """Peak resident memory (MB) of a child process that builds the data and trains it (stacked by default)."""
    cmd = [sys.executable, __file__, "--rss-child", "--records", str(records), "--shards", str(shards)]
    cmd += ["--executor", executor]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def _rss_child(records: int, shards: int, executor: str) -> None:
    df = make_purchase(records, seed=0)
    with tempfile.TemporaryDirectory(prefix="sisa-bench-rss-") as tmp:
        train(Path(tmp) / "run", purchase_config(shards, executor), df)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--rss", action="store_true", help="also measure the peak RSS of a stacked training")
    ap.add_argument("--more", action="store_true", help="also the MNIST-sized MLP 784-256-10 and the CNN")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--executor", default="stacked", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return _rss_child(args.records, args.shards, args.executor)
    out = {"cpu": stacked_train_speedup(args.records, args.shards, "cpu")}
    out["stacked_train_speedup_cpu"] = out["cpu"]["speedup"]
    out["cpu_small_mlp"] = stacked_train_speedup(args.records, args.shards, "cpu", shape=(50, 32, 10))
    if args.more:
        mnist = (784, 256, 10)
        out["cpu_mnist_mlp"] = stacked_train_speedup(args.records, args.shards, "cpu", shape=mnist)
        cnn = ("model.name=cnn", "model.input_shape=[1,28,28]")
        out["cpu_mnist_cnn"] = stacked_train_speedup(
            args.records // 4, args.shards, "cpu", shape=mnist, model=cnn
        )
    gpu = stacked_train_speedup(args.records, args.shards, "cuda") if torch.cuda.is_available() else None
    out["gpu"], out["stacked_train_speedup_gpu"] = gpu, gpu and gpu["speedup"]
    out["stacked_equals_loop_cpu"] = stacked_equals_loop_cpu()
    out["deletion_k8"] = batched_deletion_seconds(args.records, args.shards)
    if args.rss:
        out["stacked_peak_rss_mb"] = {
            "records": args.records,
            "shards": args.shards,
            "mb": stacked_peak_rss_mb(args.records, args.shards),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
