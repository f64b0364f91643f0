"""`hnvm serve`: the HTTP service (FastAPI) over the engine (`hnvm.online.Engine`) and a durable
`EventLog` (`serve.store`).

    POST /v1/events      a batch of events -> appended to the log (one transaction), then applied
    POST /v1/recommend   top-k for a user and the current session
    GET  /v1/users/{id}  the user's state (debugging); the id may contain `/` (percent-encoded or not)
    GET  /v1/health      liveness, model, counts, durability setting, warm-up progress and `ready`
    GET  /v1/ready       200 once every user's state is warm, 503 before (for a load balancer)
    GET  /docs           OpenAPI UI (schema at /openapi.json)

This module holds the app factory (`create_app`: routes, error handlers, middlewares) and the
process (`serve`: argument checks, start-up, garbage collector and GIL tuning). The request and
response models are `serve.schemas`; the service object that owns the engine, the event log,
the event writer and the recommendation batcher is `serve.service` (concurrency is described
there); the ASGI middlewares are `serve.asgi`.
"""

from __future__ import annotations

import gc
import math
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hnvm.errors import HnvmError
from hnvm.online import SCORING, Query
from hnvm.serve.asgi import BodyLimit, FastRecommend
from hnvm.serve.schemas import EventsIn, EventsOut, RecommendIn, RecommendOut
from hnvm.serve.service import Service, ServiceError, recommend_response
from hnvm.serve.store import check_db_path

MAX_THREADS = 1024  # --threads


def _message(err: dict[str, Any]) -> str:
    where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
    return f"{where}: {err.get('msg')}" if where else str(err.get("msg"))


def create_app(service: Service) -> FastAPI:
    lim = service.limits

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="hnvm", version="1", lifespan=lifespan,
                  description="Personalized sequential recommendation (HNVM and baselines) with a durable "
                              "event log and online user state.")
    app.state.service = service
    app.add_middleware(FastRecommend, service=service)
    app.add_middleware(BodyLimit, max_bytes=lim.max_body_bytes)  # added last: the outer one

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            ctx = next(e for e in errs if e.get("type") == "json_invalid").get("ctx", {})
            return JSONResponse({"error": f"malformed JSON: {ctx.get('error', 'cannot parse the body')}"},
                                status_code=400)
        msgs = [_message(e) for e in errs]
        more = f" (and {len(msgs) - 5} more)" if len(msgs) > 5 else ""
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errs[:50]]
        return JSONResponse({"error": "; ".join(msgs[:5]) + more, "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.post("/v1/events", response_model=EventsOut,
              responses={409: {"description": "out-of-order timestamp, or a session key that comes back"}})
    async def post_events(body: EventsIn) -> EventsOut:
        """Append a batch of events (one transaction; all or nothing) and advance user states.

        Sessions: a user has one open session. An event opens a new one when the user has none
        open, when its `session` key differs from the open one's (keys win over time), or,
        without keys, when it comes more than the idle gap (`hnvm serve --gap`, default the
        dataset's) after the user's previous event. A keyed session is the run of a user's
        consecutive events with its key: a key whose session a later event closed is refused
        (409), where `hnvm prepare` would merge the interleaved events; keys are checked against
        the user's online events. At most 1,000 events per session (422)."""
        return await service.add_events(body)

    @app.post("/v1/recommend", response_model=RecommendOut)
    async def post_recommend(body: RecommendIn) -> Any:
        """Top-k items for a user given their history and current session."""
        if len(body.session) > lim.max_session_length:
            raise ServiceError(413, f"session: {len(body.session)} items (at most {lim.max_session_length})")
        now = body.ts if body.ts is not None else time.time()
        r = await service.recommend(Query(body.user, body.session, body.k, body.exclude_seen, now))
        return recommend_response(service, r)

    # `:path`: an id may contain "/" (sent as is or percent-encoded as %2F; the server decodes
    # the path before routing, so both reach here as the same id)
    @app.get("/v1/users/{user_id:path}")
    async def get_user(user_id: str) -> dict[str, Any]:
        """The user's state (for debugging). Percent-encode the id in the URL (`a b` as `a%20b`,
        `?` as `%3F`); `/` may be sent as is or as `%2F`."""
        if not user_id or len(user_id) > lim.max_id_length:
            raise ServiceError(422, f"user id must have 1..{lim.max_id_length} characters")
        return service.engine.describe(user_id)

    _status_routes(app, service)
    return app


def _status_routes(app: FastAPI, service: Service) -> None:
    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        """Liveness and counts; `ready` and `warm_up` (users warm / total) tell whether every
        user's dataset state is encoded yet (before, a first request waits for its user's block)."""
        return service.health()

    @app.get("/v1/ready", responses={503: {"description": "still warming the users' states"}})
    async def ready() -> JSONResponse:
        """Readiness for a load balancer: 200 once every user's state is warm, else 503."""
        h = service.health()
        return JSONResponse({"ready": h["ready"], "warm_up": h["warm_up"]}, status_code=200 if h["ready"] else 503)


def serve(run: str | Path, *, host: str = "127.0.0.1", port: int = 8000, db: str | Path = "events.sqlite",
          data: str | Path | None = None, gap_s: float | None = None, threads: int = 1,
          scoring: str = "auto", rank_process: bool | None = None,
          on_ready: Callable[[Service], None] | None = None) -> None:
    """Load the run, replay the log and serve until interrupted."""
    import torch
    import uvicorn

    if scoring not in SCORING:
        raise HnvmError(f"--scoring must be one of {', '.join(SCORING)}, got {scoring!r}")
    # checked here: out-of-range values would reach the socket and torch as tracebacks
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise HnvmError(f"--port must be in 1..65535, got {port}")
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise HnvmError(f"--threads must be in 1..{MAX_THREADS}, got {threads}")
    if gap_s is not None and not (math.isfinite(gap_s) and gap_s >= 0):
        raise HnvmError(f"--gap must be a finite, non-negative duration, got {gap_s} s")
    check_db_path(db)
    torch.set_num_threads(threads)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:  # fail before loading
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except (OSError, ValueError, TypeError, OverflowError) as exc:  # (a NUL or a bad label in --host)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise HnvmError(f"--host/--port: cannot listen on {host}:{port} ({why})") from None
    service = Service.open(run, db, data=data, gap_s=gap_s, scoring=scoring, rank_process=rank_process)
    if on_ready is not None:
        on_ready(service)
    # The model, the dataset and the replayed state are long-lived: move them out of the cyclic
    # collector's reach, or each full collection rescans them and stalls every request in flight.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)  # requests allocate many short-lived objects: collect less often
    # the scoring thread needs the GIL between its torch calls; with the default 5 ms switch
    # interval it waits behind the loop's Python for each (measured: 1,411 -> 2,051 requests/s
    # for exact scoring of 60K items in-process)
    sys.setswitchinterval(0.0002)
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
