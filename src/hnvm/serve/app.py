"""`hnvm serve`: the HTTP service (FastAPI) over an `Engine` and a durable `EventLog`.

    POST /v1/events      a batch of events -> appended to the log (one transaction), then applied
    POST /v1/recommend   top-k for a user and the current session
    GET  /v1/users/{id}  the user's state (debugging); the id may contain `/` (percent-encoded or not)
    GET  /v1/health      liveness, model, counts, durability setting
    GET  /docs           OpenAPI UI (schema at /openapi.json)

Concurrency: one asyncio loop, which owns all state. Requests for recommendations that arrive
while a scoring pass runs wait for the next one and are scored together. A pass has two
halves: the per-user model steps (`Engine.prepare`) run on the loop, which owns the states; the
scoring product and top-k (`Engine.rank`, which reads only the prepared tensors and the
weights) run on a scoring thread, so that the loop parses, validates and answers other requests
meanwhile (torch releases the GIL), or, with `rank_process`, in a child process that the
scoring thread hands the pass to (`serve.worker`). Valid recommend requests skip FastAPI's
per-request machinery (`_FastRecommend`). Events go through one writer task: it validates each
batch against the state plus the batches accepted before it, commits the accepted ones in one
SQLite transaction on a worker thread (the loop keeps serving meanwhile), and only then applies
them to the in-memory state and answers. A rejected batch writes nothing and changes nothing.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from hnvm.errors import HnvmError
from hnvm.serve.state import AUTO_BF16_ITEMS, SCORING, Engine, Event, Job, Query, QueryError, Recommendation
from hnvm.serve.store import SYNCHRONOUS, EventLog, check_db_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_events: int = 10_000  # events per POST /v1/events
    max_session_length: int = 1000  # events of one session (stored or in a recommend request)
    max_k: int = 1000
    max_body_bytes: int = 16 << 20
    max_id_length: int = 256


LIMITS = Limits()
MAX_THREADS = 1024  # --threads


def _int_to_str(v: Any) -> Any:
    # Ids are opaque text. JSON clients often send integer ids: an integer becomes its decimal
    # text, which is exactly how JSON wrote it (JSON has no leading zeros), so 7 is "7" and never
    # "007" or "7.0". Floats and booleans are refused (strict mode): their text is not the id.
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


Id = Annotated[str, StringConstraints(min_length=1, max_length=LIMITS.max_id_length), BeforeValidator(_int_to_str)]
# Unix seconds reach 1e11 only in the year 5138: a larger |ts| is another unit (ms) or garbage, and one
# stored event that far ahead would keep its user's session open for ever. (Clocks ahead of the server's
# are allowed: replays and tests freeze time that way.)
MAX_TS = 1e11
Timestamp = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_TS, le=MAX_TS,
                                   description="seconds (Unix time or the dataset's clock), |ts| <= 1e11")]


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user: Id
    item: Id
    ts: Timestamp | None = Field(None, description="event time; default: arrival time")
    session: Id | None = Field(None, description="explicit session key (e.g. an order id): the user's "
                               "consecutive events with one key are one session, however far apart in "
                               "time; a key whose session a later event closed cannot come back (409: "
                               "keyed sessions must not interleave). Without keys, sessions close after "
                               "the idle gap")


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    events: list[EventIn] = Field(min_length=1, description=f"at most {LIMITS.max_events} (`Limits`) per request")


class EventsOut(BaseModel):
    accepted: int
    first_seq: int
    last_seq: int
    unknown_items: list[str] = Field(description="items the model does not know (logged, ignored)")


class RecommendIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user: Id
    session: list[Id] = Field(default_factory=list, description="items to add to the user's open session for "
                              f"this request only (at most {LIMITS.max_session_length} in the request: 413; "
                              f"at most {LIMITS.max_session_length} together with the events of the open "
                              "session: 422)")
    k: int = Field(10, ge=1, le=LIMITS.max_k)
    exclude_seen: bool = Field(False, description="leave out items the user has interacted with")
    ts: Timestamp | None = Field(None, description="request time (an open session idle for longer "
                                 "than the gap is treated as closed); default: now")


class ScoredItem(BaseModel):
    item: str
    score: float


class RecommendOut(BaseModel):
    user: str
    items: list[ScoredItem]
    unknown_items: list[str]
    cold_start: bool
    session_length: int
    new_session: bool
    model: str


class ServiceError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Service:
    """Engine + event log + the writer and batcher that run on the service's event loop."""

    def __init__(self, engine: Engine, log_: EventLog, *, run: str = "", limits: Limits = LIMITS) -> None:
        self.engine, self.log, self.run, self.limits = engine, log_, run, limits
        self.started = time.time()
        self.replayed = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hnvm-log")
        # one pass in flight: requests that come meanwhile make the next pass (with a ranking
        # process, two in flight measured slower: smaller passes cost more per request)
        self._scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hnvm-score")
        self._busy = False
        self._queue: list[tuple[list[Event], list[str], asyncio.Future[EventsOut]]] = []
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._pending: list[tuple[Query, asyncio.Future[Recommendation]]] = []
        self.stats = {"recommend_requests": 0, "recommend_passes": 0, "event_posts": 0, "event_commits": 0}

    @classmethod
    def open(cls, run: str | Path, db: str | Path, *, data: str | Path | None = None,
             gap_s: float | None = None, limits: Limits = LIMITS, scoring: str = "auto",
             rank_process: bool | None = False) -> Service:
        """`rank_process`: rank in a child process (None = auto: HNVM with AUTO_BF16_ITEMS items or
        more on a machine with 2+ cores, where ranking is the larger half of a request's CPU)."""
        check_db_path(db)  # before the (slow) model load; EventLog checks again when it opens
        engine = Engine.from_run(run, data=data, gap_s=gap_s, max_session_length=limits.max_session_length,
                                 scoring=scoring)
        svc = cls(engine, EventLog(db), run=str(run), limits=limits)
        svc.replay()
        if rank_process is None:
            rank_process = engine.n_items >= AUTO_BF16_ITEMS and (os.cpu_count() or 1) >= 2
        if rank_process and not engine.start_rank_process():
            log.info("%s: ranking stays in-process (only HNVM hands its passes to a process)", engine.model.name)
        return svc

    def replay(self) -> int:
        """Rebuild the state from the log (at start-up, before serving)."""
        t0 = time.perf_counter()
        n = 0
        for ev in self.log.replay():
            self.engine.apply(ev)
            n += 1
        self.replayed = n
        log.info("replayed %d events from %s in %.2fs", n, self.log.path, time.perf_counter() - t0)
        return n

    # events ---------------------------------------------------------------------------------
    async def add_events(self, body: EventsIn) -> EventsOut:
        if len(body.events) > self.limits.max_events:
            raise ServiceError(413, f"events: {len(body.events)} events in one request (at most "
                               f"{self.limits.max_events}; split the batch)")
        now = time.time()
        events, unknown = [], []
        last: dict[str, float] = {}
        for e in body.events:
            ts = e.ts
            if ts is None:  # arrival time, never before the user's previous event
                prev = last.get(e.user, self.engine.track(e.user).last_ts)
                ts = now if prev is None else max(now, prev)
            last[e.user] = ts
            events.append(Event(e.user, e.item, ts, e.session))
            if e.item not in self.engine.item_index:
                unknown.append(e.item)
        fut: asyncio.Future[EventsOut] = asyncio.get_running_loop().create_future()
        self._queue.append((events, list(dict.fromkeys(unknown)), fut))
        assert self._wake is not None, "service not started"
        self._wake.set()
        return await fut

    async def _write_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            group, self._queue = self._queue, []
            try:
                await self._write_group(group)
            except Exception as exc:  # a bug must not stall every later POST: fail this group
                log.exception("event writer failed")
                for _, _, fut in group:
                    if not fut.done():
                        fut.set_exception(ServiceError(500, f"internal error: {exc}"))

    async def _write_group(self, group: list[tuple[list[Event], list[str], asyncio.Future[EventsOut]]]) -> None:
        loop = asyncio.get_running_loop()
        overlay: dict[str, Any] = {}
        accepted = []
        for events, unknown, fut in group:
            problems = self.engine.check(events, overlay)
            if problems:
                more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                status = 409 if any(code in ("order", "key") for code, _ in problems) else 422
                if not fut.done():
                    fut.set_exception(ServiceError(status, "; ".join(m for _, m in problems[:3]) + more))
            else:
                accepted.append((events, unknown, fut))
        if not accepted:
            return
        flat = [e for events, _, _ in accepted for e in events]
        self.stats["event_commits"] += 1
        self.stats["event_posts"] += len(accepted)
        try:  # one transaction for the whole group (group commit)
            first, _ = await loop.run_in_executor(self._pool, self.log.append, flat)
        except Exception as exc:  # nothing was applied; the clients may retry
            log.exception("event log write failed")
            for _, _, fut in accepted:
                if not fut.done():
                    fut.set_exception(ServiceError(503, f"event log write failed: {exc}"))
            return
        for events, unknown, fut in accepted:
            for e in events:
                self.engine.apply(e)
            if not fut.done():  # (a client that went away cancels its future)
                fut.set_result(EventsOut(accepted=len(events), first_seq=first,
                                         last_seq=first + len(events) - 1, unknown_items=unknown))
            first += len(events)
        # after the answers: keep the decoder state of users being served current (one step per
        # event), so that their next recommendation is one scoring pass
        try:
            self.engine.advance(dict.fromkeys(e.user for e in flat))
        except Exception:  # state is derived data: the next recommendation recomputes it
            log.exception("advancing user state failed")

    # recommendations ---------------------------------------------------------------------------
    async def recommend(self, q: Query) -> Recommendation:
        """Top-k for `q`; ServiceError 422 when its session items plus the events of the user's
        open session are over the session limit."""
        problem = self.engine.session_problem(q)
        if problem is not None:
            raise ServiceError(422, problem)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Recommendation] = loop.create_future()
        self._pending.append((q, fut))
        if len(self._pending) == 1 and not self._busy:
            # runs after the requests already read in this loop iteration: they share one pass
            loop.call_soon(self._flush)
        try:
            return await fut
        except QueryError as exc:  # events applied while it waited for its pass made it too long
            raise ServiceError(422, str(exc)) from None

    def _flush(self) -> None:
        """Start a scoring pass over the pending requests (on the loop)."""
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending, []
        self.stats["recommend_passes"] += 1
        self.stats["recommend_requests"] += len(batch)
        try:
            job = self.engine.prepare([q for q, _ in batch])
        except Exception:
            self._isolate(batch)
            return
        self._busy = True
        loop = asyncio.get_running_loop()
        loop.run_in_executor(self._scoring, self.engine.rank, job).add_done_callback(
            lambda f: self._finish(batch, job, f))

    def _finish(self, batch: list[tuple[Query, asyncio.Future[Recommendation]]], job: Job,
                ranked: asyncio.Future[Any]) -> None:
        """The pass is done (on the loop): answer its requests, start the next pass."""
        self._busy = False
        try:
            results: list[Any] = self.engine.finish(job, ranked.result())
        except Exception:
            self._isolate(batch)
            self._flush()
            return
        self._flush()  # the next pass first: the ranking runs while this one's answers are written
        self._answer(batch, results)

    def _isolate(self, batch: list[tuple[Query, asyncio.Future[Recommendation]]]) -> None:
        """A pass failed: score its requests one by one, so that only the failing one fails."""
        results: list[Any] = []
        for q, _ in batch:
            try:
                results.append(self.engine.recommend(q))
            except QueryError as exc:  # the request's fault, not a bug: no traceback
                results.append(exc)
            except Exception as exc:
                log.exception("recommend failed for user %r", q.user)
                results.append(exc)
        self._answer(batch, results)

    @staticmethod
    def _answer(batch: list[tuple[Query, asyncio.Future[Recommendation]]], results: list[Any]) -> None:
        for (_, fut), r in zip(batch, results, strict=True):
            if fut.done():  # (a client that went away cancels its future)
                continue
            if isinstance(r, Exception):
                fut.set_exception(r)
            else:
                fut.set_result(r)

    # lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._write_loop(), name="hnvm-event-writer")

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with suppress(asyncio.CancelledError):
                await self._writer
        self._pool.shutdown(wait=True)
        self._scoring.shutdown(wait=True)
        self.engine.close()
        self.log.close()

    def health(self) -> dict[str, Any]:
        e = self.engine
        return {"status": "ok", "run": self.run, "model": e.model.name, "incremental_state": e.scorer.incremental,
                "scoring": e.scorer.scoring,
                "rank_process": e.rank_worker is not None and e.rank_worker.alive,
                "items": e.n_items, "known_users": len(e.user_index), "active_users": len(e.users),
                "events": e.n_events, "replayed_at_start": self.replayed, "session_gap_s": e.gap_s,
                "event_log": str(self.log.path), "durability": f"sqlite WAL, synchronous={SYNCHRONOUS}",
                "uptime_s": round(time.time() - self.started, 1), **self.stats}


