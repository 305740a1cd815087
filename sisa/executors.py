"""Executors: how a set of (shard, from-slice) jobs runs. One seam, interchangeable back ends.

- ``loop`` runs :func:`sisa.training.train_shard` per shard: in this process (``n_jobs=1``), in joblib worker
  processes (``n_jobs>1``, a reused pool so start-up is paid once), or on Dask distributed workers
  (``backend: dask``).
- ``stacked`` trains the shards of a group as one batched model (:mod:`sisa.stacking`).

Every executor writes the same per-slice checkpoints, so the run directory does not depend on the executor.
Each worker sets its own torch thread count from the config (DESIGN §2.7), so results do not depend on where a
shard ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .training import ShardData, ShardJob, ShardResult, TrainSpec, train_shard

log = logging.getLogger("sisa")

Progress = Callable[[ShardResult], None]


def run_jobs(
    spec: TrainSpec,
    jobs: list[ShardJob],
    data: dict[int, ShardData],
    executor: str,
    on_done: Progress | None = None,
) -> list[ShardResult]:
    """Train every job and return their results in job order."""
    if not jobs:
        return []
    t = spec.config.training
    if executor == "stacked":
        from .stacking import train_stacked

        results = train_stacked(spec, jobs, data)
    elif t.backend == "dask":
        results = _run_dask(spec, jobs, data)
    elif t.n_jobs > 1 and len(jobs) > 1:
        results = _run_joblib(spec, jobs, data, t.n_jobs)
    else:
        results = []
        for job in jobs:
            results.append(train_shard(spec, job, data[job.shard]))
            if on_done:
                on_done(results[-1])
        return results
    for r in results:
        if on_done:
            on_done(r)
    return results


def _run_joblib(
    spec: TrainSpec, jobs: list[ShardJob], data: dict[int, ShardData], n_jobs: int
) -> list[ShardResult]:
    from joblib import Parallel, delayed

    # Longest shards first so the pool stays busy; results come back in job order.
    order = sorted(range(len(jobs)), key=lambda i: -int(data[jobs[i].shard].slice_ends[-1]))
    out = Parallel(n_jobs=n_jobs, backend="loky", max_nbytes="1M")(
        delayed(train_shard)(spec, jobs[i], data[jobs[i].shard]) for i in order
    )
    results: list[ShardResult] = [None] * len(jobs)  # type: ignore[list-item]
    for i, r in zip(order, out, strict=True):
        results[i] = r
    return results


def _run_dask(spec: TrainSpec, jobs: list[ShardJob], data: dict[int, ShardData]) -> list[ShardResult]:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - depends on the environment
        from .exceptions import ConfigError

        raise ConfigError(
            ["training.backend: dask needs the 'distributed' package (pip install 'sisa[cluster]')"]
        ) from None
    address = spec.config.training.scheduler
    cluster = None
    if address:
        client = Client(address, timeout="30s")
    else:
        cluster = LocalCluster(
            n_workers=spec.config.training.n_jobs,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        )
        client = Client(cluster)
    try:
        futures = [client.submit(train_shard, spec, job, data[job.shard], pure=False) for job in jobs]
        return client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
