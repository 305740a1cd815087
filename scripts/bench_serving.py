"""Throughput and latency of ``POST /predict`` over HTTP against the same model called in-process.

Starts ``sisa serve`` in a subprocess on 127.0.0.1 (a free port) over a run directory (``--run``, or a run trained
here on synthetic data), then, for each batch size, times ``SisaClassifier.predict_proba`` in this process and the
same rows through HTTP with ``--clients`` concurrent clients (httpx, keep-alive, body encoded once). Prints a table
and the HTTP/in-process ratios; ``--json FILE`` writes the numbers. The clients share the machine with the server,
so on a small machine the HTTP numbers include the client's own CPU cost.

Usage (from the repo root, no install needed):
    python scripts/bench_serving.py [--run runs/adult] [--batches 1 64 512] [--clients 1 4] [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sisa.config import Config  # noqa: E402
from sisa.estimator import SisaClassifier  # noqa: E402
from sisa.fitting import train  # noqa: E402
from sisa.serving.app import create_app  # noqa: E402
from sisa.serving.schema import ServerSettings  # noqa: E402
from sisa.tables.datasets import make_tabular  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, help="existing run directory (default: train a synthetic one)")
    ap.add_argument("--rows", type=int, default=6000, help="synthetic run: training rows")
    ap.add_argument("--features", type=int, default=20, help="synthetic run: features")
    ap.add_argument("--shards", type=int, default=8, help="synthetic run: shards")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 512], help="rows per request")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent HTTP clients")
    ap.add_argument("--requests", type=int, default=300, help="requests per measurement")
    ap.add_argument("--warmup", type=int, default=20, help="untimed requests before each measurement")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    bad = [
        f"--{k} must be positive" for k in ("rows", "features", "shards", "requests") if getattr(args, k) < 1
    ]
    bad += [f"--{k} values must be positive" for k in ("batches", "clients") if min(getattr(args, k)) < 1]
    if bad:
        ap.error("; ".join(bad))
    return args


def synthetic_run(root: Path, args: argparse.Namespace) -> Path:
    df = make_tabular(args.rows, seed=0, n_features=args.features, n_classes=4, string_labels=True)
    cfg = Config.from_dict(
        {
            "sharding": {"shards": args.shards, "slices": 2},
            "model": {"hidden": [64]},
            "training": {"epochs": 2, "batch_size": 64, "seed": 0, "progress": False},
        }
    )
    train(root, cfg, df)
    return root


def start_server(run: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "sisa.cli.main",
        "serve",
        "--run",
        str(run),
        "--port",
        "0",
        "--max-batch",
        "100000",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline().strip()
    match = re.search(r" on (http://\S+)$", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r} {proc.stderr.read()}")
    return proc, match.group(1)


def summary(kind: str, batch: int, clients: int, latencies: list[float], wall: float) -> dict:
    lat = np.array(latencies) * 1000
    return {
        "mode": kind,
        "batch": batch,
        "clients": clients,
        "requests": len(latencies),
        "req_per_s": round(len(latencies) / wall, 1),
        "rows_per_s": round(len(latencies) * batch / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
    }


def in_process(clf: SisaClassifier, X: np.ndarray, n: int, warmup: int) -> tuple[list[float], float]:
    for _ in range(warmup):
        clf.predict_proba(X)
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        clf.predict_proba(X)
        lat.append(time.perf_counter() - t)
    return lat, time.perf_counter() - t0


def over_http(url: str, body: bytes, n: int, clients: int, warmup: int) -> tuple[list[float], float]:
    import httpx

    headers = {"content-type": "application/json"}
    lat: list[float] = []
    errors: list[str] = []
    per_client = [n // clients + (i < n % clients) for i in range(clients)]
    start = threading.Barrier(clients + 1)

    def work(count: int) -> None:
        with httpx.Client(base_url=url, timeout=120, headers=headers) as http:
            for _ in range(warmup // clients + 1):
                http.post("/predict", content=body)
            start.wait()
            for _ in range(count):
                t = time.perf_counter()
                r = http.post("/predict", content=body)
                lat.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=work, args=(c,)) for c in per_client]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} failed requests, first: {errors[0]}")
    return lat, wall


def through_asgi(app, body: bytes, n: int, warmup: int) -> tuple[list[float], float]:
    """The same app called in this process through its ASGI interface: the framework's cost without sockets."""
    import asyncio

    import httpx

    async def go() -> tuple[list[float], float]:
        transport = httpx.ASGITransport(app=app)
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(transport=transport, base_url="http://asgi", headers=headers) as http:
            for _ in range(warmup):
                await http.post("/predict", content=body)
            lat = []
            t0 = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                r = await http.post("/predict", content=body)
                lat.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise SystemExit(f"ASGI request failed: {r.status_code} {r.text[:200]}")
            return lat, time.perf_counter() - t0

    return asyncio.run(go())


