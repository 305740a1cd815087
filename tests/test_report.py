"""The HTML report: embedded PNG plots that render, key numbers, no record IDs, written outside the run."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from sisa.cli.main import main
from sisa.evidence.report import build_report, deletion_history
from sisa.exceptions import UsageError
from sisa.tables.datasets import make_tabular
from sisa.unlearning import delete
from tests.conftest import small_config, train_run

PNG = re.compile(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A run with e-mail IDs and two deletion requests, and the deleted rows kept outside it."""
    tmp = tmp_path_factory.mktemp("report")
    full = make_tabular(800, seed=1, n_features=6, n_classes=3, id_kind="email", string_labels=True)
    train_df, test = full.iloc[:600].reset_index(drop=True), full.iloc[600:].reset_index(drop=True)
    test.to_parquet(tmp / "test.parquet")
    run = train_run(tmp / "run", train_df, small_config(data={"test": str(tmp / "test.parquet")}))
    gone = train_df.iloc[::20].reset_index(drop=True)  # 30 records
    delete(run.root, gone["record_id"].iloc[:10].tolist())
    delete(run.root, gone["record_id"].iloc[10:].tolist())
    gone.to_parquet(tmp / "deleted.parquet")
    return {"tmp": tmp, "run": run, "train": train_df, "gone": gone}


def test_report_embeds_rendered_plots_and_key_numbers(reported):
    tmp, run = reported["tmp"], reported["run"]
    path = build_report(run.root, tmp / "out", deleted=tmp / "deleted.parquet")
    assert path == tmp / "out" / "report.html"
    text = path.read_text()
    images = PNG.findall(text)
    assert [alt for alt, _ in images] == ["per-shard accuracy", "deletion history", "ROC curves"]
    for alt, data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.load()
        assert img.format == "PNG" and img.width > 400 and img.height > 200, alt
        assert sum(1 for c in img.convert("L").histogram() if c) > 10, f"{alt} is blank"
    for name in ("shards", "deletions", "roc"):
        assert (tmp / "out" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<td>records active / deleted</td><td>570 / 30</td>" in text
    assert "<td>deletion requests (pending)</td><td>2 (0)</td>" in text
    assert "<td>reference bit-identical to live ensemble</td><td>True</td>" in text
    assert "deleted records are indistinguishable from never-seen records" in text
    ids = reported["train"]["record_id"].tolist()
    assert not [i for i in ids if i in text], "the report must not contain record IDs"


def test_report_to_a_file_without_deleted_rows(reported):
    tmp, run = reported["tmp"], reported["run"]
    path = build_report(run.root, tmp / "single" / "r.html", reference=False)
    assert path == tmp / "single" / "r.html" and sorted(p.name for p in path.parent.iterdir()) == ["r.html"]
    text = path.read_text()
    assert len(PNG.findall(text)) == 3
    assert "<td>MIA AUC deleted vs unseen</td><td>not run</td>" in text
    assert "part (b) deleted-vs-unseen skipped" in text


def test_report_refuses_the_run_directory_when_given_deleted_rows(reported):
    tmp, run = reported["tmp"], reported["run"]
    with pytest.raises(UsageError) as err:
        build_report(run.root, run.root / "reports", deleted=tmp / "deleted.parquet")
    assert err.value.problems == [
        (
            "out",
            f"{run.root / 'reports' / 'report.html'}: results derived from deleted rows must be written outside the run",
        )
    ]
    assert not (run.root / "reports").exists()


def test_deletion_history_costs():
    entries = [
        {"request_id": "del-a", "status": "applied", "created": 0.0, "records": 2,
         "receipt": {"records_deleted": 2, "shards_retrained": {"0": 1}, "seconds": 0.5, "samples_retrained": 40}},
        {"request_id": "del-b", "status": "pending", "created": 1.0, "records": 1},
        {"request_id": "del-c", "status": "applied", "created": 2.0, "records": 3,
         "receipt": {"records_deleted": 3, "shards_retrained": {"0": 0, "1": 2}, "seconds": 1.5,
                     "samples_retrained": 90}},
    ]  # fmt: skip
    rows = deletion_history(entries, epochs=2.0, active_now=100)
    assert [r["request_id"] for r in rows] == ["del-a", "del-c"]
    assert [r["full_retrain_samples"] for r in rows] == [206, 200]  # the 3 records of del-c were still there
    assert [(r["records"], r["shards"], r["samples"]) for r in rows] == [(2, 1, 40), (3, 2, 90)]
    assert rows[0]["time"] == "1970-01-01 00:00:00"


def test_cli_report(reported, capsys):
    tmp, run = reported["tmp"], reported["run"]
    out = tmp / "cli.html"
    code = main(["report", "--run", str(run.root), "--out", str(out), "--deleted", str(tmp / "deleted.parquet"),
                 "--no-reference"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert len(PNG.findall(out.read_text())) == 3
