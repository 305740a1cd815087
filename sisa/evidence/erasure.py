"""The erasure check: does anything of the deleted records survive in the run directory?

:func:`check_erasure` checks what the run itself can prove without the deleted IDs (which it no longer knows):
tombstoned hashes are not among the active IDs, every shard data file holds exactly the index's records, every
checkpoint on disk is named by the manifest and its fingerprint matches the chain recomputed from the stored data
(so none was trained on a deleted record), no leftover of an interrupted write. Given the IDs (and the original rows)
by the auditor, it also searches every file of the run for them.

Separate from :mod:`sisa.evidence.verification`: that module retrains and compares checkpoints bit for bit (a proof about
the served model); this one only inspects files (journal, tombstones, data, checkpoint names and fingerprints) and
searches them for the deleted IDs and feature rows, without training anything.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import Config
from ..exceptions import DataError, UsageError
from ..session import writer_session
from ..store.checkpoints import checkpoint_name, is_complete, read_meta
from ..store.files import read_parquet, temp_leftovers
from ..store.index import TOMBSTONE_COLUMNS, keyed_id_hashes
from ..store.journal import Journal, kind_of
from ..store.rundir import RunDir
from ..store.shardfile import RECORD_ID, ShardRows, fingerprints, shard_dir, slice_file
from ..tables.encoder import Encoder
from ..tables.schema import schema_of
from ..tables.table import read_table, validate_table

# Shorter IDs ("42") occur by chance in any binary file: they are matched as values (Parquet ID columns, JSON).
MIN_RAW_ID_LENGTH = 6


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # worth a look, but not a failure (ok stays True)


@dataclass
class ErasureReport:
    run: str
    checks: list[Check]
    ids_checked: int = 0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


def check_erasure(
    root: str | Path,
    ids: list | None = None,
    data: str | Path | pd.DataFrame | None = None,
    *,
    subjects: list | None = None,
    wait_s: float = 0.0,
) -> ErasureReport:
    """Check that nothing of deleted records survives in the run directory (see the module docstring).

    ``ids``: deleted record IDs supplied by the auditor; every file is searched for them. ``data``: the original
    rows (a table path or DataFrame with the ID column and features); their float32 feature rows are searched
    for too. With ``data`` but no ``ids``, the IDs are those rows whose keyed hash the run has tombstoned.
    ``subjects``: forgotten data-subject IDs (runs with ``data.subject_column``): none may have an active row, and
    every file is searched for them.
    """
    with writer_session(root, "verify --erasure", wait_s) as run:
        config, manifest = run.config(), run.require_manifest()
        index, secret = run.index(), run.secret()
        checks = [_check_journal(run, index), _check_tombstones(index, secret), _check_leftovers(run)]
        frames = {s: run.shard_rows(s) for s in range(config.sharding.shards)}
        checks += [_check_data_files(index, frames), _check_checkpoints(run, config, manifest, frames)]
        if config.data.schema is not None:
            checks.append(_check_schema_values(config, frames))
        rows = None
        if data is not None:
            table = _original_rows(config, data)
            if ids is None:
                tomb = set(index.tombstones.loc[index.tombstones["kind"] == "record", "id_hash"])
                hashes = keyed_id_hashes(list(table.ids), secret, "record")
                ids = [i for i, h in zip(table.ids.tolist(), hashes, strict=True) if h in tomb]
            rows = _feature_rows(table, ids)
        if ids is not None:
            checks += _search_ids(run, index, secret, ids)
        if subjects is not None:
            checks += _search_subjects(run, index, subjects)
        if rows is not None:
            checks.append(_search_rows(run, config, frames, rows, ids or []))
        return ErasureReport(str(run.root), checks, len(ids or []))


def _check_journal(run: RunDir, index) -> Check:
    entries = Journal(run.journal_dir).entries()
    pending = [e["request_id"] for e in entries if e["status"] == "pending"]
    # a record or subject readmitted later (an addition with allow_returning) is active again, untombstoned
    tomb = set(index.tombstones["id_hash"]) | {h for e in entries for h in e.get("readmitted", [])}
    missing = [  # a rolled-back request is erased already; only its retrain is to come (§4.2)
        e["request_id"]
        for e in entries
        if e["status"] != "pending" and kind_of(e) == "delete" and not set(e["id_hashes"]) <= tomb
    ]
    plain = [
        e["request_id"]
        for e in entries
        if not all(
            _is_hash(h) for h in e["id_hashes"] + e.get("subject_hashes", []) + e.get("readmitted", [])
        )
    ]
    problems = [
        f"{what}: {ids}"
        for what, ids in (("pending", pending), ("not tombstoned", missing), ("holding non-hash IDs", plain))
        if ids
    ]
    rolled = sum(e["status"] == "rolled_back" for e in entries)
    state = f"all applied or rolled back ({rolled} retrain(s) to come)" if rolled else "all applied"
    ok_text = f"{len(entries)} request(s), {state}, keyed hashes only, every deleted ID tombstoned"
    staged = [
        e["request_id"]
        for e in entries
        if e["status"] == "applied" and "incoming" in e and (run.root / e["incoming"]["file"]).exists()
    ]
    problems += [f"staged rows of applied additions still on disk: {staged}"] if staged else []
    return _check("journal", problems, ok_text)


def _check(name: str, problems: list[str], ok_text: str) -> Check:
    return Check(name, not problems, "; ".join(problems) if problems else ok_text)


def _is_hash(value) -> bool:
    return isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value) is not None


def _check_tombstones(index, secret: bytes) -> Check:
    tomb = index.tombstones
    clash = 0
    for kind, col in (("record", "record_id"), ("subject", "subject_id")):
        hashes = set(tomb.loc[tomb["kind"] == kind, "id_hash"])
        if hashes and (kind == "record" or index.has_subjects):
            live = index.active[col].dropna().unique().tolist()
            clash += len(hashes & set(keyed_id_hashes(live, secret, kind)))
    problems = [f"{clash} tombstoned ID(s) are still active in the index"] if clash else []
    # the suppression list holds keyed hashes and nothing else (docs/durability.md, "The suppression list")
    if list(tomb.columns) != TOMBSTONE_COLUMNS:
        problems.append(f"columns {list(tomb.columns)}, expected {TOMBSTONE_COLUMNS}")
    else:
        plain = int((~tomb["id_hash"].map(_is_hash)).sum()) if len(tomb) else 0
        odd = sorted(set(tomb["kind"]) - {"record", "subject", "content"}) if len(tomb) else []
        problems += [f"{plain} tombstone(s) hold something other than a keyed hash"] if plain else []
        problems += [f"unknown tombstone kinds {odd}"] if odd else []
    kinds = tomb["kind"].value_counts().to_dict() if len(tomb) and "kind" in tomb else {}
    counts = ", ".join(f"{kinds.get(k, 0)} {k}" for k in ("record", "subject", "content"))
    return _check(
        "tombstones",
        problems,
        f"{len(tomb)} tombstone(s) ({counts}), keyed hashes only; none matches an active record or subject",
    )


def _check_leftovers(run: RunDir) -> Check:
    left = [str(p.relative_to(run.root)) for p in temp_leftovers(run.root)]
    return _check("leftovers", [f"found {left}"] if left else [], "no leftovers of interrupted writes")


def _check_data_files(index, frames: dict[int, ShardRows]) -> Check:
    problems = []
    for s, frame in frames.items():
        want = index.active.loc[index.active["shard"] == s, ["record_id", "slice"]]
        have = pd.DataFrame({"record_id": frame.ids, "slice": frame.slices})
        a = want.astype(str).sort_values(["record_id", "slice"]).reset_index(drop=True)
        b = have.astype(str).sort_values(["record_id", "slice"]).reset_index(drop=True)
        if not a.equals(b):
            problems.append(f"{shard_dir(s)}/ holds {len(b)} rows, the index {len(a)} (or others)")
    return _check(
        "data files", problems, f"{len(frames)} shard data file(s) hold exactly the index's records"
    )


def _check_checkpoints(run: RunDir, config: Config, manifest: dict, frames: dict[int, ShardRows]) -> Check:
    problems, count = [], 0
    entries = {e["shard"]: e for e in manifest["shards"]}
    for folder in sorted(run.checkpoint_root.iterdir()) if run.checkpoint_root.is_dir() else []:
        shard = int(folder.name.split("-")[1]) if folder.name.startswith("shard-") else None
        if shard not in entries or shard not in frames:
            problems.append(f"stray folder {folder.relative_to(run.root)}")
            continue
        fps = fingerprints(config.digest(), shard, frames[shard], config.sharding.slices)
        expected = [checkpoint_name(k, fp) for k, fp in enumerate(fps)]
        if entries[shard].get("rolled_back"):  # serving checkpoint k-1: only 0..k-1 may remain (§4.2)
            expected = expected[: entries[shard]["rolled_back"]["slice"]]
        if entries[shard]["checkpoints"] != expected:
            problems.append(f"shard {shard}: manifest names checkpoints the stored data does not give")
        for ck in sorted(folder.iterdir()):
            count += 1
            if ck.name not in expected:
                problems.append(f"unreferenced checkpoint {ck.relative_to(run.root)}")
            elif not is_complete(ck):
                problems.append(f"{ck.relative_to(run.root)}: incomplete (no valid COMPLETE marker)")
            elif read_meta(ck).get("fingerprint") != fps[expected.index(ck.name)]:
                problems.append(f"{ck.relative_to(run.root)}: fingerprint differs from the recomputed chain")
    ok_text = f"{count} checkpoint(s) on disk, all named by the manifest, fingerprints match the stored data"
    return _check("checkpoints", problems, ok_text)


def _check_schema_values(config: Config, frames: dict[int, ShardRows]) -> Check:
    """Declared categories that no active record holds (a warning: the schema outlives deletions, so a value whose
    only holders were deleted is still written in the config; if it identified them, re-draft and retrain)."""
    schema = schema_of(config.data)
    columns = Encoder(schema).category_columns() if schema is not None else []
    held = {name: 0.0 for _, _, name in columns}
    where = {name: i for i, name in enumerate(config.data.features or [])}
    for rows in frames.values():
        for name in held:
            held[name] += float(rows.features[:, where[name]].sum()) if name in where else 0.0
    orphans = [f"{column}={value!r}" for column, value, name in columns if held[name] == 0]
    if not orphans:
        return Check(
            "schema values",
            True,
            f"each of the {len(columns)} declared categories is held by an active record",
        )
    detail = (
        f"warning: {len(orphans)} declared categor(ies) no active record holds: {', '.join(orphans[:20])}; the "
        "schema outlives deletions, so if such a value identified a deleted person, draft the schema again "
        "without it (sisa schema) and train a new run"
    )
    return Check("schema values", True, detail, warning=True)


def _original_rows(config: Config, data):
    source = "original rows" if isinstance(data, pd.DataFrame) else str(data)
    df = data if isinstance(data, pd.DataFrame) else read_table(data)
    if config.data.id_column not in df.columns:
        raise DataError(
            source, [f"missing the ID column {config.data.id_column!r} needed to find deleted rows"]
        )
    return validate_table(
        df,
        config.data,
        source,
        classes=config.data.classes,
        feature_names=config.data.features,
        require_labels=False,
    )


def _feature_rows(table, ids: list) -> dict:
    """{ID: float32 feature-row bytes} for the requested IDs found in the auditor's table."""
    wanted = {str(i) for i in ids}
    return {
        rid: table.features[i].tobytes() for i, rid in enumerate(table.ids.tolist()) if str(rid) in wanted
    }


