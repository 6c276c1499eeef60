"""One chat answer on its way out: the engine's events handed to the event loop (Outbox, Inbox: once per engine
step for every request, not once per token), the pump from those events to text pieces (the stop scanner cuts at
a stop string, the row is freed then), and the two response shapes, one JSON body or Server-Sent Events."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Union

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from utils.base.errors import EngineClosed
from utils.server.metrics import Metrics
from utils.server.protocol import ApiError, ChatRequest, engine_error


class Outbox:
    """The engine's events on their way to the requests waiting on event loops. The engine's callbacks append each
    event to its request's Inbox (on the engine's thread); `flush`, run there after each engine round
    (EngineThread.after_steps), wakes every inbox with news through one call_soon_threadsafe per loop. So a step
    of 16 rows costs one wake-up, not 16, and a request whose loop or client fell behind finds all its new tokens
    at once (sent as one event)."""

    def __init__(self) -> None:
        self.news: list[Inbox] = []  # inboxes with events since the last flush (the engine's thread only)

    def flush(self) -> None:
        if not self.news:
            return
        news, self.news = self.news, []
        loops: dict[asyncio.AbstractEventLoop, list[Inbox]] = {}
        for box in news:
            box.listed = False
            loops.setdefault(box.loop, []).append(box)
        for loop, boxes in loops.items():
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits for these
                loop.call_soon_threadsafe(wake, boxes)


def wake(boxes: list[Inbox]) -> None:
    """On the loop: resume whoever waits on these inboxes."""
    for box in boxes:
        waiter = box.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Inbox:
    """One request's events (("start", 0, prompt, t), ("logprobs", i, entry), ("token", i, id), ("finish", i,
    reason, error)): `put` on the engine's thread, `wait` / `take` on the request's event loop."""

    def __init__(self, outbox: Outbox, loop: asyncio.AbstractEventLoop) -> None:
        self.outbox, self.loop = outbox, loop
        self.events: collections.deque[tuple[Any, ...]] = collections.deque()  # appends and poplefts are atomic
        self.listed = False  # in outbox.news (the engine's thread only)
        self.waiter: asyncio.Future | None = None

    def put(self, *event: Any) -> None:
        self.events.append(event)
        if not self.listed:
            self.listed = True
            self.outbox.news.append(self)

    async def wait(self) -> None:
        """Until at least one event is here."""
        while not self.events:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def take(self) -> list[tuple[Any, ...]]:
        """Every event that came since the last take (at least one)."""
        await self.wait()
        events = self.events
        return [events.popleft() for _ in range(len(events))]


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


def tool_finish(engine_finish: str, called: bool) -> str:
    """A forced call's finish_reason: "tool_calls" once its arguments are complete, else the engine's ("length":
    the budget ran out, and the arguments are cut where it did)."""
    return "tool_calls" if called and engine_finish == "stop" else engine_finish


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def spoken(data: str, text: str) -> dict[str, Any]:
    """The `audio` object of a spoken answer (its base64 audio and its transcript)."""
    return {"id": f"audio_{uuid.uuid4().hex}", "data": data, "expires_at": int(time.time()) + 3600,
            "transcript": text}


@contextlib.asynccontextmanager
async def freed_on_disconnect(request: Request, answers: list[Any]) -> AsyncIterator[None]:
    """While the block runs, a client that goes away cancels `answers` (their rows freed at the engine's next
    step)."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for answer in answers:
            answer.cancel()
    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


class Choice:
    """One choice's state on its way out: its row, detokeniser, stop scanner, token count and the logprobs
    entries of tokens whose text has not been sent yet."""

    def __init__(self, row: Any, detok: Any, stops: list[str]) -> None:
        self.row, self.detok, self.stop = row, detok, StopScanner(stops)
        self.generated = 0
        self.logprobs: list[dict[str, Any]] = []  # waiting for the text they go out with
        self.ready = 0  # how many of them go out with the text gathered so far
        self.t_last: float | None = None
        self.finished = False


TEXT = json.JSONEncoder(ensure_ascii=False)  # one encoder for the pieces (json.dumps with options builds one a call)
Piece = Union[tuple[int, str, list[dict[str, Any]]], tuple[int, str, str, Any]]


