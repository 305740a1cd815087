#!/usr/bin/env python
"""The GPU check of issue 17: CUDA exactness and the GPU performance targets, in one time-boxed run.

    bash scripts/gpu_check.sh OUTDIR             # on the GPU machine: <= 8 minutes, OUTDIR/gpu.json + gpu_check.log
    python scripts/gpu_check.py --out OUTDIR --quick --device cpu --only exactness   # a CPU smoke run

Sections, in order (each failure-tolerant: a failing section records its error and the rest still run; each has a
time cap and the whole run a budget; gpu.json is rewritten after every section, so a killed run keeps what it had):
  gpu_tests       pytest tests/test_gpu.py in a subprocess
  exactness       delete-then-retrain vs training from scratch without the records, bit for bit, on the device:
                  MLP and CNN x loop and stacked x the scenarios of tests/test_exactness.py (deterministic mode)
  stacked_train   stacked vs loop executor training throughput, S=20, Purchase-like, batch 128 and 512
  inference       stacked vs looped ensemble inference, S=20 Purchase MLPs, batch 1 / 64 / 4096
  deletion        one-record deletions (S=20, R=50, 100k records, in-process) and K=8 batched deletions vs
                  retraining one monolithic model on all the data, per executor
  cpu_vs_gpu      per-shard (loop) training throughput on the device vs on the CPU, 1 thread
Runs from the source tree (PYTHONPATH=.) and imports nothing from the serving or cluster extras.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
)  # before anything starts CUDA (deterministic cuBLAS)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_setup import best_of, config, timed  # noqa: E402
from bench_stacked import purchase_config, stacked_train_speedup, train_throughput  # noqa: E402
from bench_throughput import _random_ensemble  # noqa: E402

from sisa import costs  # noqa: E402
from sisa.aggregation import Ensemble  # noqa: E402
from sisa.fitting import train  # noqa: E402
from sisa.tables.datasets import make_purchase  # noqa: E402
from sisa.unlearning import delete  # noqa: E402

# top-level keys: each is copied from the section result that holds it (null where none does)
HEADLINE = (
    "gpu_tests_passed",  # gpu_tests
    "cuda_delete_exact",  # exactness
    "stacked_train_speedup_gpu",  # stacked_train (batch 128)
    "stacked_train_speedup_gpu_b512",
    "stacked_vs_looped_gpu_b1",  # inference
    "stacked_vs_looped_gpu_b64",
    "stacked_vs_looped_gpu_b4096",
    "delete_k1_seconds_gpu",  # deletion
    "speedup_k8_vs_monolithic_gpu",
    "gpu_vs_cpu_shard_throughput",  # cpu_vs_gpu
)
TARGETS = {  # key -> (comparison, value): issue 17
    "stacked_train_speedup_gpu": (">=", 10.0),
    "stacked_vs_looped_gpu_b64": (">=", 3.0),
    "delete_k1_seconds_gpu": ("<=", 0.1),
    "speedup_k8_vs_monolithic_gpu": (">=", 4.63),
}


# ---- sections: each fills ``res`` (kept even when it raises) -----------------------------------------------------
def gpu_tests(ctx, res: dict) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "tests/test_gpu.py"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    res["command"] = " ".join(cmd[1:])
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=ctx.cap)
    out = p.stdout + p.stderr
    print(out, flush=True)
    res["returncode"] = p.returncode
    res["counts"] = {
        k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out)
    }
    res["gpu_tests_passed"] = p.returncode == 0 and res["counts"].get("passed", 0) > 0
    if p.returncode != 0:
        res["output_tail"] = out[-4000:]


MODELS = ("mlp", "cnn")
EXECUTORS = ("loop", "stacked")


def exactness(ctx, res: dict) -> None:
    if not __debug__:
        raise RuntimeError("the comparisons are assert statements: run without python -O")
    from tests.test_exactness import CASES, delete_and_compare  # test helpers: tests/ imports pytest
    from tests.test_gpu import gpu_config, table

    models, cases = (("mlp",), ["first_slice"]) if ctx.quick else (MODELS, list(CASES))
    scen = res["scenarios"] = {}
    for model in models:
        for executor in EXECUTORS:
            for case in cases:
                name = f"{model}/{executor}/{case}"
                stack = {"stack_size": None} if executor == "loop" else {}  # stacked: width 3, as test_gpu
                cfg = gpu_config(model, device=ctx.device, executor=executor, **stack)
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory(prefix="sisa-gpu-exact-", dir=ctx.work) as tmp:
                    try:
                        delete_and_compare(Path(tmp), table(), cfg, CASES[case])
                        scen[name] = {"exact": True}
                    except AssertionError as exc:  # a bit comparison (or the deletion contract) failed
                        scen[name] = {"exact": False, "why": (str(exc) or "assertion failed")[:500]}
                    except Exception as exc:  # it did not run: not evidence either way
                        scen[name] = {"exact": None, "error": f"{type(exc).__name__}: {exc}"[:500]}
                scen[name]["seconds"] = round(time.perf_counter() - t0, 2)
                print(f"  exactness {name}: {scen[name]}", flush=True)
                res["cuda_delete_exact"] = _overall([s["exact"] for s in scen.values()])


def _overall(flags: list) -> bool | None:
    if False in flags:
        return False
    return True if flags and all(flags) else None


def stacked_train(ctx, res: dict) -> None:
    records, repeats = (2000, 1) if ctx.quick else (100_000, 2)
    for bs in (128, 512):
        r = stacked_train_speedup(
            records, 20, ctx.device, repeats=repeats, model=(f"training.batch_size={bs}",)
        )
        res[f"batch_{bs}"] = r
        print(f"  stacked vs loop training, batch {bs}: {r['speedup']}x", flush=True)
    res["stacked_train_speedup_gpu"] = res["batch_128"]["speedup"]
    res["stacked_train_speedup_gpu_b512"] = res["batch_512"]["speedup"]


def inference(ctx, res: dict) -> None:
    cpu = _random_ensemble(600, 100)  # weights do not change the cost: untrained S=20 Purchase MLPs
    ens = Ensemble({s: m.to(ctx.device) for s, m in cpu.models.items()}, cpu.config, device=ctx.device)
    X_all = np.random.default_rng(0).normal(size=(4096, 600)).astype(np.float32)
    reps, per = (2, 64) if ctx.quick else (3, 2048)
    res["models"] = len(ens.shards)

    def calls(X, mode, n):
        for _ in range(n):
            ens.shard_probabilities(X, mode)
        _sync(ctx.device)

    for B in (1, 64, 4096):
        X, n = np.ascontiguousarray(X_all[:B]), max(3, per // B)
        for mode in ("loop", "stacked"):
            calls(X, mode, 2)  # warm-up: kernels, the stacked copy of the weights
        loop, stacked = (best_of(reps, lambda m=m, X=X, n=n: calls(X, m, n)) for m in ("loop", "stacked"))
        res[f"batch_{B}"] = {"calls": n, "loop_rows_s": round(n * B / loop, 1),
                             "stacked_rows_s": round(n * B / stacked, 1)}  # fmt: skip
        res[f"stacked_vs_looped_gpu_b{B}"] = round(loop / stacked, 3)
        print(f"  inference batch {B}: stacked/loop {res[f'stacked_vs_looped_gpu_b{B}']}x", flush=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def deletion(ctx, res: dict) -> None:
    n, S, R, e, k1, k8 = (3000, 4, 5, 2, 2, 1) if ctx.quick else (100_000, 20, 50, 10, 10, 3)
    res.update(records=n, shards=S, slices=R, epochs=e, work=str(ctx.work))
    res["expected_speedup_vs_sisa_retrain"] = {"k1": costs.expected_speedup(S, R, 1),
                                               "k8": costs.expected_speedup(S, R, 8)}  # fmt: skip
    df = make_purchase(n, seed=0)
    rng = np.random.default_rng(7)
    train(
        ctx.work / "warmup", config(2, 2, 1, executor="loop", device=ctx.device), df.iloc[:500]
    )  # CUDA, Adam
    (_, rep), res["monolithic_train_seconds"] = timed(
        train, ctx.work / "monolithic", config(1, 1, e, executor="loop", device=ctx.device), df
    )
    res["monolithic_samples"] = sum(r.samples for r in rep.results)
    shutil.rmtree(ctx.work / "monolithic")  # 100k x 600 floats per run directory: keep the disk free
    for executor in ("stacked", "loop"):
        r = res[executor] = {}
        (run, _), r["sisa_train_seconds"] = timed(
            train, ctx.work / f"run-{executor}", config(S, R, e, executor=executor, device=ctx.device), df
        )
        r["stack_size"] = run.config().training.stack_size
        k1_s, k1_samples = [], []
        for j in np.unique(np.linspace(0, R - 1, k1).round().astype(int)):  # spread over the slices
            active = run.index(verify=False).active
            pool = active.loc[active["slice"] == j, "record_id"].to_numpy()
            receipt, secs = timed(delete, run.root, [pool[rng.integers(len(pool))].item()])
            k1_s.append(secs)
            k1_samples.append(receipt["samples_retrained"])
        r.update(k1_seconds=[round(x, 4) for x in k1_s], k1_mean_seconds=float(np.mean(k1_s)),
                 k1_median_seconds=float(np.median(k1_s)), k1_mean_samples=float(np.mean(k1_samples)))  # fmt: skip
        k8_s = []
        for _ in range(k8):
            ids = run.index(verify=False).active["record_id"].to_numpy()
            k8_s.append(timed(delete, run.root, rng.choice(ids, 8, replace=False).tolist())[1])
        r["k8_mean_seconds"] = float(np.mean(k8_s))
        r["speedup_k8_vs_monolithic"] = res["monolithic_train_seconds"] / r["k8_mean_seconds"]
        r["speedup_k8_vs_sisa_train"] = r["sisa_train_seconds"] / r["k8_mean_seconds"]
        shutil.rmtree(run.root)
        print(f"  deletion ({executor}): {r}", flush=True)
    best1 = min(EXECUTORS, key=lambda x: res[x]["k1_mean_seconds"])
    best8 = min(EXECUTORS, key=lambda x: res[x]["k8_mean_seconds"])
    res.update(delete_k1_seconds_gpu=round(res[best1]["k1_mean_seconds"], 4), delete_k1_executor=best1,
               speedup_k8_vs_monolithic_gpu=round(res[best8]["speedup_k8_vs_monolithic"], 3),
               k8_executor=best8)  # fmt: skip


def cpu_vs_gpu(ctx, res: dict) -> None:
    records, repeats = (2000, 1) if ctx.quick else (20000, 2)
    df = make_purchase(records, seed=0)
    for name, device, executor in (("cpu_loop", "cpu", "loop"), ("device_loop", ctx.device, "loop"),
                                   ("device_stacked", ctx.device, "stacked")):  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="sisa-gpu-tput-", dir=ctx.work) as tmp:
            res[name] = train_throughput(purchase_config(20, executor, device), df, Path(tmp), repeats)
    res["gpu_vs_cpu_shard_throughput"] = round(
        res["device_loop"]["samples_s"] / res["cpu_loop"]["samples_s"], 3
    )
    res["gpu_stacked_vs_cpu_loop"] = round(
        res["device_stacked"]["samples_s"] / res["cpu_loop"]["samples_s"], 3
    )
    print(f"  shard training, device/cpu: {res['gpu_vs_cpu_shard_throughput']}x", flush=True)


# name -> (function, time cap in seconds: full, quick)
SECTIONS = {
    "gpu_tests": (gpu_tests, 120, 60),
    "exactness": (exactness, 120, 60),
    "stacked_train": (stacked_train, 60, 60),
    "inference": (inference, 40, 30),
    "deletion": (deletion, 180, 60),
    "cpu_vs_gpu": (cpu_vs_gpu, 40, 30),
}


# ---- driver ----------------------------------------------------------------------------------------------------
class SectionTimeout(BaseException):  # not an Exception: no ``except Exception`` on the way swallows it
    pass


def _alarm(signum, frame):
    raise SectionTimeout("section ran past its time cap")


class Context:
    def __init__(self, args, work: Path, cap: float):
        self.device, self.quick, self.work, self.cap = args.device, args.quick, work, cap
        work.mkdir(parents=True, exist_ok=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, e.g. on CPU)")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default 420; quick 150)")
    ap.add_argument(
        "--only", default=",".join(SECTIONS), help="comma-separated sections, in the listed order"
    )
    ap.add_argument("--work", type=Path, help="scratch folder for run directories (default: a temp folder)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)  # cpu: tests
    args = ap.parse_args(argv)
    unknown = [s for s in args.only.split(",") if s not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in args.only.split(",")]
    if args.budget is None:
        args.budget = 150.0 if args.quick else 420.0
    return args


def environment(device: str) -> dict:
    cuda = device == "cuda" and torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def summary(out: dict) -> dict:
    """The headline keys and the targets, from the sections' results (None where a section did not produce it)."""
    secs = out["sections"]
    head = {k: next((r[k] for r in secs.values() if k in r), None) for k in HEADLINE}
    targets = {}
    for key, (op, want) in TARGETS.items():
        v = head[key]
        met = None if v is None else (v >= want if op == ">=" else v <= want)
        targets[key] = {"target": f"{op} {want}", "value": v, "met": met}
    if head["cuda_delete_exact"] is not None:
        targets["cuda_delete_exact"] = {"target": "== true", "value": head["cuda_delete_exact"],
                                        "met": head["cuda_delete_exact"] is True}  # fmt: skip
    return {**head, "targets": targets}


