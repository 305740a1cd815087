"""Kill -9 a real ``python -m sisa.cli delete`` at many moments; recovery must give the uninterrupted result.

The moments come from the fault hook in :func:`sisa.store.files.crash_point`: one in-process deletion, run with
``SISA_CRASH_LOG``, lists every durable step (write, torn temp file, rename, removal) in order; each trial copies the
trained base run, starts the CLI with ``SISA_CRASH_AT=N`` so that it SIGKILLs itself at step N, recovers with
``sisa status`` and compares the run with the uninterrupted deletion.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from sisa.cli import main as cli
from sisa.intake import add
from sisa.store.files import CRASH_AT_ENV, CRASH_LOG_ENV, reset_crash_counter, temp_leftovers
from sisa.store.garbage import STALE_PREFIX
from sisa.store.journal import Journal
from sisa.store.rundir import RunDir
from sisa.tables.datasets import make_tabular
from sisa.unlearning import delete
from tests.conftest import assert_runs_identical, small_config, train_run

REPO = Path(__file__).resolve().parents[1]
DELETE_IDS = ["3", "17"]  # shard 0 from slice 0 and shard 1 from slice 2: both shards, several checkpoints
# One lane: checkpoints are written in a fixed order, so SISA_CRASH_AT=N names the same moment in every process
# (lanes interleave their writes; test_kill_between_checkpoints_of_parallel_lanes covers them).
CONFIG = small_config(
    sharding={"shards": 2, "slices": 3},
    model={"hidden": [8]},
    training={"epochs": 1, "batch_size": 32, "executor": "stacked", "stack_threads": 1},
)
PARALLEL = 2


@dataclass
class Setup:
    root: Path
    base: RunDir
    reference: RunDir
    points: list[str]  # point names, in order; SISA_CRASH_AT=N kills at points[N - 1]

    @property
    def acknowledged_from(self) -> int:
        """The first N at which the request is acknowledged (the journal entry's rename has happened)."""
        return next(i for i, p in enumerate(self.points, 1) if p.startswith("replaced:journal/"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("crash")
    df = make_tabular(200, seed=1, n_features=6, n_classes=3, string_labels=True)
    base = train_run(root / "base", df, CONFIG)
    shutil.copytree(base.root, root / "reference")
    log = root / "points.log"
    os.environ[CRASH_LOG_ENV] = str(log)
    reset_crash_counter()
    try:
        delete(root / "reference", DELETE_IDS)
    finally:
        del os.environ[CRASH_LOG_ENV]
        reset_crash_counter()
    points = [line.split("\t", 1)[1] for line in log.read_text().splitlines()]
    return Setup(root, base, RunDir(root / "reference"), points)


# One or more crash moments per phase of a deletion: (pattern, which occurrences; None = all).
PHASES = [
    (r"(write|torn|replace|replaced):journal/", [0, 1, 2, 3]),  # around the acknowledgement
    (r"replaced:journal/", [1]),  # checksums staged in the journal
    (r"replaced:journal/", [2]),  # rolled back (erased, forgotten): the catch-up retrain comes next
    (r"replaced:tombstones\.arrow$", [0]),  # between the tombstones and the shards' index files
    (r"torn:index/shard-000\.arrow$", [0]),
    (r"replaced:index/shard-001\.arrow$", [0]),
    (r"replaced:data/shard-000/slice-000\.arrow$", [0]),  # purging the touched slices only
    (r"torn:data/shard-001/slice-002\.arrow$", [0]),
    (r"write:checkpoints/shard-000/slice-000-.*/model", [0]),  # inside a checkpoint's temp folder
    (r"replaced:checkpoints/", None),  # between checkpoint writes (not yet synced)
    (r"sync:checkpoints$", [0]),  # the one durability barrier before the manifest swap
    (r"(torn|replace|replaced):manifest\.json$", None),  # the manifest swap
    (r"remove:checkpoints/shard-", [0]),  # deleting invalidated checkpoints
    (r"rmdir:checkpoints/", [0]),
    (r"torn:journal/", [-1]),  # marking the request applied
    (r"replace:journal/applied/", [0]),  # applied, not yet filed away
    (r"replaced:journal/", [-1]),
]


def spread(points: list[str]) -> list[int]:
    """Crash points (1-based) covering every phase of one deletion (see PHASES)."""
    chosen = set()
    for pattern, which in PHASES:
        hits = [i for i, p in enumerate(points, 1) if re.match(pattern, p)]
        assert hits, f"no crash point matches {pattern}"
        chosen |= set(hits) if which is None else {hits[k] for k in which}
    return sorted(chosen)


def crash_env(at: str, log: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), CRASH_AT_ENV: at}
    if log:
        env[CRASH_LOG_ENV] = str(log)
    return env


def run_trials(setup: Setup, ns: list[int], tag: str, argv: list[str] | None = None) -> dict[int, Path]:
    """Copy the base run and kill a CLI deletion at each N (PARALLEL at a time); return the trial run folders."""
    trials = {n: setup.root / f"{tag}-{n:03d}" for n in ns}
    queue, running = list(ns), []
    while queue or running:
        while queue and len(running) < PARALLEL:
            n = queue.pop(0)
            shutil.rmtree(trials[n], ignore_errors=True)
            shutil.copytree(setup.base.root, trials[n])
            log = trials[n].with_suffix(".log")
            args = argv or ["delete", "--run", "{run}", *DELETE_IDS]
            cmd = [sys.executable, "-m", "sisa.cli", *(a.replace("{run}", str(trials[n])) for a in args)]
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=crash_env(str(n), log), stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            running.append((n, proc, log))
        n, proc, log = running.pop(0)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, f"point {n}: exit {proc.returncode}: {err.decode()[-500:]}"
        hit = log.read_text().splitlines()[-1].split("\t")[1]
        assert _kind(hit) == _kind(setup.points[n - 1]), (n, hit, setup.points[n - 1])
    return trials


def _kind(point: str) -> str:
    """A point name without run-specific parts (trial folder, request id, pid)."""
    kind, _, path = point.partition(":")
    name = re.sub(r"(del|add)-\d{8}T\d{6}-[0-9a-f]{8}", r"\1-*", Path(path).name)
    return f"{kind}:{name}"


def recover_with_status(run: Path) -> None:
    assert cli.main(["status", "--run", str(run)]) == 0


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_unchanged(run: Path, base: RunDir) -> None:
    """A crash before the acknowledgement: the run is exactly the base run, nothing journaled."""
    assert files_of(run) == files_of(base.root)
    assert Journal(run / "journal").entries() == []


def assert_like_reference(run: Path, ref: RunDir) -> None:
    """A crash after the acknowledgement: after recovery the run equals the uninterrupted deletion."""
    got = RunDir(run)
    assert_runs_identical(got, ref)
    m, mr = got.manifest(), ref.manifest()
    tomb = "tombstones.arrow"  # holds the request id, which differs between the two deletions
    assert {**m, "files": {**m["files"], tomb: ""}} == {**mr, "files": {**mr["files"], tomb: ""}}
    t, tr = (pd.read_feather(r / tomb).drop(columns="request_id") for r in (run, ref.root))
    pd.testing.assert_frame_equal(t, tr)
    (entry,) = Journal(run / "journal").entries()
    (ref_entry,) = Journal(ref.journal_dir).entries()
    assert entry["status"] == "applied" and entry["id_hashes"] == ref_entry["id_hashes"]
    assert entry["receipt"]["fingerprints_after"] == ref_entry["receipt"]["fingerprints_after"]
    assert temp_leftovers(run) == []
    on_disk = {p.relative_to(run / "checkpoints").as_posix() for p in (run / "checkpoints").glob("*/*")}
    named = {f"shard-{e['shard']:03d}/{n}" for e in m["shards"] for n in e["checkpoints"]}
    assert on_disk == named
    idx = got.index()
    assert not idx.active["record_id"].astype(str).isin(DELETE_IDS).any()


def served_checkpoints(run: Path) -> dict[int, str]:
    """What a server reading the run as the crash left it would answer with (journal first, as it reads)."""
    pending = Journal(run / "journal").pending_shards()
    m = RunDir(run).manifest()
    return {
        e["shard"]: e["checkpoints"][-1]
        for e in m["shards"]
        if e["shard"] not in pending and e["checkpoints"]
    }


def assert_serves_only_unseen(run: Path, setup: Setup) -> None:
    """Before recovery: every checkpoint that would answer never saw a deleted record (the uninterrupted deletion
    keeps it, as one of the retrained shards' checkpoints 0..k-1 or an untouched shard's)."""
    ref = {e["shard"]: set(e["checkpoints"]) for e in setup.reference.manifest()["shards"]}
    for shard, name in served_checkpoints(run).items():
        assert name in ref[shard], (run, shard, name)


def check_trials(setup: Setup, trials: dict[int, Path]) -> None:
    for n, run in trials.items():
        if n >= setup.acknowledged_from:
            assert_serves_only_unseen(run, setup)
        recover_with_status(run)
        if n < setup.acknowledged_from:
            assert_unchanged(run, setup.base)
        else:
            assert_like_reference(run, setup.reference)


def test_the_deletion_has_enough_distinct_crash_points(setup):
    assert len(setup.points) >= 40
    kinds = {p.split(":")[0] for p in setup.points}
    assert {"write", "torn", "replace", "replaced", "sync", "remove", "rmdir"} <= kinds
    assert setup.points[0].startswith("write:journal/del-")  # the journal comes first
    assert setup.acknowledged_from == 4


def test_kill_at_spread_points_then_recover_equals_uninterrupted(setup, capsys):
    ns = spread(setup.points)
    assert len(ns) >= 20
    check_trials(setup, run_trials(setup, ns, "spread"))
    print(f"crash points exercised: {len(ns)} of {len(setup.points)}", file=sys.stderr)


def test_a_crash_during_recovery_is_recovered_too(setup, capsys):
    """Kill the deletion between checkpoint writes, then kill the recovering `sisa status` as well."""
    first_ck = next(i for i, p in enumerate(setup.points, 1) if p.startswith("replaced:checkpoints/"))
    (run,) = run_trials(setup, [first_ck + 1], "double").values()
    cmd = [sys.executable, "-m", "sisa.cli", "status", "--run", str(run)]
    proc = subprocess.run(cmd, cwd=REPO, env=crash_env("replaced:checkpoints/:1"), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    recover_with_status(run)
    assert_like_reference(run, setup.reference)


def test_kill_between_checkpoints_of_parallel_lanes(tmp_path):
    """Two lanes write checkpoints in whichever order their threads reach them: kill after the k-th one lands."""
    df = make_tabular(200, seed=1, n_features=6, n_classes=3, string_labels=True)
    base = train_run(tmp_path / "base", df, CONFIG.with_overrides(["training.stack_threads=2"]))
    shutil.copytree(base.root, tmp_path / "reference")
    reference = RunDir(tmp_path / "reference")
    delete(reference.root, DELETE_IDS)
    for k in (1, 3):
        run = tmp_path / f"lanes-{k}"
        shutil.copytree(base.root, run)
        cmd = [sys.executable, "-m", "sisa.cli", "delete", "--run", str(run), *DELETE_IDS]
        proc = subprocess.run(cmd, cwd=REPO, env=crash_env(f"replaced:checkpoints/:{k}"), capture_output=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-500:]
        recover_with_status(run)
        assert_like_reference(run, reference)


def test_kill_while_the_stale_checkpoints_are_removed_in_the_background(setup):
    """The rollback renames the checkpoints that saw the records to ``.tmp-stale-*`` and removes them on a thread
    while the catch-up trains (sisa.store.garbage). Kill the process in the middle of those removals, wherever
    the training is: the leftovers are never trusted, recovery removes them and ends like the uninterrupted run."""
    for k in (1, 6):
        run = setup.root / f"erasing-{k}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(setup.base.root, run)
        cmd = [sys.executable, "-m", "sisa.cli", "delete", "--run", str(run), *DELETE_IDS]
        at = f"remove:checkpoints/shard-000/{STALE_PREFIX}:{k}"  # counted on the removal thread alone
        proc = subprocess.run(cmd, cwd=REPO, env=crash_env(at), capture_output=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-500:]
        assert list(run.glob(f"checkpoints/shard-000/{STALE_PREFIX}*")), "killed before the removals finished"
        assert_serves_only_unseen(run, setup)
        recover_with_status(run)
        assert_like_reference(run, setup.reference)


@pytest.mark.parametrize(
    "at",
    [
        "replaced:data/:1",  # the rollback's first purged slice, the early catch-up training meanwhile
        "replaced:checkpoints/shard-000/.tmp-stale-:3",  # renaming the stale checkpoints away
        "write:checkpoints/shard-000/slice-:1",  # the early catch-up's first file, wherever the rollback is
        "replaced:checkpoints/shard-000/slice-:1",  # its first checkpoint in place, unnamed
        "replaced:journal/:3",  # rolled back: erased and forgotten, the early checkpoints not named yet
    ],
)
def test_kill_while_the_early_catch_up_trains_beside_the_rollback(setup, at):
    """With threads on (a prefixed count), the catch-up trains on the purged slices while the rollback writes
    (sisa.refresh.EarlyRetrain). Kill at a rollback write or at one of its checkpoints: its folders are unnamed
    until the manifest swap, so recovery ends like the uninterrupted run, and serves only unseen checkpoints."""
    run = setup.root / f"early-{at.replace(':', '-').replace('/', '')}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(setup.base.root, run)
    cmd = [sys.executable, "-m", "sisa.cli", "delete", "--run", str(run), *DELETE_IDS]
    proc = subprocess.run(cmd, cwd=REPO, env=crash_env(at), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-500:]
    assert_serves_only_unseen(run, setup)
    recover_with_status(run)
    assert_like_reference(run, setup.reference)


@pytest.mark.slow
def test_kill_at_every_point_then_recover_equals_uninterrupted(setup):
    check_trials(setup, run_trials(setup, list(range(1, len(setup.points) + 1)), "all"))


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_power_loss_before_the_barrier_never_trusts_an_unsynced_checkpoint(setup, damage):
    """A power cut before the one sync barrier can lose a checkpoint's tensor bytes while its (small) meta and
    COMPLETE marker reached the disk: such a folder looks complete but is not named by the manifest. Recovery
    must load it in full, find the damage, drop it and retrain it, never resume from it."""
    barrier = next(i for i, p in enumerate(setup.points, 1) if p == "sync:checkpoints")
    (run,) = run_trials(setup, [barrier], f"power-{damage}").values()
    named = {n for e in RunDir(run).manifest()["shards"] for n in e["checkpoints"]}
    unnamed = [p for p in sorted((run / "checkpoints").glob("*/*")) if p.name not in named]
    assert unnamed, "the retrain should have left complete checkpoints the manifest does not name yet"
    victim = unnamed[0] / "model.safetensors"
    size = victim.stat().st_size
    victim.write_bytes(b"\0" * size if damage == "zeroed" else victim.read_bytes()[: size // 2])
    recover_with_status(run)
    assert_like_reference(run, setup.reference)


# ---- additions (issue 15): kill -9 at every moment of `sisa add` ------------------------------------------------
ADD_IDS = [3, 17]  # the same places as DELETE_IDS: shard 0 from slice 0, shard 1 from slice 2

ADD_PHASES = [  # the default suite kills at one moment of each phase; the slow test at every point
    (r"torn:incoming/add-", [0]),  # staging the placed rows (before the acknowledgement: nothing happened)
    (r"replaced:journal/add-", [0]),  # the acknowledgement
    (r"replaced:journal/", [1]),  # checksums staged
    (r"replaced:index/shard-000\.arrow$", [0]),  # merging into the index and slice files
    (r"torn:data/shard-001/slice-002\.arrow$", [0]),
    (r"replaced:checkpoints/", [1]),
    (r"replaced:manifest\.json$", [0]),
    (r"rmdir:incoming/add-", [0]),  # removing the staged rows
    (r"replaced:journal/", [-1]),  # marking the request applied
]


@dataclass
class AddSetup(Setup):
    data: Path = Path()

    @property
    def argv(self) -> list[str]:
        return ["add", "--run", "{run}", "--data", str(self.data)]


@pytest.fixture(scope="module")
def add_setup(tmp_path_factory) -> AddSetup:
    root = tmp_path_factory.mktemp("crash-add")
    df = make_tabular(200, seed=1, n_features=6, n_classes=3, string_labels=True)
    new = df.loc[df["record_id"].isin(ADD_IDS)]
    data = root / "new.parquet"
    new.to_parquet(data)
    base = train_run(root / "base", df.loc[~df["record_id"].isin(ADD_IDS)], CONFIG)
    shutil.copytree(base.root, root / "reference")
    log = root / "points.log"
    os.environ[CRASH_LOG_ENV] = str(log)
    reset_crash_counter()
    try:
        add(root / "reference", data)
    finally:
        del os.environ[CRASH_LOG_ENV]
        reset_crash_counter()
    points = [line.split("\t", 1)[1] for line in log.read_text().splitlines()]
    return AddSetup(root, base, RunDir(root / "reference"), points, data)


def assert_added_like_reference(run: Path, ref: RunDir) -> None:
    got = RunDir(run)
    assert_runs_identical(got, ref)
    assert got.manifest() == ref.manifest()
    (entry,) = Journal(run / "journal").entries()
    (ref_entry,) = Journal(ref.journal_dir).entries()
    assert entry["status"] == "applied" and entry["id_hashes"] == ref_entry["id_hashes"]
    assert entry["receipt"]["fingerprints_after"] == ref_entry["receipt"]["fingerprints_after"]
    assert temp_leftovers(run) == [] and not (run / "incoming").exists()
    on_disk = {p.relative_to(run / "checkpoints").as_posix() for p in (run / "checkpoints").glob("*/*")}
    assert on_disk == {
        f"shard-{e['shard']:03d}/{n}" for e in got.manifest()["shards"] for n in e["checkpoints"]
    }
    assert set(ADD_IDS) <= set(got.index().active["record_id"])


def check_add_trials(setup: AddSetup, trials: dict[int, Path]) -> None:
    for n, run in trials.items():
        recover_with_status(run)
        if n < setup.acknowledged_from:
            assert_unchanged(run, setup.base)
        else:
            assert_added_like_reference(run, setup.reference)


def test_an_addition_stages_its_rows_before_the_acknowledgement(add_setup):
    points = add_setup.points
    assert points[0].startswith("write:incoming/add-")  # the rows first, in the run directory
    assert points[add_setup.acknowledged_from - 1].startswith("replaced:journal/add-")
    assert all(p.startswith(("write:incoming/", "torn:incoming/", "replace", "write:journal/", "torn:journal/"))
               for p in points[: add_setup.acknowledged_from])  # fmt: skip


def test_kill_an_addition_at_spread_points_then_recover_equals_uninterrupted(add_setup):
    chosen: set[int] = set()
    for pattern, which in ADD_PHASES:
        hits = [i for i, p in enumerate(add_setup.points, 1) if re.match(pattern, p)]
        assert hits, f"no crash point matches {pattern}"
        chosen |= set(hits) if which is None else {hits[k] for k in which}
    check_add_trials(add_setup, run_trials(add_setup, sorted(chosen), "add-spread", add_setup.argv))


@pytest.mark.slow
def test_kill_an_addition_at_every_point_then_recover_equals_uninterrupted(add_setup):
    ns = list(range(1, len(add_setup.points) + 1))
    check_add_trials(add_setup, run_trials(add_setup, ns, "add-all", add_setup.argv))
