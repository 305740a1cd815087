"""README "Your own data": every command of the section, run as written (in a temporary folder), from the sample
table to a raw JSON record served over HTTP."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest

from sisa.cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks(title: str) -> list[tuple[str, str]]:
    text = README.read_text()
    body = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S)


def commands(block: str) -> list[list[str]]:
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        out.append([w for w in words if w != "&"])
    return [w for w in out if w]


def test_your_own_data_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sisa.serving.app import create_app

    (lang1, sample), (lang2, config), (lang3, steps) = section_blocks("Your own data")
    assert (lang1, lang2, lang3) == ("bash", "yaml", "bash")
    monkeypatch.chdir(tmp_path)
    (python_c,) = commands(sample)
    assert python_c[:2] == ["python", "-c"]
    exec(python_c[2], {})  # the sample table, as the README makes it
    Path("churn.yaml").write_text(config)
    served = None
    for argv in commands(steps):
        if argv[0] == "sisa" and argv[1] == "serve":
            served = TestClient(create_app(argv[argv.index("--run") + 1]))
            continue
        if argv[0] == "curl":
            body = json.loads(argv[argv.index("-d") + 1])
            assert served is not None and argv[2].endswith("/predict")
            r = served.post("/predict", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0] in ("no", "yes")
            continue
        assert argv[0] == "sisa", argv
        code = main(argv[1:])
        out, err = capsys.readouterr()
        assert code == 0, (argv, err)
    assert served is not None
    preds = pd.read_csv("churn-preds.csv")
    assert len(preds) == 400 and list(preds.columns[:2]) == ["row", "prediction"]
    assert "Town-" not in Path("customers.schema.yaml").read_text()  # rare values are never written


def test_adding_records_runs_as_written(tmp_path, monkeypatch, capsys):
    """README "Adding records": every command, as written; the one marked "refused" must fail and change nothing."""
    (lang1, sample), (lang2, config), (lang3, steps) = section_blocks("Adding records")
    assert (lang1, lang2, lang3) == ("bash", "yaml", "bash")
    monkeypatch.chdir(tmp_path)
    (python_c,) = commands(sample)
    exec(python_c[2], {})
    Path("grow.yaml").write_text(config)
    lines = [ln for ln in steps.splitlines() if ln.strip()]
    assert len(lines) == 7
    for line in lines:
        (argv,) = commands(line)
        code = main(argv[1:])
        out, err = capsys.readouterr()
        if "# refused" in line:
            assert code == 2 and err.startswith("sisa: error: rows 0 (record ID, content) of the batch"), err
            assert "595" not in err
        else:
            assert code == 0, (argv, err)
        if argv[1] == "history":
            kinds = [row.split()[1] for row in out.splitlines()[1:]]
            assert kinds == ["add", "delete", "add"]
        if argv[1] == "verify":
            assert out.splitlines()[-1].startswith("verified 3 shard(s)")


def test_forget_now_retrain_later_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    (lang1, config), (lang2, steps) = section_blocks("Forget now, retrain later")
    assert (lang1, lang2) == ("yaml", "bash")
    monkeypatch.chdir(tmp_path)
    Path("toy.yaml").write_text(config)
    outputs = {}
    for argv in commands(steps):
        if argv[0] == "python":
            exec(argv[2], {})
            continue
        assert argv[0] == "sisa", argv
        if argv[1] == "serve":
            from fastapi.testclient import TestClient

            from sisa.serving.app import create_app
            from sisa.serving.server import Server

            rt = [argv[i + 1] for i, w in enumerate(argv) if w == "--set"]
            with TestClient(create_app(Server(argv[argv.index("--run") + 1], runtime=rt))) as c:
                assert c.get("/status").json()["shards_rolled_back"] == []
            continue
        code = main(argv[1:])
        out, err = capsys.readouterr()
        assert code == 0, (argv, err)
        outputs.setdefault(argv[1], []).append(out)
    assert "rolled back, retrain pending" in outputs["delete"][0]
    assert re.search(r"shard \d: (rolled back to slice \d|out \(slice 0 hit\)) since ", outputs["status"][0])
    assert "test accuracy" in outputs["status"][0]
    assert "rolled back to slice" in outputs["verify"][0] or "out until caught up" in outputs["verify"][0]
    assert outputs["retrain"][0] == "nothing to retrain: no shard is due\n"
    assert outputs["retrain"][1].startswith("caught up shard(s) ")
