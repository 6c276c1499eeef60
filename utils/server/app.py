"""The OpenAI- and Ollama-compatible HTTP app behind serve.py, assembled: the routes (utils.server.routes,
.completions, .ollama) inside the middleware (API key, body limit, request log), OpenAI error bodies for every
failure (Ollama's on /api/), and uvicorn with a graceful stop. The wire format is utils.server.protocol, the
answer pump utils.server.streaming."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from typing import Any, AsyncIterator, Iterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from utils.server.completions import Completions
from utils.server.middleware import ApiKey, Guard
from utils.server.ollama import Ollama
from utils.server.protocol import ApiError
from utils.server import webui
from utils.server.routes import OmniServer, ServerConfig

log = logging.getLogger("muomni.server")

__all__ = ["OmniServer", "ServerConfig", "build_app", "run_server"]


def build_app(server: OmniServer, lifespan: Any = None) -> Any:
    """The ASGI app: the routes, their error handlers, and the middleware around them."""
    routes = [Route("/v1/chat/completions", server.chat, methods=["POST"]),
              Route("/v1/completions", Completions(server).create, methods=["POST"]),
              Route("/v1/audio/transcriptions", server.transcriptions, methods=["POST"]),
              Route("/v1/audio/speech", server.speech, methods=["POST"]),
              Route("/v1/ocr", server.ocr, methods=["POST"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/v1/models/{name:path}", server.model_route, methods=["GET"]),
              Route("/health", server.health, methods=["GET"]),
              Route("/metrics", server.metrics_route, methods=["GET"]),
              *Ollama(server).routes()]
    if server.config.webui:
        routes += webui.routes()

    async def api_error(request: Request, exc: Exception) -> Response:
        return exc.response(request.url.path)  # type: ignore[attr-defined]

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = "no such route" if status == 404 else getattr(exc, "detail", "error")
        return ApiError(status, f"{request.method} {request.url.path}: {detail}",
                        {404: "not_found", 405: "method_not_allowed"}.get(status)).response(request.url.path)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return ApiError(500, f"internal error ({type(exc).__name__})", "internal_error").response(request.url.path)

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: unexpected})
    known = {r.path for r in routes if "{" not in r.path}
    return Guard(ApiKey(app, server.config.api_key), server.metrics, server.config.max_body_bytes, known)


def run_server(server: OmniServer, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT/SIGHUP: then stop admitting, let running rows finish for up to the configured
    shutdown timeout, cancel the rest, and return (the process exits 0; a second Ctrl-C forces it)."""
    import uvicorn

    engine, bound = server.engine, server.config.shutdown_timeout
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        state["loop"] = asyncio.get_running_loop()
        yield
        engine.close(timeout=0.0)

    class Graceful(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn would re-raise the signal once stopped (exit status 128+n): a requested stop exits 0
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True
            loop = state.get("loop")
            if loop is not None:
                loop.call_soon_threadsafe(engine.close, bound, False)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn takes SIGINT and SIGTERM; a hangup (the terminal or ssh session closed) stops as SIGTERM
            # does, instead of killing the process mid-answer (a nohup'd server keeps ignoring it)
            hangup = signal.getsignal(signal.SIGHUP)
            if hangup != signal.SIG_IGN:
                signal.signal(signal.SIGHUP, self.handle_exit)
            try:
                with super().capture_signals():
                    yield
            finally:
                signal.signal(signal.SIGHUP, hangup)

    app = build_app(server, lifespan)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=bound + 2, lifespan="on")
    log.info("serving %s on http://%s:%d", server.config.model_id, host if ":" not in host else f"[{host}]", port)
    Graceful(config).run(sockets=[sock])
