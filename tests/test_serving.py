"""HTTP serving (issue 4): exact predictions, auth, strict forgetting while retraining, bad input -> 4xx."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from sisa import session, unlearning
from sisa.cli.main import main
from sisa.estimator import SisaClassifier
from sisa.exceptions import UsageError
from sisa.serving import worker as serving_worker
from sisa.serving.app import create_app, listen_socket, resolve_token
from sisa.serving.schema import ServerSettings
from sisa.serving.state import ServingState
from sisa.store.files import writer_lock
from sisa.store.journal import Journal
from sisa.store.rundir import RunDir
from sisa.tables.datasets import make_subjects, make_tabular

from .conftest import assert_runs_identical, small_config, train_run

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's TestClient warns about httpx vs httpx2
    from fastapi.testclient import TestClient

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FEATURES = [f"x{j}" for j in range(6)]
SERVING_CFG = {"sharding": {"shards": 4, "slices": 2}}


@pytest.fixture(scope="module")
def data():
    return make_tabular(600, seed=1, n_features=6, n_classes=3, string_labels=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, data):
    """One trained run (4 shards x 2 slices); each test serves a copy of it."""
    return train_run(tmp_path_factory.mktemp("pristine") / "run", data, small_config(**SERVING_CFG)).root


@pytest.fixture
def run_dir(tmp_path, pristine):
    shutil.copytree(pristine, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def client(run_dir):
    with TestClient(create_app(run_dir, ServerSettings(token=TOKEN))) as c:
        yield c


def _probabilities(body: dict, classes: list) -> np.ndarray:
    return np.array([[p[str(c)] for c in classes] for p in body["probabilities"]], dtype=np.float32)


def _shard_of(run_dir, ids: list[int]) -> dict[int, int]:
    active = RunDir(run_dir).index().active.set_index("record_id")
    return {i: int(active.loc[i, "shard"]) for i in ids}


def _ids_in_shards(run_dir, shards: list[int]) -> list[int]:
    active = RunDir(run_dir).index().active
    return [int(active.loc[active["shard"] == s, "record_id"].iloc[0]) for s in shards]


def _disk_state(run_dir) -> tuple:
    run = RunDir(run_dir)
    return run.manifest()["generation"], len(Journal(run.journal_dir).entries()), len(run.index().active)


def _wait_applied(client, request_id: str, timeout: float = 30.0, route: str = "deletions") -> dict:
    """Poll ``GET /<route>/<request id>`` (deletions or records) until the request is applied."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/{route}/{request_id}", headers=AUTH).json()
        if body["status"] == "applied":
            return body
        time.sleep(0.02)
    raise AssertionError(f"request {request_id} not applied within {timeout} s")


def hold(monkeypatch, module, name: str) -> threading.Event:
    """Patch ``module.name`` so that every call waits (after the request's journal entry) until the returned event
    is set."""
    release, real = threading.Event(), getattr(module, name)

    def slow(*args, **kw):
        assert release.wait(30), "test never released the retrain"
        return real(*args, **kw)

    monkeypatch.setattr(module, name, slow)
    return release


@pytest.fixture
def held_retrain(monkeypatch):
    """Make every deletion stop after its journal entry (acknowledged) until ``release`` is set."""
    release = hold(monkeypatch, unlearning, "roll_back")
    yield release
    release.set()


# ---- predictions ----------------------------------------------------------------------------------------------
def test_predict_equals_the_classifier_exactly(client, run_dir, data):
    clf = SisaClassifier.load(run_dir)
    rows = data.iloc[:40]
    expected = clf.predict_proba(rows)
    as_dicts = client.post("/predict", json={"instances": rows[FEATURES].to_dict("records")})
    as_lists = client.post("/predict", json={"instances": rows[FEATURES].to_numpy().tolist()})
    for r in (as_dicts, as_lists):
        assert r.status_code == 200, r.text
        body = r.json()
        assert np.array_equal(_probabilities(body, clf.classes_), expected)  # bit-exact, not approximate
        assert body["predictions"] == list(clf.predict(rows))
        assert body["generation"] == 1
        assert body["shards"] == [0, 1, 2, 3]
    assert list(as_dicts.json()["probabilities"][0]) == ["a", "b", "c"]


