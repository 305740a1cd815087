"""The run directory: its layout and the typed reads and writes of each file in it.

```
runs/<name>/
  config.yaml                resolved config, frozen at train (+ config.digest)
  secret.key                 per-run key for keyed hashes of deleted IDs (HMAC-SHA256)
  index/shard-SSS.arrow      each shard's active records: ID, subject, slice, in-shard order key
  tombstones.arrow           deleted records and subjects: keyed hash (HMAC) and request id only
  data/shard-SSS/slice-KKK.arrow   one slice's rows in training order (deleted rows purged); see sisa.store.shardfile
  checkpoints/shard-SSS/slice-KKK-<fingerprint16>/   see sisa.store.checkpoints
  manifest.json              the live generation: per shard, its checkpoint chain and slice digests; checksums of
                             every data and index file
  journal/<request>.json     open requests: pending -> rolled_back -> applied (keyed hashes only)
  journal/applied/<request>.json   applied ones, with receipts, filed away (see sisa.store.journal)
  metrics.json               test accuracy of a generation no training scored, computed lazily by `status`
  lock                       the writer lock (flock)
```
"""

from __future__ import annotations

import copy
import os
import secrets
from pathlib import Path

import yaml

from ..config import Config
from ..exceptions import IntegrityError, RunStateError
from .checkpoints import shard_folder
from .files import atomic_write_bytes, atomic_write_json, fsync_dir, read_json, read_verified, sha256_bytes
from .index import TOMBSTONES_FILE, RecordIndex, index_file
from .journal import Journal
from .shardfile import ShardRows, concat, from_bytes, slice_file

MANIFEST_FORMAT = "sisa-manifest/2"
OLD_FORMATS = ("sisa-manifest/1",)  # one Parquet file per shard: refused with how to proceed


