"""Proofs an auditor can run on a run directory: bit-exact retrain certificates and the erasure check.

:func:`verify` retrains shards from scratch, from the current index and stored data, into a scratch folder and
compares every slice checkpoint with the live one bit for bit. On CPU (and on a GPU in deterministic mode, with the
same device, torch build and stacking) equal bits certify that the served model is exactly "trained without the
deleted records" — not merely similar to it.

:func:`check_erasure` checks what the run itself can prove without the deleted IDs (which it no longer knows):
tombstoned hashes are not among the active IDs, every shard data file holds exactly the index's records, every
checkpoint on disk is named by the manifest and its fingerprint matches the chain recomputed from the stored data
(so none was trained on a deleted record), no leftover of an interrupted write. Given the IDs (and the original rows)
by the auditor, it also searches every file of the run for them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .checkpoints import checkpoint_name, fingerprint_chain, is_complete, load_checkpoint, read_meta
from .config import Config
from .exceptions import ConfigError, DataError, IncompatibleCheckpointError
from .executors import run_jobs
from .fitting import train_spec
from .index import keyed_id_hashes
from .journal import Journal
from .rundir import RunDir, shard_data
from .storage import read_parquet, temp_leftovers, writer_lock
from .tables import read_table, validate_table
from .training import ShardJob, device_name
from .unlearning import recover

# Shorter IDs ("42") occur by chance in any binary file: they are matched as values (Parquet ID columns, JSON).
MIN_RAW_ID_LENGTH = 6


# ---- verify: retrain and compare -------------------------------------------------------------------------------
@dataclass
class Certificate:
    """One shard's verdict: was the live model trained on exactly the stored records, bit for bit?"""

    shard: int
    records: int
    fingerprint: str  # the live manifest's (last slice)
    recomputed_fingerprint: str  # from the stored data now
    checkpoints_compared: int
    bit_identical: bool
    max_abs_diff: float  # 0.0 when identical
    differing: list[str] = field(default_factory=list)  # "slice-001-…/model.safetensors:net.0.weight"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.bit_identical and self.fingerprint == self.recomputed_fingerprint

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


def verify(
    root: str | Path, shards: list[int] | None = None, *, wait_s: float = 0.0, workdir: str | None = None
) -> list[Certificate]:
    """Retrain ``shards`` (default: all) from scratch into a scratch folder and compare with the live checkpoints.

    Holds the writer lock so the run cannot change underneath; replays pending deletions first. Raises
    :class:`IncompatibleCheckpointError` when the live checkpoints were made under a device, torch build, executor
    or (on GPU) stack width other than this process's, because bits are only comparable under the same ones.
    """
    run = RunDir(root)
    run.require_manifest()
    with writer_lock(run.root, wait_s, "verify"):
        recover(run, locked=True)
        config, manifest = run.config(), run.require_manifest()
        shards = select_shards(config, shards)
        entries = {e["shard"]: e for e in manifest["shards"]}
        _check_environment(run, config, entries, shards)
        with tempfile.TemporaryDirectory(prefix="sisa-verify-", dir=workdir) as scratch:
            spec = dataclasses.replace(train_spec(run, config), checkpoint_root=scratch)
            jobs, data, records = [], {}, {}
            for s in shards:
                frame = run.shard_frame(s)  # checksum-verified against the manifest
                data[s] = shard_data(frame, config.data.features, config.sharding.slices)
                fps = _chain(config, s, frame, data[s])
                jobs.append(ShardJob(s, 0, tuple(fps)))
                records[s] = len(frame)
            t0 = time.perf_counter()
            results = run_jobs(spec, jobs, data, config.training.executor)
            per_shard = (time.perf_counter() - t0) / max(len(jobs), 1)
            _check_stacking(run, config, entries, jobs, Path(scratch))
            return [
                _compare(run, entries[j.shard], j, Path(scratch), records[j.shard], r.seconds or per_shard)
                for j, r in zip(jobs, results, strict=True)
            ]


def select_shards(config: Config, shards: list[int] | None) -> list[int]:
    """The requested shards, validated (all bad numbers named at once); all shards when none are given."""
    n = config.sharding.shards
    if not shards:
        return list(range(n))
    bad = sorted({s for s in shards if not 0 <= s < n})
    if bad:
        raise ConfigError([f"--shard {s}: this run has shards 0..{n - 1}" for s in bad])
    return sorted(set(shards))


def _chain(config: Config, shard: int, frame: pd.DataFrame, d) -> list[str]:
    ids = frame["_record_id"].to_numpy()
    return fingerprint_chain(config.digest(), shard, ids, d.labels, d.features, d.slice_ends)


