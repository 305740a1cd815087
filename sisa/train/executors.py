"""Executors: how a set of (shard, from-slice) jobs runs. One seam, interchangeable back ends.

Two questions, answered independently. *How* one process trains a unit of jobs (``training.executor``): ``loop``
runs :func:`sisa.train.shard.train_shard` shard after shard; ``stacked`` trains them as one batched model
(:mod:`sisa.train.stacking`). *Where* the units run: in this process (``n_jobs=1``), in joblib worker processes
(``n_jobs>1``: loky, a reused pool, so the 3-4 s of torch start-up is paid once per process, not per deletion),
or on Dask distributed workers (``backend: dask``: an existing cluster at ``scheduler``, or a local one started on
first use and kept for the life of the process). :func:`work_units` splits the jobs so that where a unit runs never
changes its bits.

Every executor writes the same per-slice checkpoints, so the run directory does not depend on the executor.
Each worker sets its own torch thread count from the config (docs/design.md §2.7), so results do not depend on where a
shard ran. Training rows travel to workers by pickling, never through temporary files, so no copy of a record
lands on disk outside the run directory (real erasure).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
from collections.abc import Callable

from ..exceptions import ClusterError, ConfigError
from ..store.checkpoints import is_complete, shard_folder
from .shard import ShardData, ShardJob, ShardResult, TrainSpec, train_shard
from .stacking import train_stacked
from .units import work_units

log = logging.getLogger("sisa")

Progress = Callable[[ShardResult], None]

# The module a Dask worker must import to run a job; checked before any job is sent (docs/design.md §7: otherwise the
# scheduler only logs a deserialization error and the caller waits forever).
WORKER_MODULE = "sisa.train.shard"
CONNECT_TIMEOUT = "30s"  # how long to keep trying to reach an existing scheduler


def run_jobs(
    spec: TrainSpec,
    jobs: list[ShardJob],
    data: dict[int, ShardData],
    executor: str,
    on_done: Progress | None = None,
) -> list[ShardResult]:
    """Train every job and return their results in job order; ``on_done`` is called as each one finishes.

    ``executor`` (loop | stacked) says how one process trains a unit of jobs; ``training.n_jobs`` and
    ``training.backend`` say where the units run. Both combine: stacked units run on joblib or Dask workers too.
    """
    if not jobs:
        return []
    t = spec.config.training
    if t.backend == "dask":
        client = dask_client(t.scheduler, t.n_jobs)
        units = work_units(spec, jobs, data, executor, len(client.scheduler_info()["workers"]))
        done = _run_dask(client, spec, units, data, executor, on_done)
    elif t.n_jobs > 1 and len(jobs) > 1:
        units = work_units(spec, jobs, data, executor, t.n_jobs)
        done = _run_joblib(spec, units, data, executor, t.n_jobs, on_done)
    else:
        done = []
        for unit in work_units(spec, jobs, data, executor, 1):
            done += _report(train_unit(spec, unit, data, executor), on_done)
    by_shard = {r.shard: r for r in done}
    return [by_shard[j.shard] for j in jobs]


def train_unit(
    spec: TrainSpec, jobs: list[ShardJob], data: dict[int, ShardData], executor: str
) -> list[ShardResult]:
    """Train one unit of jobs in this process: as one stacked model, or shard after shard."""
    if executor == "stacked":
        return train_stacked(spec, jobs, data)
    return [train_shard(spec, job, data[job.shard]) for job in jobs]


def _report(results: list[ShardResult], on_done: Progress | None) -> list[ShardResult]:
    for r in results:
        if on_done:
            on_done(r)
    return results


def _unit_data(unit: list[ShardJob], data: dict[int, ShardData]) -> dict[int, ShardData]:
    return {job.shard: data[job.shard] for job in unit}


# ---- joblib (local processes) ---------------------------------------------------------------------------------
def _run_joblib(
    spec: TrainSpec,
    units: list[list[ShardJob]],
    data: dict[int, ShardData],
    executor: str,
    n_jobs: int,
    on_done: Progress | None,
) -> list[ShardResult]:
    from joblib import Parallel, delayed

    # loky keeps its worker processes between calls (a reusable executor), so a deletion in a long-lived
    # process finds warm workers. max_nbytes=None: arrays are pickled to the workers instead of memory-mapped
    # through a temporary folder.
    parallel = Parallel(n_jobs=n_jobs, backend="loky", max_nbytes=None, return_as="generator")
    tasks = (delayed(train_unit)(spec, unit, _unit_data(unit, data), executor) for unit in units)
    done: list[ShardResult] = []
    for results in parallel(tasks):
        done += _report(results, on_done)
    return done


def warm_workers(config) -> int:
    """Start the joblib workers a retrain under ``config`` would use (``n_jobs > 1``, local backend) and import
    the training code in each, so a long-lived process (the server) pays the pool's start before its first
    deletion, not inside it. Returns the workers started (0: the retrain runs in this process or on Dask)."""
    t = config.training
    if t.backend == "dask" or t.n_jobs <= 1:
        return 0
    from joblib import Parallel, delayed

    Parallel(n_jobs=t.n_jobs, backend="loky", max_nbytes=None)(delayed(_ready)() for _ in range(t.n_jobs))
    return t.n_jobs


def _ready() -> int:
    """Run in a worker: unpickling this function imports this module, so torch and the training code."""
    return os.getpid()


# ---- Dask distributed ------------------------------------------------------------------------------------------
_CLIENTS: dict[str, object] = {}
_TRAIN_LOCK = threading.Lock()


def _train_in_worker(
    spec: TrainSpec, jobs: list[ShardJob], data: dict[int, ShardData], executor: str
) -> list[ShardResult]:
    """Run one unit on a Dask worker, one unit at a time per process.

    A worker with several threads would otherwise train two units at once, and torch's thread count and the
    generator that seeds dropout are process-wide: the shards would perturb each other's results.
    """
    with _TRAIN_LOCK:
        return train_unit(spec, jobs, data, executor)


def _run_dask(
    client,
    spec: TrainSpec,
    units: list[list[ShardJob]],
    data: dict[int, ShardData],
    executor: str,
    on_done: Progress | None,
) -> list[ShardResult]:
    from distributed import as_completed

    # Workers may run elsewhere with another working directory: give them an absolute checkpoint folder.
    spec = dataclasses.replace(spec, checkpoint_root=os.path.abspath(spec.checkpoint_root))
    scattered = client.scatter([_unit_data(unit, data) for unit in units], hash=False)
    futures = [
        client.submit(_train_in_worker, spec, unit, d, executor, pure=False)
        for unit, d in zip(units, scattered, strict=True)
    ]
    done: list[ShardResult] = []
    try:
        with client.as_current():  # as_completed looks the client up; ours is not the process default
            for future in as_completed(futures):
                results = future.result()
                for r in results:
                    _require_visible(spec, r)
                done += _report(results, on_done)
    finally:
        client.cancel(futures + list(scattered))
    return done


def _require_visible(spec: TrainSpec, result: ShardResult) -> None:
    """The checkpoints a worker wrote must be readable here: the run folder has to be on a shared filesystem."""
    folder = shard_folder(spec.checkpoint_root, result.shard)
    missing = [name for name in result.checkpoints if not is_complete(folder / name)]
    if missing:
        raise ClusterError(
            f"a Dask worker wrote {len(missing)} checkpoint(s) of shard {result.shard} under {folder} that this "
            "process cannot see; put the run directory on a filesystem every worker mounts at the same path"
        )


def dask_client(address: str | None, n_workers: int = 1):
    """A connected client for ``address`` (``tcp://HOST:PORT``), or for a local cluster when it is None.

    Clients are kept for the life of the process, so repeated deletions reuse warm workers; the first use
    checks that every worker can import sisa (see :data:`WORKER_MODULE`).
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(
            ["training.backend: dask needs the 'distributed' package (pip install 'sisa[cluster]')"]
        ) from None
    key = address or f"local:{n_workers}"
    client = _CLIENTS.get(key)
    if client is not None and client.status == "running":
        return client
    if address:
        import dask

        try:
            with dask.config.set({"distributed.comm.timeouts.connect": CONNECT_TIMEOUT}):
                client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except OSError as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {address} ({exc})") from None
    else:
        cluster = LocalCluster(  # loopback only; the dashboard on a free port (8787 may be taken)
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            host="127.0.0.1",
        )
        client = Client(cluster, set_as_default=False)
    try:
        check_workers(client)
    except ClusterError:
        _close(client)
        raise
    _CLIENTS[key] = client
    return client


def check_workers(client) -> dict[str, str]:
    """Fail fast, with a reason, when workers cannot import sisa; warn when their torch differs from ours.

    Returns each worker's torch version.
    """
    import torch

    try:
        client.run(exec, f"import {WORKER_MODULE}")
    except Exception as exc:  # whatever the worker raised is the reason
        raise ClusterError(
            f"Dask workers cannot import {WORKER_MODULE} ({type(exc).__name__}: {exc}); install this project "
            "on every worker (pip install sisa, or put the source tree on their PYTHONPATH)"
        ) from None
    versions = client.run(eval, "__import__('torch').__version__")
    other = {w: v for w, v in versions.items() if v != torch.__version__}
    if other:
        log.warning(
            "Dask workers run torch %s, this process %s: their checkpoints are exact among themselves but "
            "not bit-identical to local training",
            sorted(set(other.values())),
            torch.__version__,
        )
    return versions


def _close(client) -> None:
    cluster = getattr(client, "cluster", None)
    try:
        client.close()
        if cluster is not None:
            cluster.close()
    except Exception:  # best effort at shutdown
        log.debug("closing a Dask client failed", exc_info=True)


def shutdown_dask() -> None:
    """Close every Dask client (and local cluster) this process opened."""
    while _CLIENTS:
        _close(_CLIENTS.popitem()[1])


atexit.register(shutdown_dask)