def _run_files(run: RunDir) -> list[Path]:
    return sorted(p for p in run.root.rglob("*") if p.is_file())


def _search_ids(run: RunDir, index, secret: bytes, ids: list) -> list[Check]:
    """Per ID: tombstoned and not active; then every file of the run searched for it."""
    tomb = set(index.tombstones.loc[index.tombstones["kind"] == "record", "id_hash"])
    hashes = keyed_id_hashes(ids, secret, "record")
    active = set(index.active["record_id"].astype(str))
    not_deleted = [i for i, h in zip(ids, hashes, strict=True) if h not in tomb or str(i) in active]
    done = f"all {len(ids)} ID(s) tombstoned, none active"
    return _id_checks(run, "ids", ids, not_deleted, done, ("record_id", RECORD_ID))


def _search_subjects(run: RunDir, index, subjects: list) -> list[Check]:
    """Per subject: no active row left (whether it was forgotten by subject or row by row); then every file."""
    if not index.has_subjects:
        raise UsageError([("subjects", "this run has no data.subject_column")])
    active = set(index.active["subject_id"].astype(str))
    not_deleted = [s for s in subjects if str(s) in active]
    done = f"none of the {len(subjects)} subject(s) has an active row"
    return _id_checks(run, "subjects", subjects, not_deleted, done, ("subject_id",))