class RunDir:
    """Typed access to one run directory. Holds paths and the frozen config; no training logic.

    ``runtime``: ``section.key=value`` overrides of this process's runtime keys (:meth:`Config.with_runtime`:
    workers, cluster, lanes, progress), applied whenever the config is read; the frozen file is never changed."""

    def __init__(self, root: str | Path, runtime: list[str] | tuple[str, ...] = ()):
        self.root = Path(root)
        self.runtime = tuple(runtime)

    # ---- paths ------------------------------------------------------------------------------------------------
    config_path = property(lambda self: self.root / "config.yaml")
    secret_path = property(lambda self: self.root / "secret.key")
    manifest_path = property(lambda self: self.root / "manifest.json")
    journal_dir = property(lambda self: self.root / "journal")
    metrics_path = property(lambda self: self.root / "metrics.json")
    checkpoint_root = property(lambda self: self.root / "checkpoints")
    data_dir = property(lambda self: self.root / "data")

    def slice_path(self, shard: int, slice_idx: int) -> Path:
        return self.root / slice_file(shard, slice_idx)

    def shard_checkpoints(self, shard: int) -> Path:
        return shard_folder(self.checkpoint_root, shard)

    # ---- creation ---------------------------------------------------------------------------------------------
    def create(self, config: Config) -> None:
        """Lay out a new run: folders, frozen config, a fresh secret. Refuses a folder holding another run."""
        if self.config_path.exists():
            raise RunStateError(f"{self.root} already holds a run; choose another --run folder or delete it")
        if self.root.exists() and any(p.name != "lock" for p in self.root.iterdir()):
            raise RunStateError(f"{self.root} exists and is not empty; choose an empty or new --run folder")
        for d in (self.root, self.data_dir, self.checkpoint_root, self.journal_dir):
            d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.secret_path, secrets.token_bytes(32))
        os.chmod(self.secret_path, 0o600)
        self.write_config(config)

    def write_config(self, config: Config) -> None:
        header = f"# resolved sisa config; digest {config.digest()}\n"
        atomic_write_bytes(self.config_path, (header + config.to_yaml()).encode())

    # ---- reads ------------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.config_path.is_file()

    def require(self) -> None:
        if not self.exists():
            raise RunStateError(
                f"{self.root} is not a sisa run (no config.yaml); create one with `sisa train`"
            )

    def config(self) -> Config:
        """The frozen config with this process's runtime overrides; parsed once per file version and runtime in
        this process (every ``RunDir`` of the run shares it), its digest computed once: treat it as read-only."""
        self.require()
        key, slot = _stat_key(self.config_path), (str(self.config_path), self.runtime)
        hit = _CONFIGS.get(slot)
        if hit is None or hit[0] != key:
            config = Config.from_dict(_read_yaml(self.config_path))
            config = config.with_runtime(self.runtime) if self.runtime else config
            if len(_CONFIGS) >= _MAX_CONFIGS:
                _CONFIGS.clear()
            hit = _CONFIGS[slot] = (key, config.frozen_digest())
        return hit[1]

    def secret(self) -> bytes:
        data = self.secret_path.read_bytes()
        if len(data) != 32:
            raise IntegrityError(self.secret_path, "secret key must be 32 bytes")
        return data

    def manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        m = read_json(self.manifest_path)
        if m.get("format") in OLD_FORMATS:
            raise RunStateError(
                f"{self.root} was written by an older sisa (format {m['format']!r}: one data file per shard); "
                "this version reads format 2 (one file per shard slice) only: train it again from its original data "
                "with `sisa train` (a converter that keeps the models is not written yet)"
            )
        if m.get("format") != MANIFEST_FORMAT:
            raise IntegrityError(self.manifest_path, f"unknown manifest format {m.get('format')!r}")
        return m

    def require_manifest(self) -> dict:
        self.require()
        m = self.manifest()
        if m is None:
            raise RunStateError(
                f"{self.root}: training has not finished (no manifest.json); "
                "run `sisa train --resume` to complete it"
            )
        return m

    def read_generation(self, load, attempts: int = 5):
        """``load(manifest)`` on one whole live generation, e.g. ``Ensemble.from_manifest``.

        A writer deletes the checkpoints of the generation it replaces right after swapping the manifest, so a
        reader that read the old manifest just before may find one gone (IntegrityError). Then it reads the new
        manifest and loads again; an error under an unchanged manifest is real and is raised."""
        for _ in range(attempts):
            manifest = self.require_manifest()
            try:
                return load(manifest)
            except IntegrityError:
                if self.require_manifest().get("generation") == manifest.get("generation"):
                    raise
        raise RunStateError(f"{self.root}: the run changed {attempts} times while loading; try again")

    def index(self, verify: bool = True) -> RecordIndex:
        config = self.config()
        shards, has_subjects = config.sharding.shards, bool(config.data.subject_column)
        names = [TOMBSTONES_FILE, *(index_file(s) for s in range(shards))]
        files = self.read_files(names, verify)
        return RecordIndex.load(files.__getitem__, shards, has_subjects=has_subjects)

    def shard_rows(self, shard: int, slices: list[int] | None = None, verify: bool = True) -> ShardRows:
        """The shard's rows in training order (``slices``: only those, in order), each file checksum-verified."""
        config = self.config()
        ks = range(config.sharding.slices) if slices is None else slices
        names = [slice_file(shard, k) for k in ks]
        files = self.read_files(names, verify)
        n_f = len(config.data.features or [])
        return concat([from_bytes(files[n], self.root / n, n_f) for n in names], n_f)

    def read_files(self, names: list[str], verify: bool = True) -> dict[str, bytes]:
        """Bytes of run-relative files, each checked against the manifest's checksum or one a pending request
        staged (a file the manifest does not name yet, during a first training, is read as it is)."""
        if not verify:
            return {n: read_verified(self.root / n) for n in names}
        return self._verified_read(
            lambda accepted: {n: read_verified(self.root / n, accepted.get(n)) for n in names}, names
        )

    def accepted_checksums(self, names: list[str], staged: bool = True) -> dict[str, set[str]]:
        """Acceptable SHA-256s per run-relative file: the manifest's, plus any staged by a pending deletion.

        A file the manifest does not name (a run whose first training has not finished) has no entry."""
        m = self.manifest()
        files = (m or {}).get("files", {})
        extra = Journal(self.journal_dir).staged() if staged else {}
        return {n: {files[n], *extra.get(n, ())} for n in names if n in files}

    def _verified_read(self, read, names: list[str]):
        """Read with checksums: the manifest's first; on a mismatch, also those of pending deletions, re-read.

        A writer stages a checksum before writing the file and swaps the manifest before completing the request,
        so a reader that saw the new file also sees the new checksum when it looks again."""
        accepted = self.accepted_checksums(names, staged=False)
        for _ in range(3):
            try:
                return read(accepted)
            except IntegrityError:
                again = self.accepted_checksums(names)
                if again == accepted:
                    raise
                accepted = again
        return read(accepted)

    # ---- writes -----------------------------------------------------------------------------------------------
    def write_files(self, files: dict[str, bytes]) -> dict[str, str]:
        """Write run-relative files atomically, in the given order; return their SHA-256s."""
        shas = {}
        for rel, data in files.items():
            path = self.root / rel
            if not path.parent.is_dir():
                path.parent.mkdir(parents=True)
                fsync_dir(path.parent.parent)
            atomic_write_bytes(path, data)
            shas[rel] = sha256_bytes(data)
        return shas

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, {**manifest, "format": MANIFEST_FORMAT}, compact=True)


_YAML_CACHE: dict[str, tuple[tuple[int, int, int], dict]] = {}
_CONFIGS: dict[tuple[str, tuple[str, ...]], tuple[tuple[int, int, int], Config]] = {}  # see RunDir.config
_MAX_CONFIGS = 64  # runs x runtime overrides one process reads (a test session: hundreds of runs)


def _read_yaml(path: Path) -> dict:
    """Parse a run's frozen config.yaml once per process (C loader; re-read when the file is replaced)."""
    key = _stat_key(path)
    hit = _YAML_CACHE.get(str(path))
    if hit is None or hit[0] != key:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        hit = (key, yaml.load(path.read_text(), Loader=loader))  # noqa: S506 - a safe loader
        _YAML_CACHE[str(path)] = hit
    return copy.deepcopy(hit[1])


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_mtime_ns, st.st_size)
