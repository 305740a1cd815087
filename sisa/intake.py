"""Adding records to a trained run: the front door (docs/design.md §4.1, "Additions").

:func:`add` validates the new rows against the run's frozen config exactly as training did (every problem at once,
nothing changed), refuses rows a deletion forgot (their record ID, subject ID or content is tombstoned by keyed
hash) unless ``allow_returning``, places each row by the training rule (:func:`sisa.fitting.placement_of` with the run's
seed: a new row of a known subject joins that subject's shard and slice), stages the placed rows in the run
directory (``incoming/<request id>.arrow``, fsynced), journals the request (keyed hashes only; from then on it is
acknowledged) and hands it to :func:`sisa.addition.apply_addition`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .addition import apply_addition
from .config import Config
from .exceptions import DataError, ReturningRecordError, UsageError
from .fitting import placement_of
from .session import writer_session
from .sharding import VOLATILE_THRESHOLD
from .store.files import atomic_write_bytes, fsync_dir, sha256_bytes
from .store.index import RecordIndex, coerce_ids, keyed_id_hashes
from .store.journal import Journal, new_request_id
from .store.rundir import RunDir
from .store.shardfile import build_rows, content_hashes, incoming_bytes, incoming_file
from .tables.table import Table, read_table, validate_table

NEW_CLASS_WHY = (
    "the class list is frozen at training (every shard model has one output per class, and a class that only "
    "some shards saw would bias the vote), so a new class needs a new run: `sisa train`"
)


def add(
    root: str | Path,
    data: pd.DataFrame | str | Path,
    *,
    allow_returning: bool = False,
    wait_s: float = 0.0,
    on_ack: Callable[[dict], None] | None = None,
    request_id: str | None = None,
    runtime: list[str] | tuple[str, ...] = (),
) -> dict:
    """Add new rows (a table in the run's training schema, or a CSV/Parquet path) and return the receipt.

    Raises :class:`DataError` (nothing changed) listing every problem: columns, features or labels that do not
    match the frozen config, IDs already active, duplicates in the batch. Raises :class:`ReturningRecordError`
    (nothing changed) when rows carry a deleted record ID, subject ID or content; ``allow_returning=True`` admits
    them (a person who came back and consented again) and the receipt and the journal record that it was used.
    ``on_ack`` is called right after the request is journaled."""
    source = str(data) if isinstance(data, (str, Path)) else "added rows"
    frame = read_table(data) if isinstance(data, (str, Path)) else data
    with writer_session(root, "add", wait_s, runtime) as run:
        config, secret, index = run.config(), run.secret(), run.index()
        _require_placeable(config)
        table = _validated(frame, config, index, source)
        placement = _placement(config, index, table)
        rows = build_rows(table.ids, table.labels, table.features, placement["slice"], placement["order"])
        returning, readmitted = _returning(index, secret, table, rows)
        if returning and not allow_returning:
            raise ReturningRecordError(returning)
        shard_of = placement["shard"].to_numpy(np.int32)
        affected = placement.groupby("shard")["slice"].min().astype(int).to_dict()
        slices = {
            str(s): sorted({int(k) for k in g})
            for s, g in placement.groupby("shard")["slice"].unique().items()
        }
        manifest = run.require_manifest()
        before = {e["shard"]: e["fingerprint"] for e in manifest["shards"] if e["shard"] in affected}
        rid = request_id or new_request_id("add")
        staged = incoming_bytes(rows, shard_of, table.subjects)
        rel = incoming_file(rid)
        _stage(run, rel, staged)
        entry = Journal(run.journal_dir).begin(
            rid,
            keyed_id_hashes(list(table.ids), secret, "record"),
            keyed_id_hashes(list(pd.unique(table.subjects)), secret, "subject")
            if table.subjects is not None
            else [],
            affected,
            len(table),
            before,
            extra={
                "slices": slices,
                "incoming": {"file": rel, "sha256": sha256_bytes(staged)},
                "allow_returning": bool(allow_returning),
                "returning_rows": len(returning),
                "readmitted": sorted(readmitted) if allow_returning else [],
            },
            kind="add",
        )
        if on_ack:
            on_ack(entry)
        return apply_addition(run, entry)


def _require_placeable(config: Config) -> None:
    if config.sharding.strategy == "stratified":
        raise UsageError(
            [
                (
                    "sharding.strategy",
                    "this run is 'stratified': a record's shard depends on every other record's class and hash, "
                    "so a new row cannot be placed the way training from scratch would place it; additions need "
                    "'uniform' or 'distribution_aware' (train a new run to change it)",
                )
            ]
        )


def _validated(frame: pd.DataFrame, config: Config, index: RecordIndex, source: str) -> Table:
    """The rows encoded exactly as training encoded them, or one DataError with every problem."""
    cfg = config.data
    problems: list[str] = []
    table = None
    try:
        table = validate_table(frame, cfg, source, classes=cfg.classes, feature_names=cfg.features)
    except DataError as exc:
        problems += [p + f" ({NEW_CLASS_WHY})" if "frozen class set" in p else p for p in exc.problems]
    if cfg.schema is None and cfg.features is not None:
        reserved = {cfg.id_column, cfg.label_column, cfg.subject_column, cfg.deletion_prob_column}
        extra = [c for c in frame.columns if c not in reserved and c not in set(cfg.features)]
        if extra:
            problems.append(f"columns {extra} are not among the run's features {list(cfg.features)[:20]}")
    if cfg.id_column in frame.columns:
        ids = frame[cfg.id_column].dropna()
        like = index.active["record_id"]
        coerced = coerce_ids(list(ids), like)
        if pd.api.types.is_integer_dtype(like):
            odd = [v for v in coerced if not isinstance(v, int)]
            if odd:
                problems.append(f"column {cfg.id_column!r}: the run's record IDs are integers; got {odd[:5]}")
            coerced = [v for v in coerced if isinstance(v, int)]
        active = sorted(set(coerced) & set(like), key=str)
        if active:
            shown = ", ".join(repr(v) for v in active[:20]) + (
                f" (and {len(active) - 20} more)" if len(active) > 20 else ""
            )
            problems.append(f"column {cfg.id_column!r}: record IDs already active in the run: {shown}")
    if problems:
        raise DataError(source, problems)
    assert table is not None
    table.ids = _as_type(table.ids, index.active["record_id"])
    if table.subjects is not None and len(index.active):
        table.subjects = _as_type(table.subjects, index.active["subject_id"])
    return table


def _as_type(values: pd.Series, like: pd.Series) -> pd.Series:
    """Values in the run's ID type (int64 or string), as the slice and index files store them."""
    if pd.api.types.is_integer_dtype(like):
        return pd.Series(coerce_ids(list(values), like), dtype="int64")
    return pd.Series(
        [str(v) for v in values], dtype=like.dtype if pd.api.types.is_string_dtype(like) else "string"
    )


def _placement(config: Config, index: RecordIndex, table: Table) -> pd.DataFrame:
    """Shard, slice and order of each new row by the training rule (a pure function of its key and the seed)."""
    placement = placement_of(config, table)
    if config.sharding.strategy == "distribution_aware" and table.subjects is not None:
        _keep_subject_slices(config, index, table, placement)
    return placement


def _keep_subject_slices(config: Config, index: RecordIndex, table: Table, placement: pd.DataFrame) -> None:
    """Under distribution_aware a subject's slice follows its most volatile row: a known subject whose rows sit in
    their uniform slice would move to the last slice if a volatile row joined (moving rows already trained on is
    not an addition), so that is refused; otherwise the new rows join the subject's slice."""
    known = index.active.drop_duplicates("subject_id").set_index("subject_id")["slice"]
    last = config.sharding.slices - 1
    bad = []
    for i, s in enumerate(table.subjects):
        if s in known.index:
            k = int(known.loc[s])
            if k != last and table.deletion_prob[i] > VOLATILE_THRESHOLD:
                bad.append(i)
            placement.loc[i, "slice"] = k
    if bad:
        raise DataError(
            "added rows",
            [
                f"rows {bad[:20]}: a volatile row (deletion probability > {VOLATILE_THRESHOLD}) of a known subject "
                "would move that subject's trained rows to the last slice; delete the subject and add all its rows "
                "again instead"
            ],
        )


def _returning(
    index: RecordIndex, secret: bytes, table: Table, rows
) -> tuple[dict[int, list[str]], set[str]]:
    """Rows (by position in the batch) whose record ID, subject ID or content a deletion tombstoned, with what
    matched; and the matching record/subject tombstone hashes (dropped if the rows are readmitted)."""
    out: dict[int, list[str]] = {}
    readmit: set[str] = set()
    checks = [("record ID", "record", keyed_id_hashes(list(table.ids), secret, "record"))]
    if table.subjects is not None:
        checks.append(("subject ID", "subject", keyed_id_hashes(list(table.subjects), secret, "subject")))
    checks.append(("content", "content", content_hashes(rows, secret)))
    for what, kind, hashes in checks:
        hit = index.tombstoned(hashes, kind)
        for i in np.flatnonzero(hit):
            out.setdefault(int(i), []).append(what)
            if kind != "content":
                readmit.add(hashes[i])
    return dict(sorted(out.items())), readmit


def _stage(run: RunDir, rel: str, data: bytes) -> None:
    """The placed rows into the run directory, durably, before the journal entry that names them."""
    path = run.root / rel
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True)
        fsync_dir(run.root)
    atomic_write_bytes(path, data)