def _check_environment(run: RunDir, config: Config, entries: dict, shards: list[int]) -> None:
    """Refuse before retraining when the live checkpoints' device or torch build differ from this process's."""
    device = config.training.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IncompatibleCheckpointError(
            f"{run.root} was trained on {device}, but this process has no CUDA device; verify it on the same "
            "GPU model (bit-exact comparison needs the same device, driver and torch build)"
        )
    here = {"device": device_name(device), "torch": torch.__version__}
    problems = set()
    for s in shards:
        for name in entries[s]["checkpoints"]:
            meta = read_meta(run.shard_checkpoints(s) / name)
            for key, value in here.items():
                if meta.get(key) != value:
                    problems.add(f"{key} {meta.get(key)!r} (this process: {value!r})")
            if device.startswith("cuda") and not meta.get("deterministic", True):
                problems.add("deterministic mode was off at training, so GPU bits are not reproducible")
    _refuse(problems, ". Run `sisa verify` where the run was trained")


def _refuse(problems: set[str], hint: str = "") -> None:
    if problems:
        made = "; ".join(sorted(problems))
        raise IncompatibleCheckpointError(
            f"cannot compare checkpoints bit for bit: live checkpoints were made with {made}{hint}"
        )


def _check_stacking(run: RunDir, config: Config, entries: dict, jobs: list[ShardJob], scratch: Path) -> None:
    """The retrain must have used the live checkpoints' executor (and, on GPU, stack width: DESIGN §5)."""
    keys = ["executor", "stack_width"] if config.training.device.startswith("cuda") else ["executor"]
    problems = set()
    for job in jobs:
        for k, name in enumerate(entries[job.shard]["checkpoints"]):
            live = read_meta(run.shard_checkpoints(job.shard) / name)
            new = read_meta(scratch / f"shard-{job.shard:03d}" / checkpoint_name(k, job.fingerprints[k]))
            problems |= {
                f"{key} {live.get(key)!r} (retrain: {new.get(key)!r})"
                for key in keys
                if live.get(key) != new.get(key)
            }
    _refuse(problems)


def _compare(
    run: RunDir, entry: dict, job: ShardJob, scratch: Path, records: int, seconds: float
) -> Certificate:
    names = [checkpoint_name(k, fp) for k, fp in enumerate(job.fingerprints)]
    differing, max_diff = [], 0.0
    if names != entry["checkpoints"]:
        differing.append("checkpoint chain: the manifest names other fingerprints than the stored data gives")
    for k, name in enumerate(entry["checkpoints"]):
        live = load_checkpoint(run.shard_checkpoints(job.shard) / name)
        new = load_checkpoint(scratch / f"shard-{job.shard:03d}" / names[k], job.fingerprints[k])
        for part, a, b in (("model", live.model, new.model), ("optimizer", live.optimizer, new.optimizer)):
            for key in sorted(set(a) | set(b)):
                if key not in a or key not in b or a[key].shape != b[key].shape:
                    differing.append(f"{name}/{part}:{key} (missing or shape differs)")
                    max_diff = float("inf")
                elif not torch.equal(a[key], b[key]):
                    differing.append(f"{name}/{part}:{key}")
                    max_diff = max(max_diff, float((a[key].double() - b[key].double()).abs().max()))
    return Certificate(
        shard=job.shard,
        records=records,
        fingerprint=entry["fingerprint"],
        recomputed_fingerprint=job.fingerprints[-1],
        checkpoints_compared=len(entry["checkpoints"]),
        bit_identical=not differing,
        max_abs_diff=max_diff,
        differing=differing,
        seconds=round(seconds, 4),
    )


# ---- erasure ---------------------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    detail: str


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
    wait_s: float = 0.0,
) -> ErasureReport:
    """Check that nothing of deleted records survives in the run directory (see the module docstring).

    ``ids``: deleted record IDs supplied by the auditor; every file is searched for them. ``data``: the original
    rows (a table path or DataFrame with the ID column and features); their float32 feature rows are searched
    for too. With ``data`` but no ``ids``, the IDs are those rows whose keyed hash the run has tombstoned.
    """
    run = RunDir(root)
    run.require_manifest()
    with writer_lock(run.root, wait_s, "verify --erasure"):
        recover(run, locked=True)
        config, manifest = run.config(), run.require_manifest()
        index, secret = run.index(), run.secret()
        checks = [_check_journal(run, index), _check_tombstones(index, secret), _check_leftovers(run)]
        frames = {s: run.shard_frame(s) for s in range(config.sharding.shards)}
        checks += [_check_data_files(index, frames), _check_checkpoints(run, config, manifest, frames)]
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
        if rows is not None:
            checks.append(_search_rows(run, config, frames, rows, ids or []))
        return ErasureReport(str(run.root), checks, len(ids or []))


