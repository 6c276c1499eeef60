"""One chat answer on its way out: the pump from the engine's events to text pieces (the stop scanner cuts at a
stop string, the row is freed then), and the two response shapes, one JSON body or Server-Sent Events."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from utils.base.errors import EngineClosed
from utils.server.metrics import Metrics
from utils.server.protocol import ApiError, ChatRequest, engine_error


class StopScanner:
    """Cuts the answer at the first stop string; holds back text that could be the start of one. Only the text
    not sent yet is kept and searched (a stop string cannot start in text already sent: it would have been
    complete, and found, before that text left), so each piece costs the same however long the answer."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        safe = len(self.pending) - self.hold
        if safe <= 0:
            return ""
        out, self.pending = self.pending[:safe], self.pending[safe:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def finish_reason(engine_reason: str, stopped: bool) -> str:
    """OpenAI's finish_reason: "stop" whenever the text was cut at a stop string (also when that happened on
    the budget's last token, which the engine reports as "length"), else the engine's reason."""
    return "stop" if stopped else engine_reason


def spoken(data: str, text: str) -> dict[str, Any]:
    """The `audio` object of a spoken answer (base64 WAV and its transcript)."""
    return {"id": f"audio_{uuid.uuid4().hex}", "data": data, "expires_at": int(time.time()) + 3600,
            "transcript": text}


class Answering:
    """One chat answer: turns the engine's events ('token', id) ... ('finish', reason, error) into text, usage,
    timings and the OpenAI response. `speak(text)` gives the spoken answer as base64 WAV."""

    def __init__(self, req: ChatRequest, row: Any, events: asyncio.Queue, t_arrival: float, detok: Any,
                 metrics: Metrics, model_id: str, speak: Callable[[str], Awaitable[str]]) -> None:
        self.req, self.row, self.events, self.t_arrival = req, row, events, t_arrival
        self.detok, self.metrics, self.model_id, self.speak = detok, metrics, model_id, speak
        self.stop = StopScanner(req.stops)
        self.generated = 0
        self.t_last: float | None = None

    async def pieces(self) -> AsyncIterator[str | tuple[str, str, BaseException | None]]:
        """Text pieces as they come; last, ('finish', reason, error)."""
        while True:
            kind, *rest = await self.events.get()
            if kind == "token":
                now = time.perf_counter()
                if self.t_last is None:
                    self.metrics.ttft.observe(now - self.t_arrival)
                else:
                    self.metrics.itl.observe(now - self.t_last)
                self.t_last = now
                self.generated += 1
                self.metrics.completion_tokens += 1
                if self.stop.stopped:
                    continue
                text = self.stop.push(self.detok.push(rest[0]))
                if self.stop.stopped:
                    self.row.cancel()
                if text:
                    yield text
            elif kind == "finish":
                reason, error = rest
                if not self.stop.stopped:
                    tail = self.stop.push(self.detok.flush()) + ("" if self.stop.stopped else self.stop.flush())
                    if tail:
                        yield tail
                if reason == "cancelled" and not self.stop.stopped and error is None:
                    error = EngineClosed("the server is shutting down: the answer was cut")
                yield ("finish", finish_reason(reason, self.stop.stopped), error)
                return

    def usage(self, prompt: Any) -> dict[str, Any]:
        """OpenAI's token counts, plus `budget_cut` {requested, allowed, context} when the context could not hold
        the budget the client asked for (llama-server's way: the answer stops there, finish_reason "length")."""
        n = prompt.embeds.shape[0]
        return {"prompt_tokens": n, "completion_tokens": self.generated, "total_tokens": n + self.generated,
                **prompt.fitted}

    async def whole(self, chat_id: str, prompt: Any, request: Request, headers: dict[str, str]) -> Response:
        """The answer as one chat.completion body; a client that goes away frees its row at the next step."""
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.row.cancel()
        watcher = asyncio.create_task(watch())
        try:
            text, finish, error = "", "stop", None
            async for item in self.pieces():
                if isinstance(item, tuple):
                    _, finish, error = item
                else:
                    text += item
        finally:
            watcher.cancel()
        if error is not None:
            raise engine_error(error)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if self.req.speak:
            message["audio"] = spoken(await self.speak(text), text)
        return JSONResponse({"id": chat_id, "object": "chat.completion", "created": int(time.time()),
                             "model": self.model_id,
                             "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                          "logprobs": None}],
                             "usage": self.usage(prompt)}, headers=headers)

    async def sse(self, chat_id: str, prompt: Any) -> AsyncIterator[str]:
        """The answer as chat.completion.chunk events, then `data: [DONE]`; an error mid-stream is one error
        event. Leaving early (the client went away) frees the row."""
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None,
                  choices: bool = True) -> str:
            obj = {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
                   if choices else []}
            if self.req.include_usage:
                obj["usage"] = usage
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            text = ""
            async for item in self.pieces():
                if isinstance(item, tuple):
                    _, finish, error = item
                    if error is not None:
                        yield f"data: {json.dumps(engine_error(error).body())}\n\n"
                        return
                    if self.req.speak:
                        yield chunk({"audio": spoken(await self.speak(text), text)})
                    yield chunk({}, finish)
                    if self.req.include_usage:
                        yield chunk({}, usage=self.usage(prompt), choices=False)
                    yield "data: [DONE]\n\n"
                    return
                text += item
                yield chunk({"content": item})
        except ApiError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        finally:
            self.row.cancel()  # a no-op once finished; frees the row when the client went away