def _id_checks(
    run: RunDir, what: str, ids: list, not_deleted: list, done: str, id_columns: tuple[str, ...]
) -> list[Check]:
    """ "<what> deleted" and "<what> in files": every file of the run searched for the IDs, as raw bytes when long
    enough to mean something, and as values in Parquet ID columns and JSON strings."""
    texts = {str(i) for i in ids}
    raw = [t.encode() for t in texts if len(t) >= MIN_RAW_ID_LENGTH]
    hits = []
    for path in _run_files(run):
        rel = path.relative_to(run.root).as_posix()
        blob = path.read_bytes()
        if any(r in blob for r in raw):
            hits.append(f"{rel} (raw bytes)")
        elif path.suffix in TABLE_SUFFIXES and texts & _table_id_values(path, id_columns):
            hits.append(f"{rel} (ID column)")
        elif path.suffix == ".json" and texts & _json_strings(blob):
            hits.append(f"{rel} (JSON value)")
    searched = f"({len(raw)} searched as raw bytes, all as values)"
    return [
        _check(f"{what} deleted", [f"not deleted: {not_deleted[:20]}"] if not_deleted else [], done),
        _check(
            f"{what} in files",
            [f"found in {hits}"] if hits else [],
            f"no file holds any of the {len(ids)} ID(s) {searched}",
        ),
    ]