def _check_journal(run: RunDir, index) -> Check:
    entries = Journal(run.journal_dir).entries()
    pending = [e["request_id"] for e in entries if e["status"] != "applied"]
    tomb = set(index.tombstones["id_hash"])
    missing = [
        e["request_id"] for e in entries if e["status"] == "applied" and not set(e["id_hashes"]) <= tomb
    ]
    plain = [
        e["request_id"]
        for e in entries
        if not all(_is_hash(h) for h in e["id_hashes"] + e.get("subject_hashes", []))
    ]
    problems = [
        f"{what}: {ids}"
        for what, ids in (("pending", pending), ("not tombstoned", missing), ("holding non-hash IDs", plain))
        if ids
    ]
    ok_text = f"{len(entries)} request(s), all applied, keyed hashes only, every deleted ID tombstoned"
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
    return _check(
        "tombstones", problems, f"{len(tomb)} tombstone(s); none matches an active record or subject"
    )


def _check_leftovers(run: RunDir) -> Check:
    left = [str(p.relative_to(run.root)) for p in temp_leftovers(run.root)]
    return _check("leftovers", [f"found {left}"] if left else [], "no leftovers of interrupted writes")


def _check_data_files(index, frames: dict[int, pd.DataFrame]) -> Check:
    problems = []
    for s, frame in frames.items():
        want = index.active.loc[index.active["shard"] == s, ["record_id", "slice"]]
        have = frame[["_record_id", "_slice"]].set_axis(["record_id", "slice"], axis=1)
        a = want.astype(str).sort_values(["record_id", "slice"]).reset_index(drop=True)
        b = have.astype(str).sort_values(["record_id", "slice"]).reset_index(drop=True)
        if not a.equals(b):
            problems.append(f"data/shard-{s:03d}.parquet holds {len(b)} rows, the index {len(a)} (or others)")
    return _check(
        "data files", problems, f"{len(frames)} shard data file(s) hold exactly the index's records"
    )


def _check_checkpoints(run: RunDir, config: Config, manifest: dict, frames: dict[int, pd.DataFrame]) -> Check:
    problems, count = [], 0
    entries = {e["shard"]: e for e in manifest["shards"]}
    for folder in sorted(run.checkpoint_root.iterdir()) if run.checkpoint_root.is_dir() else []:
        shard = int(folder.name.split("-")[1]) if folder.name.startswith("shard-") else None
        if shard not in entries or shard not in frames:
            problems.append(f"stray folder {folder.relative_to(run.root)}")
            continue
        d = shard_data(frames[shard], config.data.features, config.sharding.slices)
        fps = _chain(config, shard, frames[shard], d)
        expected = [checkpoint_name(k, fp) for k, fp in enumerate(fps)]
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
    texts = {str(i) for i in ids}
    raw = [t.encode() for t in texts if len(t) >= MIN_RAW_ID_LENGTH]
    hits = []
    for path in _run_files(run):
        rel = path.relative_to(run.root).as_posix()
        blob = path.read_bytes()
        if any(r in blob for r in raw):
            hits.append(f"{rel} (raw bytes)")
        elif path.suffix == ".parquet" and texts & _parquet_id_values(path):
            hits.append(f"{rel} (ID column)")
        elif path.suffix == ".json" and texts & _json_strings(blob):
            hits.append(f"{rel} (JSON value)")
    searched = f"({len(raw)} searched as raw bytes, all as values)"
    return [
        _check(
            "ids deleted",
            [f"not deleted: {not_deleted[:20]}"] if not_deleted else [],
            f"all {len(ids)} ID(s) tombstoned, none active",
        ),
        _check(
            "ids in files",
            [f"found in {hits}"] if hits else [],
            f"no file holds any of the {len(ids)} ID(s) {searched}",
        ),
    ]


def _parquet_id_values(path: Path) -> set[str]:
    frame = read_parquet(path)
    return {str(v) for c in ("record_id", "_record_id") if c in frame for v in frame[c].dropna().tolist()}


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
        feats = np.ascontiguousarray(frame[config.data.features].to_numpy(np.float32))
        for rid, feat in zip(frame["_record_id"].tolist(), feats, strict=True):
            if feat.tobytes() in wanted:
                if str(rid) in deleted:
                    hits.append(f"data/shard-{s:03d}.parquet (row of {rid})")
                else:
                    shared += 1
    for path in _run_files(run):
        if path.suffix != ".parquet":
            blob = path.read_bytes()
            if any(r in blob for r in wanted):
                hits.append(f"{path.relative_to(run.root).as_posix()} (raw float32 bytes)")
    note = f"; {shared} active record(s) have identical features (their own data)" if shared else ""
    ok_text = f"none of {len(rows)} deleted feature row(s) found{note}"
    return _check("feature rows", [f"found in {hits}"] if hits else [], ok_text)
