"""The two plain ASGI middlewares of `hnvm serve` (Starlette's BaseHTTPMiddleware costs a task
group per request): `BodyLimit` (413 for bodies over the limit) and `FastRecommend` (valid
POST /v1/recommend requests skip FastAPI's per-request machinery).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from hnvm.online import Query
from hnvm.serve.schemas import RecommendIn
from hnvm.serve.service import Service, ServiceError, recommend_response


class BodyLimit:
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


class FastRecommend:
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