def check_equal(url: str, clf: SisaClassifier, X: np.ndarray) -> None:
    """The numbers only mean something if both paths compute the same answer: compare bit for bit."""
    import httpx

    r = httpx.post(f"{url}/predict", json={"instances": X.tolist()}, timeout=120)
    r.raise_for_status()
    got = np.array([[p[str(c)] for c in clf.classes_] for p in r.json()["probabilities"]], dtype=np.float32)
    if not np.array_equal(got, clf.predict_proba(X)):
        raise SystemExit("HTTP and in-process probabilities differ")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or synthetic_run(Path(tmp) / "run", args)
        clf = SisaClassifier.load(run)
        threads = clf.config.training.threads
        torch.set_num_threads(threads)  # what `sisa serve` uses too (and what every retrain sets)
        app = create_app(run, ServerSettings(max_batch=100_000, max_body_bytes=1 << 30))
        proc, url = start_server(run)
        try:
            rng = np.random.default_rng(0)
            results = []
            for batch in args.batches:
                X = rng.normal(size=(batch, len(clf.feature_names_))).astype(np.float32)
                check_equal(url, clf, X)
                lat, wall = in_process(clf, X, args.requests, args.warmup)
                base = summary("in-process", batch, 1, lat, wall)
                results.append(base)
                body = json.dumps({"instances": X.tolist()}).encode()
                lat, wall = through_asgi(app, body, args.requests, args.warmup)
                results.append(_vs(summary("asgi-in-process", batch, 1, lat, wall), base))
                for clients in args.clients:
                    lat, wall = over_http(url, body, args.requests, clients, args.warmup)
                    results.append(_vs(summary("http", batch, clients, lat, wall), base))
        finally:
            proc.terminate()
            proc.wait(30)
        shards = len(clf.ensemble().shards)
        print_table(results, run, shards, threads)
        if args.json:
            meta = {
                "run": str(run),
                "shards": shards,
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
            }
            args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
            print(f"wrote {args.json}")
    return 0


def _vs(row: dict, base: dict) -> dict:
    row["throughput_ratio"] = round(row["rows_per_s"] / base["rows_per_s"], 3)
    row["p50_ratio"] = round(row["p50_ms"] / base["p50_ms"], 2)
    return row


def print_table(results: list[dict], run: Path, shards: int, threads: int) -> None:
    print(
        f"/predict over HTTP vs in-process SisaClassifier.predict_proba; run {run} ({shards} shards); "
        f"torch threads {threads} (both sides); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    cols = ["mode", "batch", "clients", "requests", "req_per_s", "rows_per_s", "p50_ms", "p99_ms"]
    cols += ["throughput_ratio", "p50_ratio"]
    print("  ".join(f"{c:>16}" for c in cols))
    for r in results:
        print("  ".join(f"{r.get(c, '-')!s:>16}" for c in cols))
    print("ratios are against in-process predict_proba at the same batch (throughput: rows/s; latency: p50)")
    print("asgi-in-process = the FastAPI app called in this process without sockets (framework + JSON cost)")


if __name__ == "__main__":
    sys.exit(main())
