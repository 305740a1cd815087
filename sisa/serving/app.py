"""The HTTP layer of ``sisa serve``: FastAPI routes, auth, body limit, error mapping, and the uvicorn process.

The serving logic (snapshots, strict mode, the deletion worker) lives in :mod:`sisa.serving.state`; this module only
turns HTTP into calls on a :class:`~sisa.serving.state.ServingState` and every refusal into a JSON ``{"error": ...}``
with a 4xx status. (No ``from __future__ import annotations`` here: FastAPI reads the route annotations, and
the request models are built per run, as local classes.)
"""

import asyncio
import hmac
import os
import socket
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..exceptions import (
    ConfigError,
    DataError,
    ReturningRecordError,
    RunLockedError,
    UnknownRecordError,
    UsageError,
)
from ..store.journal import new_request_id
from .schema import (
    AdditionRequest,
    ApiError,
    ServerSettings,
    addition_rows,
    deletion_ids,
    instances_matrix,
    raw_instances_matrix,
    request_models,
    validation_problems,
)
from .server import Server
from .state import ServingState
from .worker import DeletionJob

DESCRIPTION = (
    "Aggregated SISA predictions with strict forgetting: once a deletion is accepted (202), no answer is "
    "computed by a shard model that saw a deleted record; each affected shard serves again once retrained."
)


