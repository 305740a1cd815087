"""Slice checkpoints: a documented on-disk format and the fingerprints that name them.

A checkpoint is a folder ``checkpoints/shard-SSS/slice-KKK-<fingerprint16>/`` holding

- ``model.safetensors``   the sub-model's state_dict (parameters and buffers),
- ``optimizer.safetensors`` optimizer state: ``step`` and one tensor per slot and parameter (``exp_avg.<name>``),
- ``meta.json``           format, shard, slice, fingerprint, config digest, records and samples trained on,
                          device, torch version, executor, stack width, threads, SHA-256 of both tensor files,
- ``COMPLETE``            written last; holds the SHA-256 of meta.json.

The folder is built under a ``.tmp-`` name and renamed into place, so a folder without ``COMPLETE`` (or whose
checksums fail) is never trusted. No pickle anywhere.

The fingerprint of slice k chains the fingerprint of slice k-1 with the config digest, the shard and the content
digest of slice k's rows (their IDs, labels and features): it covers exactly the records the checkpoint was trained on, so a stale
checkpoint can never be mistaken for a fresh one (docs/design.md §2.6), and a run can tell which checkpoints a change of
data leaves valid simply by recomputing the chain.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..exceptions import IntegrityError
from .barrier import flush_later, write_later
from .files import (
    TMP_PREFIX,
    crash_point,
    fsync_dir,
    read_json,
    remove_tree,
    replace_path,
    sha256_bytes,
    start_writeback,
)

FORMAT = "sisa-checkpoint/1"


def fingerprint_chain(config_digest: str, shard: int, slice_digests: list[str]) -> list[str]:
    """One fingerprint per slice: sha256(previous fingerprint, config digest, shard, k, content digest of slice k)
    (:func:`sisa.store.shardfile.slice_digest`)."""
    out, prev = [], ""
    for k, digest in enumerate(slice_digests):
        prev = hashlib.sha256(f"{prev}|{config_digest}|{shard}|{k}|{digest}".encode()).hexdigest()
        out.append(prev)
    return out


def checkpoint_name(slice_idx: int, fingerprint: str) -> str:
    return f"slice-{slice_idx:03d}-{fingerprint[:16]}"


def shard_folder(checkpoint_root: str | Path, shard: int) -> Path:
    """``checkpoints/shard-SSS``: every checkpoint of one shard."""
    return Path(checkpoint_root) / f"shard-{shard:03d}"


def checkpoint_folder(checkpoint_root: str | Path, shard: int, slice_idx: int, fingerprint: str) -> Path:
    return shard_folder(checkpoint_root, shard) / checkpoint_name(slice_idx, fingerprint)


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    meta: dict


def save_checkpoint(
    folder: Path,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, torch.Tensor],
    meta: dict,
    sync: bool = True,
) -> None:
    """Write a checkpoint folder atomically (temp folder, COMPLETE last, rename).

    ``sync``: fsync each file and folder now. Training in this machine's processes passes False: the tensors are
    copied and the folder is written, then fsynced, on background threads (:func:`sisa.store.barrier.write_later`,
    :func:`~sisa.store.barrier.flush_later`) while training goes on; the caller makes everything durable with one
    barrier before the manifest names the checkpoints (:func:`sisa.store.barrier.barrier`); until then no
    manifest trusts them (docs/design.md §4)."""
    if sync:
        _write_folder(Path(folder), model_state, optim_state, meta, sync=True)
        return
    snapshot = [{k: v.detach().to("cpu").clone() for k, v in d.items()} for d in (model_state, optim_state)]
    write_later(lambda: _write_folder(Path(folder), *snapshot, meta, sync=False))


def _write_folder(
    folder: Path,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, torch.Tensor],
    meta: dict,
    sync: bool,
) -> None:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f"{TMP_PREFIX}{folder.name}.{os.getpid()}"
    remove_tree(tmp)
    tmp.mkdir()
    blobs = {
        "model.safetensors": st_save({k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}),
        "optimizer.safetensors": st_save(
            {k: v.detach().to("cpu").contiguous() for k, v in optim_state.items()}
        ),
    }
    meta = {**meta, "format": FORMAT, "files": {n: sha256_bytes(b) for n, b in blobs.items()}}
    meta_bytes = (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()
    for name, data in [
        *blobs.items(),
        ("meta.json", meta_bytes),
        ("COMPLETE", sha256_bytes(meta_bytes).encode()),
    ]:
        crash_point("write:", folder / name)  # written in the temp folder, named by its final place
        with open(tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
            else:  # the caller's one barrier will find these bytes already on their way to the disk
                start_writeback(f.fileno())
    if sync:
        fsync_dir(tmp)
    if folder.exists():  # a leftover from an interrupted run with the same fingerprint: replace it
        remove_tree(folder)
    replace_path(tmp, folder, sync=sync)
    if not sync:
        flush_later(folder)  # fsynced on a background thread; the caller's barrier waits for it


def is_complete(folder: Path) -> bool:
    """True when the folder has its COMPLETE marker and the marker matches meta.json (cheap; no tensor reads)."""
    folder = Path(folder)
    try:
        marker = (folder / "COMPLETE").read_bytes().decode()
        return marker == sha256_bytes((folder / "meta.json").read_bytes())
    except (OSError, UnicodeDecodeError):
        return False


def read_meta(folder: Path) -> dict:
    if not is_complete(folder):
        raise IntegrityError(folder, "checkpoint is incomplete (no valid COMPLETE marker)")
    return read_json(Path(folder) / "meta.json")


def load_checkpoint(folder: Path, expected_fingerprint: str | None = None) -> Checkpoint:
    """Load and verify a checkpoint; raise IntegrityError for anything incomplete, corrupted or stale."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta.get("format") != FORMAT:
        raise IntegrityError(folder, f"unknown checkpoint format {meta.get('format')!r}")
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        raise IntegrityError(
            folder, "fingerprint does not match the records it should cover (stale checkpoint)"
        )
    tensors = {}
    for name in ("model.safetensors", "optimizer.safetensors"):
        try:
            data = (folder / name).read_bytes()
        except OSError as exc:
            raise IntegrityError(folder / name, f"unreadable ({exc})") from None
        if sha256_bytes(data) != meta["files"].get(name):
            raise IntegrityError(folder / name, "checksum mismatch (file changed or truncated)")
        tensors[name] = st_load(data)
    return Checkpoint(tensors["model.safetensors"], tensors["optimizer.safetensors"], meta)