def test_concurrent_predictions_match_sequential_ones(run_dir):
    """Predictions run in parallel on a pool of copies of one snapshot's ensemble; each answer is the sequential one."""
    state = ServingState(run_dir, ServerSettings(pool_size=3))
    snap = state.snapshot()
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(int(rng.integers(1, 40)), 6)).astype(np.float32) for _ in range(24)]
    expected = [snap.predict_proba(X) for X in batches]
    wrong: list[int] = []

    def work(k: int) -> None:
        for i in range(k, len(batches), 6):
            for _ in range(5):
                if not np.array_equal(snap.predict_proba(batches[i]), expected[i]):
                    wrong.append(i)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert 1 <= snap._pool.made <= 3


def test_openapi_schema_is_exact_for_the_run(client):
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/deletions", "/deletions/{request_id}", "/status", "/health"} <= set(schema["paths"])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    ref = body["$ref"].split("/")[-1]
    instances = schema["components"]["schemas"][ref]["properties"]["instances"]
    assert instances["maxItems"] == 1024 and instances["minItems"] == 1
    by_name, as_list = instances["items"]["oneOf"]
    assert by_name["required"] == FEATURES and by_name["additionalProperties"] is False
    assert as_list["minItems"] == as_list["maxItems"] == 6


BAD_PREDICT = [
    ('{"instances": [[1, 2, 3]]}', "invalid instances: instances[0]: expected 6 feature values (in training order), got 3"),
    ('{"instances": [[NaN, 1, 2, 3, 4, 5]]}', "invalid instances: instances[0].x0: NaN or infinite value; features must be finite numbers"),
    ('{"instances": [[1, 2, 3, 4, 5, Infinity]]}', "invalid instances: instances[0].x5: NaN or infinite value; features must be finite numbers"),
    ('{"instances": [[1, 2, 3, 4, 5, 1e39]]}', "invalid instances: instances[0].x5: 1e+39 is outside the float32 range; features must be finite numbers"),
    ('{"instances": [["NaN", 1, 2, 3, 4, 5]]}', "invalid instances: instances[0].x0: expected a number, got a string 'NaN'"),
    ('{"instances": [[1, 2, true, 3, 4, 5]]}', "invalid instances: instances[0].x2: expected a number, got a boolean (true)"),
    ('{"instances": [[1, 2, null, 3, 4, 5]]}', "invalid instances: instances[0].x2: expected a number, got null"),
    ('{"instances": ["abc"]}', "invalid instances: instances[0]: expected an object of named features or a list of 6 numbers, got a string 'abc'"),
    ('{"instances": [{"x0": 1, "x1": 2, "x2": 3, "x3": 4, "x4": 5, "x5": 6, "y": 7}]}', "invalid instances: instances[0]: unknown feature columns ['y']; expected exactly ['x0', 'x1', 'x2', 'x3', 'x4', 'x5']"),
    ('{"instances": [{"x0": 1}]}', "invalid instances: instances[0]: missing feature columns ['x1', 'x2', 'x3', 'x4', 'x5']; expected exactly ['x0', 'x1', 'x2', 'x3', 'x4', 'x5']"),
    ('{"instances": [[1, 2, 3], [1, 2, 3, 4, 5, 6], [true, 1, 1, 1, 1, 1]]}', "invalid instances: 2 problems, first: instances[0]: expected 6 feature values (in training order), got 3"),
    ('{"instances": [[0, 3e38, -3e38, 3e38, -3e38, 3e38], [0, 0, 0, 0, 0, 0]]}', "the model's output is not finite for instances [0]: feature values far outside the training range overflow it"),
    ('{"instances": []}', "empty batch: send at least one instance in 'instances'"),
    ('{"instances": 5}', "invalid request: instances: Input should be a valid list"),
    ('{"rows": [[1, 2, 3, 4, 5, 6]]}', "invalid request: instances: Field required"),
    ('{"instances": [[1, 2, 3, 4, 5, 6]], "extra": 1}', "invalid request: extra: Extra inputs are not permitted"),
    ('{"instances": [[1, 2', "invalid request: the body is not valid JSON: Expecting ',' delimiter at character 20"),
    ("[" * 50_000, "There was an error parsing the body"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "message"), BAD_PREDICT)