def create_app(server: Server | str | Path, settings: ServerSettings | None = None) -> FastAPI:
    """A FastAPI app over one run directory (or an existing :class:`Server`)."""
    if not isinstance(server, Server):
        server = Server(server, settings)
    state = server.state
    has_subjects = bool(state.config.data.subject_column)
    schema = state.encoder.schema if state.encoder is not None else None
    PredictRequest, DeletionRequest = request_models(
        state.feature_names, state.settings, has_subjects, schema
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()

    app = FastAPI(title="sisa", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.sisa = server
    app.add_middleware(BodyLimit, limit=state.settings.max_body_bytes)
    _error_handlers(app)
    auth = _authorizer(state)
    labels = [str(c) for c in state.classes]

    @app.post("/predict", responses=_doc(422, 503), summary="predict with the serving shards")
    def predict(body: PredictRequest) -> JSONResponse:
        if state.encoder is not None:  # raw records, encoded like the training table
            X = raw_instances_matrix(body.instances, state.encoder, state.settings.max_batch)
        else:
            X = instances_matrix(body.instances, state.feature_names, state.settings.max_batch)
        try:  # one snapshot for the whole computation; recomputed if a deletion took one of its models out
            snap, proba = state.predict(X)
        except DataError as exc:  # e.g. |x| near float32 max overflows the logits
            raise ApiError(422, exc.problems[0]) from None
        rows = proba.tolist()
        return JSONResponse(
            {
                "predictions": [state.classes[i] for i in proba.argmax(axis=1)],
                "probabilities": [dict(zip(labels, r, strict=True)) for r in rows],
                "generation": snap.generation,
                "shards": snap.shards,
            }
        )

    @app.post(
        "/deletions",
        status_code=202,
        dependencies=[Depends(auth)],
        responses=_doc(200, 401, 403, 404, 409, 422, 503),
        summary="forget records; the affected shards stop voting before this answers",
    )
    async def deletions(body: DeletionRequest) -> JSONResponse:
        ids = deletion_ids(body.record_ids, body.subject_ids, has_subjects, state.settings.max_delete_ids)
        status, payload = await submit_deletion(server, *ids)
        return JSONResponse(payload, status)

    @app.get("/deletions/{request_id}", dependencies=[Depends(auth)], responses=_doc(401, 403, 404))
    def deletion(request_id: str) -> JSONResponse:
        return JSONResponse(server.deletion(request_id))

    @app.post(
        "/records",
        status_code=202,
        dependencies=[Depends(auth)],
        responses=_doc(401, 403, 409, 422, 503),
        summary="add rows; the touched shards keep serving the current generation until the retrained one swaps in",
    )
    async def records(body: AdditionRequest) -> JSONResponse:
        rows = addition_rows(body.records, state.settings.max_batch)
        job = DeletionJob(
            [], [], request_id=new_request_id("add"), rows=rows, allow_returning=body.allow_returning
        )
        await _decision(server, job)
        if job.entry is None:
            raise _refusal(job.error)
        return JSONResponse(
            {
                "request_id": job.entry["request_id"],
                "status": "pending",
                "shards": sorted(int(s) for s in job.entry["shards"]),
                "records": job.entry["records"],
                "allow_returning": job.entry["allow_returning"],
            },
            202,
        )

    @app.get("/records/{request_id}", dependencies=[Depends(auth)], responses=_doc(401, 403, 404))
    def addition(request_id: str) -> JSONResponse:
        return JSONResponse(server.deletion(request_id, kind="add"))

    @app.get("/status", summary="generation, shards serving / retraining, record counts")
    def status() -> JSONResponse:
        return JSONResponse(server.status())

    @app.get("/health", responses=_doc(503))
    def health() -> JSONResponse:
        snap = state.snapshot()
        ok = server.worker.alive()
        body = {
            "status": "ok" if ok else "deletion worker stopped",
            "generation": snap.generation,
            "shards_serving": len(snap.shards),
        }
        return JSONResponse(body, 200 if ok else 503)

    return app


def _authorizer(state: ServingState):
    bearer = HTTPBearer(
        auto_error=False, description="the server's deletion token (SISA_TOKEN / --token-file)"
    )

    async def authorized(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        token = state.settings.token
        if token is None:
            raise ApiError(
                403,
                "deletions are disabled on this server: no token is configured "
                "(set SISA_TOKEN or start it with --token-file)",
            )
        if creds is None:
            raise ApiError(
                401,
                "missing bearer token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise ApiError(403, "invalid bearer token")

    return authorized


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = validation_problems(list(exc.errors()))
        return JSONResponse({"error": f"invalid request: {problems[0]}", "problems": problems[:20]}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return JSONResponse({"error": "invalid request: the JSON body is nested too deeply"}, 422)


def _doc(*codes: int) -> dict:
    reasons = {
        200: "already deleted: nothing to do",
        401: "missing bearer token",
        403: "deletions disabled (no token configured) or invalid token",
        404: "unknown record / subject / request IDs (nothing changed)",
        409: "another process holds the run's writer lock (nothing changed)",
        413: "request body over the configured limit",
        422: "invalid input; the message says what was wrong (nothing changed)",
        503: "no shard can answer (all retraining) or the deletion queue is busy",
    }
    return {c: {"description": reasons[c]} for c in codes}


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413, whether declared or streamed (chunked)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await JSONResponse({"error": "invalid Content-Length header"}, 400)(scope, receive, send)
                return
            if int(declared) > self.limit:
                await self._too_large(int(declared), scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(size, scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, size: int, scope, receive, send) -> None:
        error = f"request body too large: {size} bytes exceed this server's limit of {self.limit} bytes"
        await JSONResponse({"error": error}, 413, headers={"Connection": "close"})(scope, receive, send)


# ---- deletions ----------------------------------------------------------------------------------------------
async def submit_deletion(server: Server, record_ids: list, subject_ids: list) -> tuple[int, dict]:
    """Queue a deletion and wait (without blocking the event loop) for its decision; (status, body)."""
    job = DeletionJob(record_ids, subject_ids)
    await _decision(server, job)
    if job.entry is not None:
        shards = sorted(int(s) for s in job.entry["shards"])
        return 202, {
            "request_id": job.entry["request_id"],
            "status": "pending",
            "shards": shards,
            "records": job.entry["records"],
            "already_deleted": job.entry.get("already_deleted", []),
        }
    if job.result is not None:
        return 200, {
            "request_id": None,
            "status": "already_deleted",
            "records_deleted": 0,
            "already_deleted": job.result.get("already_deleted", []),
        }
    raise _refusal(job.error)


async def _decision(server: Server, job: DeletionJob) -> None:
    """Queue a job on the one writer thread and wait (without blocking the event loop) until it is decided."""
    server.worker.submit(job)
    deadline = time.monotonic() + server.state.settings.ack_timeout_s
    delay = 0.0005
    while not job.decided.is_set():
        if time.monotonic() > deadline and server.worker.cancel(job):
            raise ApiError(
                503,
                "the deletion queue is busy; the request was withdrawn and nothing changed: retry later",
                headers={"Retry-After": "5"},
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)


def _refusal(exc: Exception | None) -> ApiError:
    if isinstance(exc, UnknownRecordError):
        return ApiError(404, str(exc), unknown_ids=exc.ids, kind=exc.kind)
    if isinstance(exc, (ConfigError, UsageError)):  # UsageError names the body's fields (record_ids, ...)
        return ApiError(422, str(exc))
    if isinstance(exc, DataError):  # an addition's rows do not fit the run (every problem listed)
        return ApiError(422, str(exc), problems=exc.problems)
    if isinstance(exc, ReturningRecordError):  # rows by position in the batch only, never an ID
        return ApiError(409, str(exc), rows=sorted(exc.rows))
    if isinstance(exc, RunLockedError):
        return ApiError(409, f"{exc}; nothing changed: retry later", headers={"Retry-After": "5"})
    return ApiError(500, f"the request failed before it was journaled; nothing changed: {exc}")


# ---- process ----------------------------------------------------------------------------------------------
def resolve_token(token_file: str | Path | None = None) -> str | None:
    """The deletion bearer token: from ``token_file`` if given, else ``$SISA_TOKEN``; None disables deletions."""
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise UsageError([("token_file", f"{path} does not exist")])
        token = path.read_text().strip()
        if not token:
            raise UsageError([("token_file", f"{path} is empty")])
        return token
    return os.environ.get("SISA_TOKEN", "").strip() or None


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (port 0: a free one). Binding here, not in uvicorn, lets the caller print the port."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    # proto must be IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only then, and without
    # it every response waits ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError([("port", f"cannot listen on {host}:{port}: {exc.strerror}")]) from None
    sock.listen(2048)  # connections queue from now on, even before uvicorn starts accepting
    return sock


def serve(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServerSettings | None = None,
    log_level: str = "warning",
    runtime: list[str] | tuple[str, ...] = (),
) -> int:
    """Run the server until interrupted. Binds the socket first so that ``--port 0`` reports the real port."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise UsageError([("port", f"expected 0..65535, got {port}")])
    server = Server(root, settings, runtime)
    state = server.state
    app = create_app(server)
    # Every retrain sets torch's (process-wide) thread count to training.threads; set it from the start so that
    # serving behaves the same before and after the first deletion. Parallelism comes from the ensemble pool instead.
    torch.set_num_threads(state.config.training.threads)
    sock = listen_socket(host, port)
    bound = sock.getsockname()[1]
    server.worker.start()  # warms up the retrain path before the first deletion arrives
    snap = state.snapshot()
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
    print(
        f"sisa: serving {state.run.root} (generation {snap.generation}, {len(snap.shards)} shard(s) serving, "
        f"deletions {'enabled' if state.settings.token else 'disabled: no token'}) on {url}",
        flush=True,
    )
    if state.recovered:
        print(f"sisa: replayed {len(state.recovered)} pending deletion(s) at start", file=sys.stderr)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