class Answering:
    """One chat answer of one or more choices: turns the engine's events in its Inbox ('token', i, id),
    ('logprobs', i, entry) ... ('finish', i, reason, error) into text, logprobs, usage, timings and the OpenAI
    response. `speak(text)` gives the spoken answer, base64 in the request's audio format; `logprob(entry)` an
    OpenAI logprobs.content item."""

    def __init__(self, req: ChatRequest, rows: list[Any], inbox: Inbox, t_arrival: float,
                 detok: Callable[[], Any], metrics: Metrics, model_id: str, speak: Callable[[str], Awaitable[str]],
                 logprob: Callable[[Any], dict[str, Any]]) -> None:
        self.req, self.inbox, self.t_arrival = req, inbox, t_arrival
        self.metrics, self.model_id, self.speak, self.logprob = metrics, model_id, speak, logprob
        self.choices = [Choice(row, detok(), req.stops) for row in rows]
        self.first = True
        # when the engine had the prompt ready (set by the route), gave the first id, finished the last choice
        self.t_start = self.t_first = self.t_end = t_arrival

    @property
    def generated(self) -> int:
        """Completion tokens of every choice so far."""
        return sum(c.generated for c in self.choices)

    def cancel(self) -> None:
        for choice in self.choices:
            choice.row.cancel()

    async def pieces(self) -> AsyncIterator[list[Piece]]:
        """What the engine gave since the last batch: per choice with new text, (choice, text, logprobs entries),
        the text of all its new tokens in one piece (with the entries of the tokens whose text it holds); a
        choice that finished, (choice, 'finish', reason, error) after its last piece. Returns once every choice
        has finished."""
        left = len(self.choices)
        while left:
            events = await self.inbox.take()
            now = time.perf_counter()
            out: list[Piece] = []
            texts: dict[int, str] = {}  # per choice, the text its tokens in this batch gave
            tokens: dict[int, int] = {}  # per choice, its tokens in this batch
            for kind, i, *rest in events:
                c = self.choices[i]
                if kind == "token":
                    tokens[i] = tokens.get(i, 0) + 1
                    if c.stop.stopped:
                        continue
                    text = c.stop.push(c.detok.push(rest[0]))
                    if c.stop.stopped:
                        c.row.cancel()
                    if text:
                        texts[i] = texts.get(i, "") + text
                        c.ready = len(c.logprobs)
                elif kind == "logprobs":
                    if not c.stop.stopped:
                        c.logprobs.append(self.logprob(rest[0]))
                elif kind == "finish":
                    self._count(tokens, now)
                    reason, error = rest
                    text = texts.pop(i, "")
                    if not c.stop.stopped:
                        text += c.stop.push(c.detok.flush()) + ("" if c.stop.stopped else c.stop.flush())
                    c.ready = len(c.logprobs)
                    if text or c.logprobs:
                        out.append((i, text, self._take(c)))
                    if reason == "cancelled" and not c.stop.stopped and error is None:
                        error = EngineClosed("the server is shutting down: the answer was cut")
                    c.finished = True
                    left -= 1
                    self.t_end = time.perf_counter()
                    if self.first:
                        self.t_first = self.t_end  # no id before the end: the prefill's EOS
                    out.append((i, "finish", finish_reason(reason, c.stop.stopped), error))
            self._count(tokens, now)
            out += [(i, text, self._take(self.choices[i])) for i, text in texts.items()]
            if out:
                yield out

    def _count(self, tokens: dict[int, int], now: float) -> None:
        """Count the tokens that arrived at `now` (per choice, how many) and observe their timings: the first
        token's time to first token, then inter-token gaps, a gap spread evenly over the tokens that arrived
        together after it."""
        for i, k in tokens.items():
            c = self.choices[i]
            c.generated += k
            self.metrics.completion_tokens += k
            if c.t_last is None:
                if self.first:
                    self.metrics.ttft.observe(now - self.t_arrival)
                    self.first = False
                    self.t_first = now
                if k > 1:
                    self.metrics.itl.observe(0.0, k - 1)
            else:
                self.metrics.itl.observe((now - c.t_last) / k, k)
            c.t_last = now
        tokens.clear()

    @staticmethod
    def _take(c: Choice) -> list[dict[str, Any]]:
        """The logprobs entries that go out with the text gathered so far."""
        out, c.logprobs, c.ready = c.logprobs[:c.ready], c.logprobs[c.ready:], 0
        return out

    def usage(self, prompt: Any) -> dict[str, Any]:
        """OpenAI's token counts (the prompt once, the completion tokens of every choice), plus `budget_cut`
        {requested, allowed, context} when the context could not hold the budget the client asked for
        (llama-server's way: the answer stops there, finish_reason "length")."""
        n = prompt.embeds.shape[0]
        done = self.generated
        return {"prompt_tokens": n, "completion_tokens": done, "total_tokens": n + done, **prompt.fitted}

    def logprobs_field(self, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        """A choice's `logprobs` object (null unless the request asked)."""
        return None if self.req.options.get("logprobs") is None else {"content": entries or [], "refusal": None}

    async def results(self) -> list[tuple[str, str, list[dict[str, Any]]]]:
        """Each choice's whole text, finish reason and logprobs entries, once all have finished (an engine error
        raised as the client's response)."""
        n = len(self.choices)
        texts, finishes, errors = [""] * n, ["stop"] * n, [None] * n
        entries: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        async for batch in self.pieces():
            for item in batch:
                if len(item) == 4:
                    finishes[item[0]], errors[item[0]] = item[2], item[3]
                else:
                    texts[item[0]] += item[1]
                    entries[item[0]] += item[2]
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise engine_error(error)
        return list(zip(texts, finishes, entries))

    async def collect(self, request: Request) -> list[tuple[str, str, list[dict[str, Any]]]]:
        """`results()`; a client that goes away meanwhile frees the rows at the next step."""
        async with freed_on_disconnect(request, [self]):
            return await self.results()

    async def whole(self, chat_id: str, prompt: Any, request: Request, headers: dict[str, str]) -> Response:
        """The answer as one chat.completion body."""
        results = await self.collect(request)
        choices = []
        for i, (text, finish, entries) in enumerate(results):
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            name, args = self.req.tool.split(text) if self.req.tool is not None else (None, "")
            if name is not None:  # a forced call: its arguments as the call, not as text
                message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                    {"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}}]}
                finish = tool_finish(finish, True)
            if self.req.speak:
                message["audio"] = spoken(await self.speak(text), text)
            choices.append({"index": i, "message": message, "finish_reason": finish,
                            "logprobs": self.logprobs_field(entries)})
        return JSONResponse({"id": chat_id, "object": "chat.completion", "created": int(time.time()),
                             "model": self.model_id, "choices": choices, "usage": self.usage(prompt)},
                            headers=headers)

    async def sse(self, chat_id: str, prompt: Any) -> AsyncIterator[str]:
        """The answer as chat.completion.chunk events (each for one choice, by `index`), then `data: [DONE]`; an
        error mid-stream is one error event. The events of one batch of pieces go out together (one write); a
        plain text piece is written into a template of its chunk. Leaving early (the client went away) frees the
        rows."""
        created = int(time.time())

        def chunk(i: int, delta: dict[str, Any], finish: str | None = None, usage: Any = None,
                  choices: bool = True, logprobs: list[dict[str, Any]] | None = None) -> str:
            obj = {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                   "choices": [{"index": i, "delta": delta, "finish_reason": finish,
                                "logprobs": self.logprobs_field(logprobs) if logprobs else None}]
                   if choices else []}
            if self.req.include_usage:
                obj["usage"] = usage
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        templates: dict[int, tuple[str, str]] = {}

        def content(i: int, piece: str) -> str:
            """chunk(i, {"content": piece}), the same text, from choice i's template."""
            if i not in templates:  # the marker (NUL bytes) cannot be in the ids or a model id from the command line
                head, tail = chunk(i, {"content": "\x00piece\x00"}).split(json.dumps("\x00piece\x00"))
                templates[i] = (head, tail)
            head, tail = templates[i]
            return head + TEXT.encode(piece) + tail

        tool = self.req.tool
        try:
            n = len(self.choices)
            yield "".join(chunk(i, {"role": "assistant", "content": None if tool else ""}) for i in range(n))
            # per choice: its text so far; for a forced call, whether its name was sent and how much of its arguments
            texts, named, sent = [""] * n, [False] * n, [0] * n
            async for batch in self.pieces():
                out: list[str] = []
                for item in batch:
                    if len(item) == 4:
                        i, _, finish, error = item
                        if error is not None:
                            yield "".join(out) + f"data: {json.dumps(engine_error(error).body())}\n\n"
                            return
                        if tool is not None:
                            if not named[i] and texts[i]:  # cut before the function's name was complete: the text
                                out.append(chunk(i, {"content": texts[i]}))
                            finish = tool_finish(finish, named[i])
                        if self.req.speak:
                            out.append(chunk(i, {"audio": spoken(await self.speak(texts[i]), texts[i])}))
                        out.append(chunk(i, {}, finish))
                        continue
                    i, piece, entries = item
                    texts[i] += piece
                    if tool is None:
                        out.append(chunk(i, {"content": piece}, logprobs=entries) if entries else content(i, piece))
                        continue
                    name, args = tool.split(texts[i])  # OpenAI's tool call deltas: the name first, then arguments
                    if name is None:
                        continue
                    if not named[i]:
                        named[i] = True
                        out.append(chunk(i, {"tool_calls": [{"index": 0, "id": call_id(), "type": "function",
                                                             "function": {"name": name, "arguments": ""}}]}))
                    if len(args) > sent[i]:
                        out.append(chunk(i, {"tool_calls": [{"index": 0, "function": {"arguments": args[sent[i]:]}}]},
                                         logprobs=entries))
                        sent[i] = len(args)
                if out:
                    yield "".join(out)
            end = chunk(0, {}, usage=self.usage(prompt), choices=False) if self.req.include_usage else ""
            yield end + "data: [DONE]\n\n"
        except ApiError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        finally:
            self.cancel()  # a no-op once finished; frees the rows when the client went away
