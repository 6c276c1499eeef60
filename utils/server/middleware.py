"""ASGI middleware around the routes: the API key, the request body limit, per-endpoint counting and the one log
line per request (sizes and timing only, never content)."""
from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from utils.server.metrics import Metrics
from utils.server.protocol import ApiError

log = logging.getLogger("muomni.server")


class ApiKey:
    """With a key, every /v1 and /api (Ollama) route needs `Authorization: Bearer KEY` (compared as UTF-8 bytes in
    constant time; Ollama's clients send it from OLLAMA_API_KEY); /health and /metrics stay open, as load balancers
    and scrapers expect. serve.py refuses a key no client could send (empty, control characters, whitespace at
    either end), so an empty token never matches."""

    def __init__(self, app: Any, key: str | None) -> None:
        self.app = app
        self.key = None if key is None else key.encode("utf-8")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.key is not None and scope["path"].startswith(("/v1", "/api/")):
            # the header's bytes as sent: a non-ASCII key arrives as its UTF-8 bytes (curl in a UTF-8 shell)
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(b" \t"), self.key):
                error = ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                 "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error.response(scope["path"])(scope, receive, send)
        await self.app(scope, receive, send)


class Guard:
    """Outermost layer: the request body limit (413, also for chunked uploads), per-endpoint counting, and
    one INFO line per request with its size and timing only."""

    def __init__(self, app: Any, metrics: Metrics, max_body: int, endpoints: set[str]) -> None:
        self.app, self.metrics, self.max_body, self.endpoints = app, metrics, max_body, endpoints

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"
        state = {"status": 500, "in": 0, "out": 0, "started": False}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            elif message["type"] == "http.response.body":
                state["out"] += len(message.get("body", b""))
            await send(message)

        async def limited_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["in"] += len(message.get("body", b""))
                if state["in"] > self.max_body:
                    raise ApiError(413, f"the request body is larger than the limit of {self.max_body} bytes",
                                   "request_too_large")
            return message

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await ApiError(413, f"the request body ({int(length)} bytes) is larger than the limit of "
                                    f"{self.max_body} bytes", "request_too_large").response(path)(
                    scope, receive, counting_send)
            else:
                await self.app(scope, limited_receive, counting_send)
        except ApiError as exc:  # raised inside receive, outside any route's handler
            if not state["started"]:
                await exc.response(path)(scope, receive, counting_send)
        finally:
            key = (endpoint, state["status"])
            self.metrics.requests[key] = self.metrics.requests.get(key, 0) + 1
            log.info("%s %s %d in=%dB out=%dB %.3fs", scope["method"], endpoint, state["status"], state["in"],
                     state["out"], time.perf_counter() - t0)
