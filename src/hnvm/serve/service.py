"""The service between HTTP and the engine: an `Engine` (`hnvm.online`) and a durable `EventLog`,
run on one asyncio loop, which owns all state.

Events go through one writer task: it validates each batch against the state plus the batches
accepted before it, commits the accepted ones in one SQLite transaction on a worker thread (the
loop keeps serving meanwhile), and only then applies them to the in-memory state and answers. A
rejected batch writes nothing and changes nothing.

Recommendations that arrive while a scoring pass runs wait for the next one and are scored
together. A pass has two halves: the per-user model steps (`Engine.prepare`) run on the loop,
which owns the states; the scoring product and top-k (`Engine.rank`, which reads only the
prepared tensors and the weights) run on a scoring thread, so that the loop parses, validates and
answers other requests meanwhile (torch releases the GIL), or, with `rank_process`, in a child
process that the scoring thread hands the pass to (`hnvm.online.worker`).

Warm-up (HNVM): once the loop runs, a warm-up task encodes the users' dataset states block by
block (`hnvm.online.contexts`) on threads of its own (cores / torch threads) and stores each block on
the loop; a request for a user whose block is still cold waits for the warm-up to encode that
block next (the loop serves others meanwhile). Then the users with replayed events are advanced
through them, one by one on the loop (what their first recommendation would otherwise run).
`/v1/health` reports the progress and `ready` (both done). A finished warm-up is saved next to the event log
(`<db>-contexts.safetensors`, keyed by the weights, the data and the arithmetic) and loaded at
the next start, which then skips the encoding.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from fastapi.responses import JSONResponse

from hnvm.online import AUTO_BF16_ITEMS, Engine, Event, Job, Query, QueryError, Recommendation
from hnvm.serve.schemas import LIMITS, EventsIn, EventsOut, Limits
from hnvm.serve.store import SYNCHRONOUS, EventLog, check_db_path

log = logging.getLogger(__name__)


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
        # warm-up threads: the machine's cores, each running torch's thread count (start-up only)
        self._warm_threads = max(1, min(8, (os.cpu_count() or 1) // max(1, torch.get_num_threads())))
        self._warm_pool = ThreadPoolExecutor(max_workers=self._warm_threads, thread_name_prefix="hnvm-warm")
        self._warmer: asyncio.Task[None] | None = None
        self._urgent: list[int] = []  # cold blocks that requests wait for: the warm-up takes them first
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._caught_up = False  # the users with replayed events advanced (`_catch_up`)
        self.contexts_file: Path | None = None  # where a finished warm-up is saved (None: not saved)
        self.contexts_key = ""
        self.warm: dict[str, Any] = {"source": "none" if engine.contexts is None else "encoded", "seconds": 0.0,
                                     "error": None, "replayed_users": 0, "replayed_total": 0}
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
        svc.load_contexts(Path(f"{db}-contexts.safetensors"))
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
        self._caught_up = n == 0  # else `_catch_up` advances the users with replayed events
        log.info("replayed %d events from %s in %.2fs", n, self.log.path, time.perf_counter() - t0)
        return n

    def load_contexts(self, path: Path) -> None:
        """Take the users' dataset contexts from `path` if a warm-up for the same weights, data and
        arithmetic saved them there; the warm-up saves them there otherwise."""
        ctx, net = self.engine.contexts, getattr(self.engine.model, "net", None)
        if ctx is None or not isinstance(net, torch.nn.Module):
            return
        config = json.dumps(dataclasses.asdict(self.engine.model.config), sort_keys=True, default=str) \
            if dataclasses.is_dataclass(getattr(self.engine.model, "config", None)) else ""
        self.contexts_file, self.contexts_key = path, ctx.digest(net.state_dict().values(), config)
        # a save that a crash cut short (one server per event log: nobody else writes it)
        path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)
        if ctx.load(path, self.contexts_key):
            self.warm["source"] = "file"
            log.info("user contexts loaded from %s (%d users)", path, ctx.total)

    async def _warm_up(self) -> None:
        """Warm every cold block of user states (`_warm_blocks`), save them, then advance the
        users with replayed events (`_catch_up`)."""
        ctx, loop = self.engine.contexts, asyncio.get_running_loop()
        if ctx is None:
            return
        t0 = time.perf_counter()
        if not ctx.ready:
            if not await self._warm_blocks(t0):
                return
            log.info("warmed %d users' states in %.1fs", ctx.total, self.warm["seconds"])
            if self.contexts_file is not None:
                try:
                    await loop.run_in_executor(self._warm_pool, ctx.save, self.contexts_file, self.contexts_key)
                except Exception as exc:  # only the next start is slower
                    log.warning("could not save the warm-up to %s: %s", self.contexts_file, exc)
                    self.warm["save_error"] = f"{type(exc).__name__}: {exc}"
        await self._catch_up()
        self.warm["seconds"] = round(time.perf_counter() - t0, 2)

    async def _warm_blocks(self, t0: float) -> bool:
        """Encode every cold block, one block per call on the warm-up threads (the loop serves
        meanwhile and stores each block); False if it failed."""
        ctx, loop = self.engine.contexts, asyncio.get_running_loop()
        assert ctx is not None
        order = iter(ctx.pending())
        try:
            async def worker() -> None:
                while (b := self._next_block(order)) is not None:
                    ctx.install(b, await loop.run_in_executor(self._warm_pool, ctx.encode_block, b))
                    self._release(b)
                    self.warm["seconds"] = round(time.perf_counter() - t0, 2)  # (so far)

            async with asyncio.TaskGroup() as group:  # (a failure cancels the other workers)
                for _ in range(self._warm_threads):
                    group.create_task(worker())
        except Exception as exc:  # not ready; requests still encode their blocks on first use
            first = exc.exceptions[0] if isinstance(exc, ExceptionGroup) else exc
            log.error("warm-up failed", exc_info=first)
            self.warm["error"] = f"{type(first).__name__}: {first}"
            return False
        finally:  # (also when cancelled): nobody waits for a block that will not come
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_result(None)
            self._waiting.clear()
        return True

    async def _catch_up(self) -> None:
        """The users with replayed events, advanced through them one by one on the loop (what
        their first recommendation would otherwise run), yielding to requests between users."""
        users = [u for u, st in self.engine.users.items() if st.cache is None and st.n_events]
        self.warm["replayed_users"], self.warm["replayed_total"] = 0, len(users)
        for i, u in enumerate(users, start=1):
            try:
                self.engine.advance([u], new=True)  # (a user a request built meanwhile: a no-op pass)
            except Exception:  # derived state: the user's first recommendation builds it instead
                log.exception("advancing user %r after the replay failed", u)
            self.warm["replayed_users"] = i
            await asyncio.sleep(0)
        self._caught_up = True

    def _next_block(self, order: Iterator[int]) -> int | None:
        """The next cold block: one a request waits for, else the next in warm-up order."""
        ctx = self.engine.contexts
        assert ctx is not None
        while self._urgent:
            b = self._urgent.pop(0)
            if not ctx.done[b]:
                return b
            self._release(b)
        return next((b for b in order if not ctx.done[b]), None)

    def _release(self, b: int) -> None:
        fut = self._waiting.pop(b, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _wait_for_block(self, b: int) -> None:
        """While the warm-up runs, a request for a user whose block b is cold waits for the warm-up
        thread to encode it next (the loop keeps serving), rather than encoding it on the loop."""
        if self._warmer is None or self._warmer.done():
            return
        fut = self._waiting.get(b)
        if fut is None:
            fut = self._waiting[b] = asyncio.get_running_loop().create_future()
            self._urgent.append(b)
        await asyncio.shield(fut)  # (a client that goes away must not cancel the others' wait)

    @property
    def ready(self) -> bool:
        """Every user's state is warm: every block, and the users with replayed events advanced
        (after a failed warm-up: once requests have encoded every block; `warm_up.error` says why)."""
        ctx = self.engine.contexts
        return ctx is None or (ctx.ready and (self._caught_up or self.warm["error"] is not None))

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
        if (b := self.engine.cold_block(q.user)) is not None:  # (None, without an await, once warm)
            await self._wait_for_block(b)
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
        self._warmer = asyncio.create_task(self._warm_up(), name="hnvm-warm-up")

    async def stop(self) -> None:
        for task in (self._writer, self._warmer):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        self._pool.shutdown(wait=True)
        self._warm_pool.shutdown(wait=True)
        self._scoring.shutdown(wait=True)
        self.engine.close()
        self.log.close()

    def health(self) -> dict[str, Any]:
        e, ctx = self.engine, self.engine.contexts
        warm = {"users": ctx.warm_users if ctx else 0, "total": ctx.total if ctx else 0, **self.warm}
        return {"status": "ok", "ready": self.ready, "warm_up": warm, "run": self.run, "model": e.model.name,
                "incremental_state": e.scorer.incremental,
                "scoring": e.scorer.scoring,
                "rank_process": e.rank_worker is not None and e.rank_worker.alive,
                "items": e.n_items, "known_users": len(e.user_index), "active_users": len(e.users),
                "events": e.n_events, "replayed_at_start": self.replayed, "session_gap_s": e.gap_s,
                "event_log": str(self.log.path), "durability": f"sqlite WAL, synchronous={SYNCHRONOUS}",
                "uptime_s": round(time.time() - self.started, 1), **self.stats}


def recommend_response(service: Service, r: Recommendation) -> JSONResponse:
    """A ready Response: it skips FastAPI's re-validation of the response model (the hot path);
    the dict has RecommendOut's shape, which stays the documented schema."""
    return JSONResponse({
        "user": r.user, "items": [{"item": i, "score": s} for i, s in zip(r.items, r.scores, strict=True)],
        "unknown_items": r.unknown_items, "cold_start": r.cold_start, "session_length": r.session_length,
        "new_session": r.new_session, "model": service.engine.model.name})
