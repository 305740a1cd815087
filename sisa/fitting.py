"""Building a run from a table: resolve the config once, place every record, lay out the run, train it.

Training is :func:`sisa.refresh.refresh` on a run whose checkpoints do not exist yet; ``train --resume`` is the
same refresh on a run whose training was interrupted (docs/design.md, "Refresh").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from .config import Config
from .evaluation import load_test_table
from .exceptions import ConfigError, RunStateError
from .refresh import RefreshReport, refresh
from .session import writer_session
from .sharding import place
from .store.files import writer_lock
from .store.index import RecordIndex
from .store.rundir import RunDir
from .store.shardfile import build_rows, slice_file, to_bytes, training_order
from .tables.schema import schema_of
from .tables.table import Table, read_table, validate_table
from .train.choice import choose_training
from .train.shard import resolve_device


def load_training_table(config: Config) -> Table:
    if not config.data.train:
        raise ConfigError(["data.train: no training table given; set data.train in the config or pass data"])
    df = read_table(config.data.train)
    table = validate_table(df, config.data, config.data.train, classes=config.data.classes)
    del df
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps the freed read buffers otherwise
    return table


def freeze_data(config: Config, table: Table) -> Config:
    """The config with its data frozen: class list, (encoded) feature names, and the schema inline and normalised
    (a schema file is read once, here: the run is self-contained and its digest covers the schema)."""
    resolved = Config.from_dict(config.to_dict())
    schema = schema_of(config.data)
    resolved.data.schema = None if schema is None else schema.to_dict()
    resolved.data.classes = list(table.classes)
    resolved.data.features = list(table.feature_names)
    return resolved


def resolve_config(config: Config, table: Table) -> Config:
    """Freeze what training decides, once per run: class list, feature names, schema, device, executor and
    stacking."""
    resolved = freeze_data(config, table)
    resolved.training.device = resolve_device(config.training.device)
    choice = choose_training(resolved)
    resolved.training.executor = choice.executor
    resolved.training.stack_threads = choice.stack_threads
    resolved.training.stack_size = choice.stack_size
    resolved.validate()
    return resolved


def placement_of(config: Config, table: Table) -> pd.DataFrame:
    """Shard, slice and order key of each row by the training rule: keyed on the subject ID when the run has
    subjects, else on the record ID (training and additions both place rows here)."""
    keys = table.subjects if table.subjects is not None else table.ids
    return place(
        keys,
        table.ids,
        shards=config.sharding.shards,
        slices=config.sharding.slices,
        seed=config.training.seed,
        strategy=config.sharding.strategy,
        labels=table.labels,
        deletion_prob=table.deletion_prob,
    )


def create_run(
    root: str | Path, config: Config, table: Table, placement: pd.DataFrame | None = None
) -> RunDir:
    """Lay out a new run from a resolved config (:func:`resolve_config`): frozen config, secret, index and
    per-shard data files (no training yet).

    ``placement`` (shard/slice/order per row) reuses a persisted placement, e.g. to retrain a ``stratified`` run
    from scratch with the same index minus some records.
    """
    run = RunDir(root)
    run.create(config)
    if placement is None:
        placement = placement_of(config, table)
    S, R = config.sharding.shards, config.sharding.slices
    run.write_files(RecordIndex.build(table.ids, placement, table.subjects).to_bytes(range(S)))
    shard_of = placement["shard"].to_numpy()
    slices, orders = placement["slice"].to_numpy(), placement["order"].to_numpy()
    for s in range(S):  # shard by shard: one shard's copy of the rows at a time, never the whole table's
        at = np.flatnonzero(shard_of == s)
        rows = build_rows(table.ids.iloc[at], table.labels[at], table.features[at], slices[at], orders[at])
        shard = training_order(rows)
        run.write_files({slice_file(s, k): to_bytes(shard.slice(k)) for k in range(R)})
        del rows, shard
    return run


def train(
    root: str | Path,
    config: Config,
    data: pd.DataFrame | Table | None = None,
    *,
    resume: bool = False,
    placement: pd.DataFrame | None = None,
    wait_s: float = 0.0,
    runtime: list[str] | tuple[str, ...] = (),
) -> tuple[RunDir, RefreshReport]:
    """Train a SISA ensemble into ``root`` (or finish an interrupted training with ``resume``, where ``runtime``
    may override the run's runtime keys: :meth:`Config.with_runtime`)."""
    if runtime and not resume:
        raise ConfigError(
            ["train: runtime overrides are for resuming a run; a new run takes them in its config"]
        )
    if resume:
        if not RunDir(root).exists():
            raise RunStateError(
                f"{root} holds no run to resume (no config.yaml); start one with `sisa train CONFIG`"
            )
        # an acknowledged deletion first (the session replays it), then whatever training left undone
        with writer_session(root, "train --resume", wait_s, runtime, trained=False) as run:
            return run, refresh(run)
    schema_of(config.data)  # a bad schema fails first, every problem at once, before any table is read
    if isinstance(data, pd.DataFrame):
        table = validate_table(data, config.data, "training data", classes=config.data.classes)
    else:
        table = data if data is not None else load_training_table(config)
    resolved = resolve_config(config, table)
    load_test_table(resolved)  # a bad test table fails now, before anything is written
    Path(root).mkdir(parents=True, exist_ok=True)
    with writer_lock(Path(root), wait_s, "train"):
        run = create_run(root, resolved, table, placement)
        del table, data  # training reads the run's files: the caller's frame is all that may stay in memory
        pa.default_memory_pool().release_unused()  # and the Arrow buffers the slice files were built in
        return run, refresh(run)
