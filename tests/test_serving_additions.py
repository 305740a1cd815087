# ruff: noqa: F811 - the fixtures imported from tests.test_serving are redefined as test arguments
"""POST /records (issue 15): additions over HTTP, behind the deletion token, on the one writer thread; the touched
shards keep serving the current generation during the retrain and the new one swaps in whole."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sisa import intake
from sisa.estimator import SisaClassifier
from sisa.tables.datasets import make_tabular
from tests.test_serving import (  # noqa: F401 - fixtures
    AUTH,
    FEATURES,
    _probabilities,
    _wait_applied,
    client,
    data,
    hold,
    pristine,
    run_dir,
)


def _new_rows(n: int = 5, start: int = 10_000) -> list[dict]:
    df = make_tabular(n, seed=9, n_features=6, n_classes=3, string_labels=True)
    df["record_id"] = df["record_id"] + start
    return df.to_dict(orient="records")


def _wait(client, request_id: str, timeout: float = 30.0) -> dict:
    return _wait_applied(client, request_id, timeout, route="records")


@pytest.fixture
def held_addition(monkeypatch):
    """Every addition stops after its journal entry (acknowledged) until released."""
    release = hold(monkeypatch, intake, "apply_addition")
    yield release
    release.set()


def test_an_addition_is_journaled_then_swapped_in_while_every_shard_keeps_serving(
    client, run_dir, data, held_addition
):
    rows = {"instances": data[FEATURES].iloc[:8].to_numpy().tolist()}
    before = client.post("/predict", json=rows).json()
    r = client.post("/records", json={"records": _new_rows()}, headers=AUTH)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert (
        accepted["status"] == "pending" and accepted["records"] == 5 and accepted["allow_returning"] is False
    )
    assert accepted["request_id"].startswith("add-")
    during = client.post(
        "/predict", json=rows
    ).json()  # the old models never saw the new rows: all shards vote
    assert (during["generation"], during["shards"]) == (1, [0, 1, 2, 3])
    assert during["probabilities"] == before["probabilities"]
    st = client.get("/status").json()
    assert (st["shards_retraining"], st["additions_pending"], st["deletions_pending"]) == ([], 1, 0)
    assert client.get(f"/records/{accepted['request_id']}", headers=AUTH).json()["status"] == "pending"
    held_addition.set()
    done = _wait(client, accepted["request_id"])
    assert done["receipt"]["records_added"] == 5 and done["receipt"]["generation"] == 2
    after = client.post("/predict", json=rows).json()
    assert (after["generation"], after["shards"]) == (2, [0, 1, 2, 3])
    expected = SisaClassifier.load(run_dir).predict_proba(data.iloc[:8])
    assert np.array_equal(_probabilities(after, ["a", "b", "c"]), expected)
    assert client.get("/status").json()["records_active"] == 605


def test_refused_additions_change_nothing(client, run_dir):
    new = _new_rows(2)
    assert client.post("/records", json={"records": new}).status_code == 401
    active = {**new[0], "record_id": 7}
    r = client.post("/records", json={"records": [active, {**new[1], "label": "q"}]}, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["problems"][-1] == "column 'record_id': record IDs already active in the run: 7"
    assert client.post("/deletions", json={"record_ids": [7]}, headers=AUTH).status_code == 202
    time.sleep(0.1)
    back = {**active}
    deadline = time.monotonic() + 30
    while True:  # the deletion first (arrival order), then the re-import is refused by its tombstone
        r = client.post("/records", json={"records": [new[0], back]}, headers=AUTH)
        if r.status_code != 422 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.status_code == 409 and r.json()["rows"] == [1]
    assert "7" not in r.json()["error"]
    r = client.post("/records", json={"records": [new[0], back], "allow_returning": True}, headers=AUTH)
    assert r.status_code == 202
    done = _wait(client, r.json()["request_id"])
    assert done["receipt"]["returning_allowed"] is True
    assert client.get("/records/del-20200101T000000-00000000", headers=AUTH).status_code == 404
