"""The write-ahead journal: first durable step, keyed hashes only, replay by every command that opens a run,
and the deletion log (`sisa history`)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil

import numpy as np
import pytest

from sisa.cli import main as cli
from sisa.estimator import SisaClassifier
from sisa.evidence.history import COLUMNS, deletion_log, format_log
from sisa.exceptions import UsageError
from sisa.fitting import train
from sisa.store.files import CRASH_LOG_ENV, reset_crash_counter
from sisa.store.index import keyed_id_hashes
from sisa.store.journal import Journal
from sisa.store.rundir import RunDir
from sisa.tables.datasets import make_tabular
from sisa.unlearning import delete
from tests.conftest import assert_runs_identical, small_config, train_run

CONFIG = small_config(sharding={"shards": 2, "slices": 3}, model={"hidden": [8]}, training={"epochs": 1})


class Acknowledged(Exception):
    """Raised from on_ack: the process 'dies' right after the request was journaled."""


@pytest.fixture(scope="module")
def email_run(tmp_path_factory):
    """A trained run with e-mail record IDs (long strings, so a plain ID on disk would be visible)."""
    root = tmp_path_factory.mktemp("journal")
    df = make_tabular(200, seed=3, n_features=6, n_classes=3, id_kind="email")
    return train_run(root / "base", df, CONFIG), df


def copy_run(run: RunDir, dest) -> RunDir:
    shutil.copytree(run.root, dest)
    return RunDir(dest)


def all_bytes(root) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_the_journal_entry_is_the_first_durable_step_and_is_fsynced(email_run, tmp_path, monkeypatch):
    run = copy_run(email_run[0], tmp_path / "r")
    ids = list(email_run[1]["record_id"][:2])
    synced, order = [], []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    monkeypatch.setenv(CRASH_LOG_ENV, str(tmp_path / "points.log"))
    reset_crash_counter()
    before = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file() and p.name != "lock"}

    def on_ack(entry):
        order.append(entry["status"])
        after = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file() and p.name != "lock"}
        journaled = {p for p in after if p.parent == run.journal_dir}
        assert {p: b for p, b in after.items() if p not in journaled} == before  # nothing else changed yet
        assert [json.loads(p.read_text())["status"] for p in journaled] == ["pending"]

    delete(run.root, ids, on_ack=on_ack)
    reset_crash_counter()
    points = (tmp_path / "points.log").read_text().splitlines()
    assert order == ["pending"]
    assert re.match(r"1\twrite:journal/del-", points[0]) and re.match(r"4\treplaced:journal/", points[3])
    entry_file = str(Journal(run.journal_dir).entries()[0]["request_id"])
    tmp_synced = [i for i, p in enumerate(synced) if f".tmp-{entry_file}.json" in p]
    dir_synced = [i for i, p in enumerate(synced) if p == str(run.journal_dir)]
    assert tmp_synced and dir_synced and tmp_synced[0] < dir_synced[0]  # file, then its folder
    assert tmp_synced[0] == 0  # the very first fsync of the deletion is the journal entry's


def test_journal_entries_hold_keyed_hashes_never_ids(email_run, tmp_path):
    run = copy_run(email_run[0], tmp_path / "r")
    ids = list(email_run[1]["record_id"][:3])
    delete(run.root, ids[:2])
    receipt = delete(run.root, [ids[0], ids[2]])  # one already deleted: named in the returned receipt only
    assert receipt["already_deleted"] == [ids[0]]
    entries = Journal(run.journal_dir).entries()
    assert [e["status"] for e in entries] == ["applied", "applied"]
    secret = run.secret()
    assert entries[0]["id_hashes"] == sorted(keyed_id_hashes(ids[:2], secret, "record"))
    assert entries[1]["id_hashes"] == keyed_id_hashes([ids[2]], secret, "record")
    raw = b"".join(p.read_bytes() for p in run.journal_dir.rglob("*") if p.is_file())
    for rid in ids:
        assert rid.encode() not in raw
    for e in entries:
        assert all(re.fullmatch("[0-9a-f]{64}", h) for h in e["id_hashes"])
        # checksums of the files it rewrote, journaled before they were written
        data_files = {
            f"data/shard-{int(s):03d}/slice-{k:03d}.arrow" for s, ks in e["slices"].items() for k in ks
        }
        index_files = {f"index/shard-{int(s):03d}.arrow" for s in e["shards"]}
        assert set(e["staged"]) == {"tombstones.arrow", *index_files, *data_files}  # only what changed
        assert all(re.fullmatch("[0-9a-f]{64}", h) for h in e["staged"].values())
    # the whole run directory holds no deleted ID, in any file
    assert not any(rid.encode() in all_bytes(run.root) for rid in ids)


def pending_run(base: RunDir, dest, ids) -> tuple[RunDir, str]:
    """A copy of ``base`` with an acknowledged deletion of ``ids`` that was never applied (process died)."""
    run = copy_run(base, dest)

    def die(entry):
        raise Acknowledged(entry["request_id"])

    with pytest.raises(Acknowledged) as exc:
        delete(run.root, ids, on_ack=die)
    (entry,) = Journal(run.journal_dir).pending()
    assert entry["request_id"] == str(exc.value)
    return run, str(exc.value)


OPENERS = {
    "status": lambda run, tmp: cli.main(["status", "--run", str(run.root)]),
    "history": lambda run, tmp: cli.main(["history", "--run", str(run.root)]),
    "verify": lambda run, tmp: cli.main(["verify", "--run", str(run.root)]),
    "verify --erasure": lambda run, tmp: cli.main(["verify", "--erasure", "--run", str(run.root)]),
    "train --resume": lambda run, tmp: cli.main(["train", "--resume", "--run", str(run.root)]),
    "predict": lambda run, tmp: cli.main(
        ["predict", "--run", str(run.root), "--data", str(tmp / "x.csv"), "--out", str(tmp / "p.csv")]
    ),
    "SisaClassifier.load": lambda run, tmp: SisaClassifier.load(run.root) and 0,
    "delete (another record)": lambda run, tmp: cli.main(["delete", "--run", str(run.root), "5"]),
    "repair": lambda run, tmp: cli.main(["repair", "--run", str(run.root)]),
}


@pytest.fixture(scope="module")
def int_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("openers")
    df = make_tabular(200, seed=1, n_features=6, n_classes=3, string_labels=True)
    base = train_run(root / "base", df, CONFIG)
    ref = copy_run(base, root / "ref")
    delete(ref.root, [3, 17])
    ref5 = copy_run(ref, root / "ref5")
    delete(ref5.root, [5])
    df.drop(columns=["label"]).head(20).to_csv(root / "x.csv", index=False)
    return base, ref, ref5, root


@pytest.mark.parametrize("opener", list(OPENERS))
def test_every_command_that_opens_a_run_replays_pending_deletions_first(opener, int_runs, tmp_path):
    base, ref, ref5, root = int_runs
    shutil.copy(root / "x.csv", tmp_path / "x.csv")
    run, request = pending_run(base, tmp_path / "r", [3, 17])
    assert OPENERS[opener](run, tmp_path) == 0
    entry = Journal(run.journal_dir).get(request)
    assert entry["status"] == "applied"
    assert_runs_identical(run, ref5 if opener.startswith("delete") else ref)
    assert not run.index().active["record_id"].isin([3, 17]).any()


def test_history_lists_every_request_as_table_csv_and_json(int_runs, tmp_path, capsys):
    base = int_runs[0]
    run = copy_run(base, tmp_path / "r")
    r1 = delete(run.root, [3, 17])
    r2 = delete(run.root, [5])
    rows = deletion_log(run.root)
    assert [r["request_id"] for r in rows] == [r1["request_id"], r2["request_id"]]
    first = rows[0]
    assert list(first) == COLUMNS
    assert first["status"] == "applied" and first["records"] == 2 and first["subjects"] == 0
    assert first["shards"] == sorted(int(s) for s in r1["shards_retrained"])
    assert first["slices_retrained"] == r1["slices_retrained"]
    assert first["seconds"] == r1["seconds"] and first["generation"] == r1["generation"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["requested_utc"])
    assert first["applied_utc"] >= first["requested_utc"]

    assert cli.main(["history", "--run", str(run.root), "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [t["request_id"] for t in table] == [r1["request_id"], r2["request_id"]]
    assert table[0]["slices_retrained"] == " ".join(
        f"{s}:{v[0]}-{v[-1]}" if len(v) > 1 else f"{s}:{v[0]}" for s, v in r1["slices_retrained"].items()
    )
    assert cli.main(["history", "--run", str(run.root), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert cli.main(["history", "--run", str(run.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == COLUMNS and len(lines) == 3 and r2["request_id"] in lines[2]


def test_history_shows_a_request_pending_while_another_writer_holds_the_lock(int_runs, tmp_path):
    from sisa.store.files import writer_lock

    run, request = pending_run(int_runs[0], tmp_path / "r", [3])
    with writer_lock(run.root):  # the writer applying it: history must not wait, and shows it pending
        (row,) = deletion_log(run.root)
    assert row["status"] == "pending" and row["applied_utc"] is None and row["seconds"] is None
    assert "pending" in format_log([row], "table")
    assert format_log([row], "csv").splitlines()[1].split(",")[3] == ""  # no applied time yet


def test_history_rejects_an_unknown_format():
    with pytest.raises(UsageError, match=r"^fmt: expected one of table, csv, json, got 'xml'$"):
        format_log([], "xml")
    assert format_log([], "table") == "no deletion or addition requests\n"


def test_a_crash_leaving_a_pending_request_keeps_its_shards_out_of_serving(int_runs, tmp_path):
    run, _ = pending_run(int_runs[0], tmp_path / "r", [3])
    clf = SisaClassifier(run.config(), run_dir=run.root)
    pending = Journal(run.journal_dir).pending_shards()
    assert pending and set(clf.ensemble().shards).isdisjoint(pending)
    x = np.zeros((1, 6), dtype=np.float32)
    SisaClassifier.load(run.root).predict(x)  # load replays it
    assert Journal(run.journal_dir).pending() == []


def test_train_resume_on_a_consistent_run_changes_nothing(int_runs, tmp_path):
    run = copy_run(int_runs[1], tmp_path / "r")
    before = run.manifest()
    _, report = train(run.root, None, resume=True)
    assert report.jobs == [] and report.generation == before["generation"]
    assert run.manifest() == before


def test_the_parsed_entry_cache_is_bounded_and_stays_right(tmp_path, monkeypatch):
    from sisa.store import journal as journal_module

    monkeypatch.setattr(journal_module, "_CACHE", {})
    monkeypatch.setattr(journal_module, "_MAX_CACHED", 2)
    paths = []
    for n in range(5):
        p = tmp_path / f"e{n}.json"
        p.write_text(json.dumps({"n": n}))
        paths.append(p)
    for _ in range(2):
        assert [journal_module._read_entry(p)["n"] for p in paths] == list(range(5))
        assert len(journal_module._CACHE) <= 2


def test_applied_entries_are_filed_away_and_the_open_questions_never_read_them(
    int_runs, tmp_path, monkeypatch
):
    from sisa.store import journal as journal_module

    run = RunDir(tmp_path / "run")
    shutil.copytree(int_runs[0].root, run.root)
    ids = list(run.index().active["record_id"][:3])
    receipts = [delete(run.root, [i]) for i in ids]
    journal = Journal(run.journal_dir)
    filed = sorted(p.name for p in (run.journal_dir / "applied").iterdir())
    assert filed == sorted(f"{r['request_id']}.json" for r in receipts)
    assert not list(run.journal_dir.glob("*.json"))  # the open folder holds open requests only
    assert [e["request_id"] for e in journal.entries()] == [r["request_id"] for r in receipts]
    assert journal.get(receipts[1]["request_id"])["status"] == "applied"
    read = []
    real = journal_module._read_entry
    monkeypatch.setattr(journal_module, "_read_entry", lambda p: read.append(p) or real(p))
    assert journal.pending() == [] and journal.rolled_back() == [] and journal.pending_shards() == set()
    assert read == []  # no stat, no parse: the cost of a deletion does not grow with the history


def test_an_applied_entry_left_in_the_open_folder_reads_applied_and_is_filed_by_the_next_writer(
    int_runs, tmp_path
):
    """A crash between the applied write and its rename, or a run from before journal/applied/."""
    run = RunDir(tmp_path / "run")
    shutil.copytree(int_runs[0].root, run.root)
    first = delete(run.root, list(run.index().active["record_id"][:1]))
    journal = Journal(run.journal_dir)
    rid = first["request_id"]
    os.replace(journal.filed_path(rid), journal.path(rid))
    assert [e["request_id"] for e in journal.unfiled()] == [rid]
    assert journal.pending() == [] and [e["status"] for e in journal.entries()] == ["applied"]
    second = delete(run.root, list(run.index().active["record_id"][:1]))  # its writer session files it away
    assert journal.unfiled() == [] and not journal.path(rid).exists()
    assert [e["request_id"] for e in journal.entries()] == [rid, second["request_id"]]
    os.replace(journal.filed_path(rid), journal.path(rid))
    assert [r["request_id"] for r in deletion_log(run.root)] == [rid, second["request_id"]]  # listed once
    assert journal.unfiled() == []  # a reader replays when no writer holds the lock