TABLE_SUFFIXES = (".parquet", ".arrow")


def _table_id_values(path: Path, columns: tuple[str, ...]) -> set[str]:
    frame = pd.read_feather(path) if path.suffix == ".arrow" else read_parquet(path)
    return {str(v) for c in columns if c in frame for v in frame[c].dropna().tolist()}


def _json_strings(blob: bytes) -> set[str]:
    """Every string value (not key) in a JSON document: IDs could only hide there."""
    try:
        stack, out = [json.loads(blob)], set()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return set()
    while stack:
        node = stack.pop()
        if isinstance(node, (dict, list)):
            stack.extend(node.values() if isinstance(node, dict) else node)
        elif isinstance(node, str):
            out.add(node)
    return out


def _search_rows(run: RunDir, config: Config, frames: dict, rows: dict, ids: list) -> Check:
    """Deleted records' float32 feature rows: not in any shard data file (unless an active record shares them)
    and not as raw bytes in any other file."""
    wanted, deleted = set(rows.values()), {str(i) for i in ids}
    hits, shared = [], 0
    for s, frame in frames.items():
        for rid, k, feat in zip(frame.ids.tolist(), frame.slices, frame.features, strict=True):
            if feat.tobytes() in wanted:
                if str(rid) in deleted:
                    hits.append(f"{slice_file(s, int(k))} (row of {rid})")
                else:
                    shared += 1
    for path in _run_files(run):
        if path.suffix not in TABLE_SUFFIXES:  # tables are searched value by value above
            blob = path.read_bytes()
            if any(r in blob for r in wanted):
                hits.append(f"{path.relative_to(run.root).as_posix()} (raw float32 bytes)")
    note = f"; {shared} active record(s) have identical features (their own data)" if shared else ""
    ok_text = f"none of {len(rows)} deleted feature row(s) found{note}"
    return _check("feature rows", [f"found in {hits}"] if hits else [], ok_text)