def write_json(out: dict, path: Path) -> None:
    out = {**{k: v for k, v in out.items() if k != "sections"}, **summary(out), "sections": out["sections"]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, default=_plain) + "\n")
    os.replace(tmp, path)


def _plain(v):
    return v.item() if isinstance(v, np.generic) else str(v)


def run(args: argparse.Namespace, sections: dict | None = None) -> dict:
    sections = SECTIONS if sections is None else sections
    args.out.mkdir(parents=True, exist_ok=True)
    path, t_start = args.out / "gpu.json", time.perf_counter()
    deadline = t_start + args.budget
    work = Path(args.work or tempfile.mkdtemp(prefix="sisa-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    out = {**environment(args.device), "device_kind": args.device, "quick": args.quick, "budget_s": args.budget,
           "sections_run": args.sections, "sections": {}}  # fmt: skip
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for name in args.sections:
            fn, cap_full, cap_quick = sections[name]
            res = out["sections"][name] = {}
            cap = min(cap_quick if args.quick else cap_full, deadline - time.perf_counter())
            if cap < 1:
                res["error"] = "skipped: the run's time budget is spent"
                continue
            print(f"== {name} (cap {cap:.0f} s)", flush=True)
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, cap)
            try:
                fn(Context(args, work / name, cap), res)
            except (Exception, SectionTimeout) as exc:  # a section's failure must not stop the others
                res["error"] = f"{type(exc).__name__}: {exc}"
                res["traceback"] = traceback.format_exc()[-3000:]
                print(f"  {name} failed: {res['error']}", flush=True)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            res["seconds"] = round(time.perf_counter() - t0, 2)
            out["seconds"] = round(time.perf_counter() - t_start, 2)
            write_json(out, path)
    finally:
        signal.signal(signal.SIGALRM, old)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out["seconds"] = round(time.perf_counter() - t_start, 2)
    write_json(out, path)
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device; nothing to check", file=sys.stderr)
        return 2
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "sections"}, indent=1))
    print(f"gpu_check: {result['seconds']} s; wrote {args.out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