class _BodyLimit:
    """413 for bodies over the limit, checked on the declared length and on the bytes received.
    A plain ASGI middleware: Starlette's BaseHTTPMiddleware costs a task group per request."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None:
            if not size.isdigit() or int(size) > self.max_bytes:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        # no declared length (chunked): read up to the limit here, then hand the body on
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, receive, send)  # (a disconnect: let the app see it)
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            more = msg.get("more_body", False)
            if seen > self.max_bytes:
                return await self._refuse(send)
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send: Callable[..., Any]) -> None:
        body = json.dumps({"error": f"request body over {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _FastRecommend:
    """POST /v1/recommend without FastAPI's per-request machinery (routing, dependency solving,
    the exception middlewares), which cost about as much CPU as the rest of a request. Only a
    well-formed request goes this way, validated by the same `RecommendIn` in the same (Python,
    strict) mode as the route; anything else is handed to the FastAPI route, which answers it
    exactly as documented."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/recommend" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        messages, more = [], True
        while more:
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request":
                break
            more = msg.get("more_body", False)
        query = None if more else self._query(scope, b"".join(m.get("body", b"") for m in messages))
        if query is None:  # the route answers (errors included)
            pending = iter(messages)

            async def replay() -> dict[str, Any]:
                return next(pending, None) or await receive()

            return await self.app(scope, replay, send)
        try:
            r = await self.service.recommend(query)
        except ServiceError as exc:
            response = JSONResponse({"error": exc.message}, status_code=exc.status)
        else:
            response = recommend_response(self.service, r)
        await response(scope, receive, send)

    def _query(self, scope: dict[str, Any], body: bytes) -> Query | None:
        ctype = dict(scope["headers"]).get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            return None
        try:
            req = RecommendIn.model_validate(json.loads(body))
        except (ValueError, TypeError):  # (pydantic's ValidationError is a ValueError)
            return None
        if len(req.session) > self.service.limits.max_session_length:
            return None
        return Query(req.user, req.session, req.k, req.exclude_seen, req.ts if req.ts is not None else time.time())


def recommend_response(service: Service, r: Recommendation) -> JSONResponse:
    """A ready Response: it skips FastAPI's re-validation of the response model (the hot path);
    the dict has RecommendOut's shape, which stays the documented schema."""
    return JSONResponse({
        "user": r.user, "items": [{"item": i, "score": s} for i, s in zip(r.items, r.scores, strict=True)],
        "unknown_items": r.unknown_items, "cold_start": r.cold_start, "session_length": r.session_length,
        "new_session": r.new_session, "model": service.engine.model.name})


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
    app.add_middleware(_FastRecommend, service=service)
    app.add_middleware(_BodyLimit, max_bytes=lim.max_body_bytes)  # added last: the outer one

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

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return service.health()

    return app


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
