"""Training a set of (shard, from-slice) jobs: the per-shard loop (``shard``), the optimizer, the models, and the
executors that run jobs in this process, in worker processes, on Dask, or stacked (``stacking``, ``lockstep``,
``stacked_models``). Reads shard data and writes checkpoints through :mod:`sisa.store`; knows nothing of runs,
journals or deletions."""