def test_bad_predict_input_is_a_4xx_with_a_reason(client, run_dir, body, message):
    before = _disk_state(run_dir)
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    assert r.json()["error"] == message
    assert _disk_state(run_dir) == before


def test_batch_and_body_limits(run_dir):
    app = create_app(run_dir, ServerSettings(max_batch=4, max_body_bytes=2000))
    with TestClient(app) as c:
        r = c.post("/predict", json={"instances": [[0.0] * 6] * 5})
        assert r.status_code == 422
        assert r.json()["error"] == "too many instances: 5 exceed this server's limit of 4 per request"
        big = b'{"instances": [' + b"0," * 1500 + b"0]}"
        r = c.post("/predict", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert (
            r.json()["error"] == "request body too large: 3018 bytes exceed this server's limit of 2000 bytes"
        )

        def chunks():  # no Content-Length: the limit must hold for a streamed body too
            yield b'{"instances": ['
            for _ in range(300):
                yield b"0.0,0.0,0.0,"
            yield b"0]}"

        r = c.post("/predict", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"].startswith("request body too large: ")
        assert c.post("/predict", json={"instances": [[0.0] * 6] * 4}).status_code == 200


# ---- deletions: auth and validation ---------------------------------------------------------------------------
def test_deletions_disabled_without_a_token(run_dir, monkeypatch):
    monkeypatch.delenv("SISA_TOKEN", raising=False)
    before = _disk_state(run_dir)
    with TestClient(create_app(run_dir, ServerSettings(token=resolve_token(None)))) as c:
        r = c.post("/deletions", json={"record_ids": [1]}, headers=AUTH)
        assert r.status_code == 403
        assert r.json()["error"] == (
            "deletions are disabled on this server: no token is configured "
            "(set SISA_TOKEN or start it with --token-file)"
        )
        assert c.get("/status").json()["deletions_enabled"] is False
    assert _disk_state(run_dir) == before


def test_missing_or_wrong_token_changes_nothing(client, run_dir):
    before = _disk_state(run_dir)
    r = client.post("/deletions", json={"record_ids": [1]})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"] == "missing bearer token: send 'Authorization: Bearer <token>'"
    for header in ({"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = client.post("/deletions", json={"record_ids": [1]}, headers=header)
        assert r.status_code in (401, 403)
    assert client.post(
        "/deletions", json={"record_ids": [1]}, headers={"Authorization": "Bearer x"}
    ).json() == {"error": "invalid bearer token"}
    assert client.get("/deletions/del-x", headers={"Authorization": "Bearer x"}).status_code == 403
    assert _disk_state(run_dir) == before


def test_unknown_ids_are_listed_and_nothing_changes(client, run_dir):
    before = _disk_state(run_dir)
    r = client.post("/deletions", json={"record_ids": [3, 100000, "nobody"]}, headers=AUTH)
    assert r.status_code == 404
    assert r.json() == {
        "error": "unknown record IDs, nothing was changed: 100000, 'nobody'",
        "unknown_ids": [100000, "nobody"],
        "kind": "record",
    }
    assert _disk_state(run_dir) == before


BAD_DELETE = [
    ({}, "invalid deletion request: give at least one ID in 'record_ids'"),
    ({"record_ids": []}, "invalid deletion request: give at least one ID in 'record_ids'"),
    ({"record_ids": [1.5]}, "invalid deletion request: record_ids[0]: IDs must be integers or strings of 1..256 characters, got a number (1.5)"),
    ({"record_ids": [True]}, "invalid deletion request: record_ids[0]: IDs must be integers or strings of 1..256 characters, got a boolean (true)"),
    ({"record_ids": [""]}, "invalid deletion request: record_ids[0]: IDs must be integers or strings of 1..256 characters, got a string of 0 characters"),
    ({"record_ids": [[1]]}, "invalid deletion request: record_ids[0]: IDs must be integers or strings of 1..256 characters, got a list"),
    ({"record_ids": 1}, "invalid request: record_ids: Input should be a valid list"),
    ({"subject_ids": ["p1"]}, "invalid deletion request: subject_ids: this run has no data.subject_column; delete by record ID"),
    ({"record_ids": [1], "ids": [2]}, "invalid request: ids: Extra inputs are not permitted"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "message"), BAD_DELETE)
def test_bad_deletion_request_is_a_422(client, run_dir, body, message):
    before = _disk_state(run_dir)
    r = client.post("/deletions", json=body, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["error"] == message
    assert _disk_state(run_dir) == before


def test_unknown_request_id_is_404(client):
    for rid in ("del-20200101T000000-00000000", "..", "a" * 300):
        r = client.get(f"/deletions/{rid}", headers=AUTH)
        assert r.status_code == 404
    assert r.json() == {"error": f"unknown deletion request {'a' * 300!r}"}


# ---- strict forgetting ----------------------------------------------------------------------------------------
def test_accepted_deletion_excludes_its_shards_until_retrained(client, run_dir, data, held_retrain):
    victims = _ids_in_shards(run_dir, [1, 3])
    rows = {"instances": data[FEATURES].iloc[:8].to_numpy().tolist()}
    r = client.post("/deletions", json={"record_ids": victims}, headers=AUTH)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "pending" and accepted["shards"] == [1, 3] and accepted["records"] == 2
    # accepted implies excluded: the retrain is still held, yet shards 1 and 3 no longer vote
    during = client.post("/predict", json=rows).json()
    assert (during["generation"], during["shards"]) == (1, [0, 2])
    st = client.get("/status").json()
    assert (st["shards_serving"], st["shards_retraining"], st["deletions_pending"]) == ([0, 2], [1, 3], 1)
    assert client.get(f"/deletions/{accepted['request_id']}", headers=AUTH).json()["status"] == "pending"
    held_retrain.set()
    done = _wait_applied(client, accepted["request_id"])
    assert done["receipt"]["generation"] == 3 and done["receipt"]["records_deleted"] == 2
    after = client.post("/predict", json=rows).json()
    assert (after["generation"], after["shards"]) == (3, [0, 1, 2, 3])
    expected = SisaClassifier.load(run_dir).predict_proba(data.iloc[:8])
    assert np.array_equal(_probabilities(after, ["a", "b", "c"]), expected)
    again = client.post("/deletions", json={"record_ids": victims}, headers=AUTH)
    assert again.status_code == 200
    assert again.json() == {
        "request_id": None,
        "status": "already_deleted",
        "records_deleted": 0,
        "already_deleted": victims,
    }
    st = client.get("/status").json()
    assert (st["records_active"], st["records_deleted"], st["shards_retraining"]) == (598, 2, [])


def test_a_202_names_the_ids_of_the_request_that_were_already_deleted(client, run_dir):
    first, second = _ids_in_shards(run_dir, [0, 2])
    r = client.post("/deletions", json={"record_ids": [first]}, headers=AUTH)
    assert r.status_code == 202 and r.json()["already_deleted"] == []
    _wait_applied(client, r.json()["request_id"])
    r = client.post("/deletions", json={"record_ids": [first, second]}, headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["already_deleted"], body["records"], body["shards"]) == ([first], 1, [2])
    done = _wait_applied(client, body["request_id"])
    assert "already_deleted" not in Journal(Path(run_dir, "journal")).get(
        body["request_id"]
    )  # IDs never stored
    assert done["receipt"]["records_deleted"] == 1


def test_a_failed_retrain_is_replayed_with_backoff_until_it_succeeds(run_dir, pristine, data, monkeypatch):
    """A disk error after the acknowledgement: the shard stays out and the error is shown; the worker replays the
    deletion by itself (twice failing, then applied), with no restart and no further deletion."""
    monkeypatch.setattr(serving_worker, "RETRY_FIRST_S", 0.05)
    real, calls = unlearning.roll_back, []

    def flaky(*args, **kw):
        calls.append(time.monotonic())
        if len(calls) <= 3:  # the request's own retrain and the first two replays
            raise OSError(28, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(unlearning, "roll_back", flaky)  # the request's own retrain
    monkeypatch.setattr(session, "roll_back", flaky)  # the worker's replays
    victim = _ids_in_shards(run_dir, [2])
    with TestClient(create_app(run_dir, ServerSettings(token=TOKEN))) as client:
        r = client.post("/deletions", json={"record_ids": victim}, headers=AUTH)
        assert r.status_code == 202, r.text
        request_id = r.json()["request_id"]
        body = client.get(f"/deletions/{request_id}", headers=AUTH).json()
        assert body["status"] == "pending" and "No space left on device" in body["error"]
        assert client.get("/status").json()["shards_retraining"] == [2]
        done = _wait_applied(client, request_id)
        assert "error" not in done and done["receipt"]["records_deleted"] == 1
        st = client.get("/status").json()
        assert (st["shards_retraining"], st["shards_serving"], st["deletions_pending"]) == (
            [],
            [0, 1, 2, 3],
            0,
        )
    assert len(calls) == 4
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps[2] >= 0.2 - 0.01 and gaps[1] >= 0.1 - 0.01  # waits double: 0.05, 0.1, 0.2
    reference = RunDir(shutil.copytree(pristine, run_dir.parent / "reference"))
    monkeypatch.setattr(unlearning, "roll_back", real)
    unlearning.delete(reference.root, victim)
    assert_runs_identical(RunDir(run_dir), reference)


def test_every_shard_retraining_answers_503(client, run_dir, held_retrain):
    r = client.post("/deletions", json={"record_ids": _ids_in_shards(run_dir, [0, 1, 2, 3])}, headers=AUTH)
    assert r.status_code == 202 and r.json()["shards"] == [0, 1, 2, 3]
    p = client.post("/predict", json={"instances": [[0.0] * 6]})
    assert p.status_code == 503
    assert p.json() == {
        "error": "no shard is serving: every shard is retraining after an accepted deletion (or is empty); "
        "retry once the retrain finishes",
        "shards_retraining": [0, 1, 2, 3],
    }
    held_retrain.set()
    _wait_applied(client, r.json()["request_id"])
    p = client.post("/predict", json={"instances": [[0.0] * 6]})
    assert p.status_code == 200 and p.json()["shards"] == [0, 1, 2, 3]


def test_run_locked_by_another_writer_is_a_409(run_dir):
    before = _disk_state(run_dir)
    with TestClient(create_app(run_dir, ServerSettings(token=TOKEN, delete_wait_s=0.1))) as c:
        with writer_lock(run_dir, 0.0, "test"):
            r = c.post("/deletions", json={"record_ids": [1]}, headers=AUTH)
        assert r.status_code == 409
        assert r.json()["error"].startswith(f"run {run_dir} is locked by another sisa process")
        assert r.json()["error"].endswith("; nothing changed: retry later")
    assert _disk_state(run_dir) == before


def test_a_deletion_that_waits_too_long_in_the_queue_is_withdrawn(run_dir, held_retrain):
    with TestClient(create_app(run_dir, ServerSettings(token=TOKEN, ack_timeout_s=0.3))) as c:
        first = c.post("/deletions", json={"record_ids": _ids_in_shards(run_dir, [0])}, headers=AUTH)
        assert first.status_code == 202  # acknowledged; its retrain is held, so the queue is blocked
        second = c.post("/deletions", json={"record_ids": _ids_in_shards(run_dir, [1])}, headers=AUTH)
        assert second.status_code == 503
        assert second.json() == {
            "error": "the deletion queue is busy; the request was withdrawn and nothing changed: retry later"
        }
        held_retrain.set()
        _wait_applied(c, first.json()["request_id"])
        assert (
            c.get("/status").json()["deletion_requests"] == 1
        )  # the withdrawn one never reached the journal


def test_deletion_by_another_process_is_honoured(client, run_dir):
    """`sisa delete` journals outside the server; the next request must already leave its shard out."""
    victim = _ids_in_shards(run_dir, [2])[0]
    seen = {}

    def on_ack(entry):  # the journal entry is fsynced, the retrain has not started
        seen["during"] = client.post("/predict", json={"instances": [[0.0] * 6]}).json()

    unlearning.delete(run_dir, [victim], on_ack=on_ack)
    assert seen["during"]["shards"] == [0, 1, 3] and seen["during"]["generation"] == 1
    after = client.post("/predict", json={"instances": [[0.0] * 6]}).json()
    assert (after["generation"], after["shards"]) == (3, [0, 1, 2, 3])


def test_start_replays_a_deletion_left_pending_by_a_crash(run_dir):
    victim = _ids_in_shards(run_dir, [0])[0]

    def crash(entry):
        raise KeyboardInterrupt  # dies right after the acknowledgement: journal pending, nothing applied

    with pytest.raises(KeyboardInterrupt):
        unlearning.delete(run_dir, [victim], on_ack=crash)
    assert len(Journal(RunDir(run_dir).journal_dir).pending()) == 1
    with TestClient(create_app(run_dir)) as c:
        assert c.app.state.sisa.state.recovered[0]["records_deleted"] == 1
        st = c.get("/status").json()
        assert (st["generation"], st["deletions_pending"], st["shards_serving"]) == (3, 0, [0, 1, 2, 3])
        assert c.get("/health").json() == {"status": "ok", "generation": 3, "shards_serving": 4}


def test_delete_by_subject_over_http(tmp_path):
    people = make_subjects(240, 24, seed=3, n_features=6)
    cfg = small_config(data={"subject_column": "subject_id"}, sharding={"shards": 3, "slices": 2})
    run = train_run(tmp_path / "run", people, cfg)
    with TestClient(create_app(run.root, ServerSettings(token=TOKEN))) as c:
        r = c.post("/deletions", json={"subject_ids": ["person-00001", "nobody"]}, headers=AUTH)
        assert r.status_code == 404 and r.json()["unknown_ids"] == ["nobody"]
        r = c.post("/deletions", json={"subject_ids": ["person-00001"]}, headers=AUTH)
        assert r.status_code == 202, r.text
        rows = int((people["subject_id"] == "person-00001").sum())
        assert r.json()["records"] == rows
        _wait_applied(c, r.json()["request_id"])
        assert c.get("/status").json()["records_active"] == 240 - rows


# ---- command line -------------------------------------------------------------------------------------------
def test_token_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("SISA_TOKEN", "  from-env \n")
    assert resolve_token(None) == "from-env"
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert resolve_token(f) == "from-file"
    f.write_text("\n")
    with pytest.raises(UsageError, match="^token_file: .* is empty$"):
        resolve_token(f)
    monkeypatch.setenv("SISA_TOKEN", "")
    assert resolve_token(None) is None


def test_cli_serve_refuses_bad_flags(tmp_path, run_dir, capsys):
    assert main(["serve", "--run", str(tmp_path / "nope")]) != 0
    assert "is not a sisa run" in capsys.readouterr().err
    assert main(["serve", "--run", str(run_dir), "--max-batch", "0", "--max-body-bytes", "-1"]) == 2
    err = capsys.readouterr().err
    assert "max_batch must be a positive integer, got 0" in err
    assert "max_body_bytes must be a positive integer, got -1" in err
    assert main(["serve", "--run", str(run_dir), "--port", "70000"]) == 2
    assert "sisa: error: --port: expected 0..65535, got 70000" in capsys.readouterr().err


def test_listen_socket_is_tcp_and_reports_a_busy_port():
    """proto IPPROTO_TCP is what makes asyncio set TCP_NODELAY (else ~40 ms per response, measured)."""
    sock = listen_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        port = sock.getsockname()[1]
        with pytest.raises(
            UsageError, match=f"^port: cannot listen on 127.0.0.1:{port}: Address already in use$"
        ):
            listen_socket("127.0.0.1", port)
    finally:
        sock.close()


def test_the_deletion_worker_starts_the_runs_retrain_workers_before_the_first_deletion(run_dir, monkeypatch):
    from sisa.serving import worker as worker_module

    warmed = threading.Event()
    seen = []
    monkeypatch.setattr(worker_module, "warm_workers", lambda config: seen.append(config) or warmed.set())
    worker = worker_module.DeletionWorker(RunDir(run_dir, ["training.n_jobs=2"]), gate=None)
    worker.start()
    try:
        assert warmed.wait(30)
        assert seen[0].training.n_jobs == 2  # the run's config with the server's runtime overrides
    finally:
        worker.stop()
