"""The OpenAI-compatible HTTP app behind serve.py (Starlette): routes, request validation, streaming, metrics.

The model is used through omni.py's public API only. One BatchEngine (utils.engine.batching) owns it: chat requests
join its running decode batch; transcription, speech and the media encoders run on its thread between steps.

How OpenAI messages map onto μOmni's single-turn prompt: the thinker was trained on one user turn
(`[image tokens][audio tokens][bos] text`) without a chat template, so only the LAST message is the prompt,
and it must come from the user. Its text parts are joined with newlines; its images (in order) and its one
audio clip become the image and audio tokens. A message with media but no text gets the CLI's default prompt.
Earlier turns and system/developer messages are not shown to the model (it has no way to read them): they
are accepted, so chat UIs that send the whole history work, and the response says how many were left out in
the `X-Omni-Ignored-Messages` header.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import math
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from omni import OmniError, OmniModel
from utils.base.errors import EngineClosed, QueueFull
from utils.base.defaults import MAX_SEED
from utils.base.transcript import Transcript, format_transcript

TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")

log = logging.getLogger("muomni.server")

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
MAX_STOP = 4  # stop strings per request, as OpenAI
RETRY_AFTER_S = 1


@dataclass
class ServerConfig:
    model_id: str = "muomni"
    api_key: str | None = None
    max_body_bytes: int = 32 * 2 ** 20
    shutdown_timeout: float = 10.0
    webui: bool = True  # webui: the chat page at / (utils/server/webui.py); serve.py --no_webui turns it off


class ApiError(Exception):
    """An OpenAI-style error response: {"error": {"message", "type", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------- metrics (Prometheus text format)

class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def render(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return lines + [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}",
                        f"{name}_count {self.total}"]


class Metrics:
    """Counters and histograms, updated on the event loop's thread only; gauges read from the engine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def render(self) -> str:
        out = ["# HELP omni_requests_total HTTP requests by endpoint and status code.",
               "# TYPE omni_requests_total counter"]
        out += [f'omni_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())]
        for name, kind, value, text in (
                ("omni_prompt_tokens_total", "counter", self.prompt_tokens, "Prompt positions (text, image, audio)."),
                ("omni_completion_tokens_total", "counter", self.completion_tokens, "Generated tokens."),
                ("omni_rows_cancelled_total", "counter", self.engine.cancelled,
                 "Rows freed before finishing (client gone, stop string, shutdown)."),
                ("omni_queue_length", "gauge", self.engine.queued, "Requests waiting for a batch row."),
                ("omni_running_rows", "gauge", self.engine.running, "Rows in the running decode batch."),
                ("omni_max_batch", "gauge", self.engine.max_batch, "Rows the decode batch can hold.")):
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        out += ["# HELP omni_time_to_first_token_seconds From request arrival to the first generated token.",
                "# TYPE omni_time_to_first_token_seconds histogram",
                *self.ttft.render("omni_time_to_first_token_seconds"),
                "# HELP omni_inter_token_latency_seconds Time between consecutive generated tokens of a request.",
                "# TYPE omni_inter_token_latency_seconds histogram",
                *self.itl.render("omni_inter_token_latency_seconds")]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------- ASGI middleware

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
                                    f"{self.max_body} bytes", "request_too_large").response()(scope, receive,
                                                                                              counting_send)
            else:
                await self.app(scope, limited_receive, counting_send)
        except ApiError as exc:  # raised inside receive, outside any route's handler
            if not state["started"]:
                await exc.response()(scope, receive, counting_send)
        finally:
            key = (endpoint, state["status"])
            self.metrics.requests[key] = self.metrics.requests.get(key, 0) + 1
            log.info("%s %s %d in=%dB out=%dB %.3fs", scope["method"], endpoint, state["status"], state["in"],
                     state["out"], time.perf_counter() - t0)


# ---------------------------------------------------------------- request parsing

def _type_error(name: str, want: str, value: Any) -> ApiError:
    return ApiError(422, f"'{name}' must be {want}, found {type(value).__name__}", "invalid_type", name)


def _number(body: dict, name: str, low: float, high: float, integer: bool = False, low_open: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _type_error(name, "an integer" if integer else "a number", value)
    if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
        raise ApiError(400, f"'{name}' {value} is out of range ({'(' if low_open else '['}{low:g}, {high:g}])",
                       "invalid_value", name)
    return value


def _b64(data: Any, what: str) -> bytes:
    if not isinstance(data, str):
        raise _type_error(what, "a base64 string", data)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{what}: not valid base64 ({exc})", "invalid_base64", what) from exc


DATA_URL = re.compile(r"data:([\w/+.-]*)(?:;[\w=.-]+)*;base64,", re.ASCII)


def _image_bytes(part: dict, where: str) -> bytes:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise ApiError(422, f"{where}: image_url needs a 'url' string", "invalid_type", "image_url")
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: the server does not fetch URLs; send the image inline as a data: URL "
                            "(data:image/png;base64,...)", "url_not_supported", "image_url")
    m = DATA_URL.match(url)
    if m is None:
        raise ApiError(400, f"{where}: image_url must be a base64 data: URL (data:image/png;base64,...)",
                       "invalid_image_url", "image_url")
    return _b64(url[m.end():], f"{where}: image data")


@dataclass
class ChatRequest:
    text: str | None
    images: list[bytes]
    audio: bytes | None
    ignored: int
    stream: bool
    include_usage: bool
    stops: list[str]
    speak: bool
    gen: dict[str, Any]


def parse_chat(body: Any) -> ChatRequest:
    """Validate a chat.completions body and map its last message onto a μOmni prompt (module docstring)."""
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object", "invalid_type")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(422, "'messages' must be a non-empty array", "invalid_type", "messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ApiError(422, f"messages[{i}] must be an object with a 'role'", "invalid_type", "messages")
    last = messages[-1]
    where = f"messages[{len(messages) - 1}]"
    if last["role"] != "user":
        raise ApiError(400, f"{where}: the last message must come from the user (role 'user'), found "
                            f"{last['role']!r}: μOmni answers one user turn", "invalid_value", "messages")
    content = last.get("content")
    texts: list[str] = []
    images: list[bytes] = []
    audio: bytes | None = None
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise _type_error(f"{at}.text", "a string", part.get("text"))
                texts.append(part["text"])
            elif kind == "image_url":
                images.append(_image_bytes(part, at))
            elif kind == "input_audio":
                spec = part.get("input_audio")
                if not isinstance(spec, dict):
                    raise ApiError(422, f"{at}: input_audio must be an object with 'data' and 'format'",
                                   "invalid_type", "input_audio")
                if spec.get("format") not in AUDIO_FORMATS:
                    raise ApiError(400, f"{at}: input_audio format {spec.get('format')!r} is not supported (use "
                                        f"{', '.join(AUDIO_FORMATS)})", "invalid_value", "input_audio")
                if audio is not None:
                    raise ApiError(400, f"{at}: only one audio clip per message (the μOmni prompt has one audio "
                                        "slot)", "invalid_value", "input_audio")
                audio = _b64(spec.get("data"), f"{at}: input_audio data")
            else:
                raise ApiError(400, f"{at}: content part type {kind!r} is not supported (use text, image_url, "
                                    "input_audio)", "invalid_value", "messages")
    else:
        raise _type_error(f"{where}.content", "a string or an array of content parts", content)
    text = "\n".join(texts)
    if not text.strip():
        if not images and audio is None:
            raise ApiError(400, f"{where}: the message is empty (no text, image or audio)", "invalid_value",
                           "messages")
        text = None  # the CLI's default prompt for the media

    n = _number(body, "n", 1, 1, integer=True)
    del n  # only n = 1 is served (checked by the range)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _type_error("stream", "a boolean", stream)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _type_error("stream_options", "an object", stream_options)
    include_usage = bool(stream_options.get("include_usage", False))
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a non-empty string or up to {MAX_STOP} of them", "invalid_value", "stop")
    modalities = body.get("modalities") or ["text"]
    if (not isinstance(modalities, list) or not all(m in ("text", "audio") for m in modalities)
            or "text" not in modalities):
        raise ApiError(400, "'modalities' must be [\"text\"] or [\"text\", \"audio\"]", "invalid_value", "modalities")
    speak = "audio" in modalities
    if speak:
        spec = body.get("audio")
        if not isinstance(spec, dict) or spec.get("format", "wav") != "wav":
            raise ApiError(400, "audio output needs 'audio': {\"format\": \"wav\"} (only wav is produced)",
                           "invalid_value", "audio")

    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 31, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 1 << 31, integer=True)
    gen = {"max_new_tokens": max_tokens,
           "temperature": _number(body, "temperature", 0, 2),
           "top_p": _number(body, "top_p", 0, 1, low_open=True),
           "seed": _number(body, "seed", 0, MAX_SEED, integer=True),
           # extensions (as vLLM's server accepts them)
           "top_k": _number(body, "top_k", 0, 1 << 31, integer=True),
           "repetition_penalty": _number(body, "repetition_penalty", 0, 100, low_open=True)}
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _type_error("ignore_eos", "a boolean", ignore_eos)
    gen["ignore_eos"] = ignore_eos or None
    return ChatRequest(text, images, audio, len(messages) - 1, stream, include_usage, stops, speak,
                       {k: v for k, v in gen.items() if v is not None})


class StopScanner:
    """Cuts the answer at the first stop string; holds back text that could be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        self.text += piece
        if self.stops:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self.flush()
        safe = len(self.text) - self.hold
        if safe <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


# ---------------------------------------------------------------- the app

class OmniServer:
    def __init__(self, model: OmniModel, engine: Any, config: ServerConfig) -> None:
        self.model, self.engine, self.config = model, engine, config
        self.metrics = Metrics(engine)
        self.started = int(time.time())

    # -------------------------------------------------------- helpers
    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: Any) -> None:
        if name is not None and name != self.config.model_id:
            raise ApiError(404, f"model {name!r} not found (this server serves {self.config.model_id!r})",
                           "model_not_found", "model")

    async def json_body(self, request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON ({exc})", "invalid_json") from exc

    async def on_engine(self, fn: Any) -> Any:
        """Run model work on the scheduler thread (it owns the model) and await its result."""
        try:
            return await asyncio.wrap_future(self.engine.call(fn))
        except EngineClosed as exc:
            raise ApiError(503, str(exc), "shutting_down") from exc
        except OmniError as exc:
            raise ApiError(400, str(exc), "invalid_input") from exc

    async def load_request_media(self, req: ChatRequest) -> tuple[list[Any], Any]:
        """Image and audio bytes -> tensors / waveform, in a worker thread (no model weights are involved)."""
        from starlette.concurrency import run_in_threadpool

        def work() -> tuple[list[Any], Any]:
            media = self.model.load_media(image=req.images or None, audio=req.audio)
            return media.images, media.audio[0] if media.audio else None
        try:
            return await run_in_threadpool(work)
        except OmniError as exc:
            raise ApiError(400, str(exc), "invalid_media") from exc

    # -------------------------------------------------------- routes
    async def health(self, request: Request) -> Response:
        if self.engine.closing:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "running": self.engine.running, "queued": self.engine.queued,
                             "decode_kernel": self.engine.kernel})

    async def metrics_route(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model_route(self, request: Request) -> Response:
        self.check_auth(request)
        self.check_model(request.path_params["name"])
        return JSONResponse(self.model_card())

    def model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_id, "object": "model", "created": self.started, "owned_by": "muomni",
                "context_length": self.model.context_length, "components": self.model.components}

    async def chat(self, request: Request) -> Response:
        self.check_auth(request)
        t_arrival = time.perf_counter()
        body = await self.json_body(request)
        req = parse_chat(body)
        self.check_model(body.get("model"))
        if req.speak and "talker" not in self.model.components:
            raise ApiError(400, "audio output needs a talker checkpoint, and this model has none", "invalid_value",
                           "modalities")
        images, wave = await self.load_request_media(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(*event: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def prepare() -> Any:
            return self.model.prepare_chat(req.text, image=images or None, audio=wave, trim=False, **req.gen)

        try:
            row = self.engine.submit(prepare, lambda tid: put("token", tid), lambda r, e: put("finish", r, e),
                                     on_start=lambda p: put("start", p))
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", "queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except EngineClosed as exc:
            raise ApiError(503, str(exc), "shutting_down") from exc
        try:
            first = await events.get()
            if first[0] == "finish":
                raise self.row_error(first[2])
        except BaseException:
            row.cancel()
            raise
        prompt: Any = first[1]
        self.metrics.prompt_tokens += prompt.embeds.shape[0]
        chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        headers = {"X-Omni-Ignored-Messages": str(req.ignored)}
        if prompt.notes:  # e.g. audio trimmed to what a prompt can use: said, not silent
            headers["X-Omni-Warnings"] = "; ".join(prompt.notes).encode("ascii", "replace").decode()
        answer = Answering(self, req, row, events, t_arrival)
        if req.stream:
            return StreamingResponse(answer.sse(chat_id, prompt), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        return await answer.whole(chat_id, prompt, request, headers)

    def row_error(self, exc: BaseException | None) -> ApiError:
        if isinstance(exc, OmniError):
            return ApiError(400, str(exc), "invalid_input")
        if isinstance(exc, EngineClosed):
            return ApiError(503, str(exc), "shutting_down")
        log.error("generation failed: %s: %s", type(exc).__name__, exc)
        return ApiError(500, f"generation failed ({type(exc).__name__})", "internal_error")

    async def speech_b64(self, text: str) -> tuple[str, float]:
        speech = await self.on_engine(lambda: self.model.speak(text))
        from starlette.concurrency import run_in_threadpool
        data = await run_in_threadpool(speech.wav_bytes)
        return base64.b64encode(data).decode("ascii"), speech.seconds

    async def transcriptions(self, request: Request) -> Response:
        self.check_auth(request)
        try:
            form = await request.form(max_files=1, max_fields=16, max_part_size=self.config.max_body_bytes)
        except ApiError:
            raise
        except Exception as exc:  # the multipart parser's errors: a malformed upload
            raise ApiError(400, f"cannot read the multipart form ({exc})", "invalid_form") from exc
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "'file' (the audio upload) is required", "missing_field", "file")
            self.check_model(form.get("model"))
            fmt = form.get("response_format", "json")
            if fmt not in TRANSCRIPTION_FORMATS:
                raise ApiError(400, f"response_format {fmt!r} is not supported (use "
                               f"{', '.join(TRANSCRIPTION_FORMATS)})", "invalid_value", "response_format")
            data = await upload.read()
        finally:
            await form.close()
        result = await self.transcribe(data)
        if fmt == "text":
            return PlainTextResponse(result.text + "\n")
        if fmt == "json":
            return JSONResponse({"text": result.text})
        if fmt in ("srt", "vtt"):
            return PlainTextResponse(format_transcript(result, fmt),
                                     media_type="text/vtt" if fmt == "vtt" else "application/x-subrip")
        words = [w for seg in result["segments"] for w in seg.get("words", [])]
        return JSONResponse({"task": "transcribe", "language": result["language"], "duration": result["duration"],
                             "text": result.text, "segments": result["segments"], "words": words})

    async def transcribe(self, data: bytes) -> Transcript:
        """The one place the server transcribes: OmniModel.transcribe (CTC with segment and word timestamps,
        silences split by the voice-activity pass) over the uploaded bytes, on the engine's thread."""
        if not data:
            raise ApiError(400, "file: the upload is empty", "invalid_media")
        upload = io.BytesIO(data)
        upload.name = "file"
        return await self.on_engine(lambda: self.model.transcribe(upload))

    async def speech(self, request: Request) -> Response:
        self.check_auth(request)
        body = await self.json_body(request)
        if not isinstance(body, dict):
            raise ApiError(422, "the body must be a JSON object", "invalid_type")
        self.check_model(body.get("model"))
        text = body.get("input")
        if not isinstance(text, str):
            raise _type_error("input", "a string", text)
        fmt = body.get("response_format", "wav")
        if fmt != "wav":
            raise ApiError(400, f"response_format {fmt!r} is not supported (only wav)", "invalid_value",
                           "response_format")
        speech = await self.on_engine(lambda: self.model.speak(text))
        from starlette.concurrency import run_in_threadpool
        return Response(await run_in_threadpool(speech.wav_bytes), media_type="audio/wav")

    def build(self, lifespan: Any = None) -> Any:
        v1 = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
              Route("/v1/audio/transcriptions", self.transcriptions, methods=["POST"]),
              Route("/v1/audio/speech", self.speech, methods=["POST"]),
              Route("/v1/models", self.models, methods=["GET"]),
              Route("/v1/models/{name:path}", self.model_route, methods=["GET"])]
        routes = v1 + [Route("/health", self.health, methods=["GET"]),
                       Route("/metrics", self.metrics_route, methods=["GET"])]
        if self.config.webui:  # webui: the chat page and its assets (utils/server/webui.py)
            from utils.server import webui
            routes += webui.routes()

        async def api_error(request: Request, exc: Exception) -> Response:
            return exc.response()  # type: ignore[attr-defined]

        async def http_error(request: Request, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 500)
            detail = "no such route" if status == 404 else getattr(exc, "detail", "error")
            return ApiError(status, f"{request.method} {request.url.path}: {detail}",
                            {404: "not_found", 405: "method_not_allowed"}.get(status)).response()

        async def unexpected(request: Request, exc: Exception) -> Response:
            log.exception("unexpected error")
            return ApiError(500, f"internal error ({type(exc).__name__})", "internal_error").response()

        app = Starlette(routes=routes, lifespan=lifespan,
                        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: unexpected})
        known = {r.path for r in routes if "{" not in r.path}
        return Guard(app, self.metrics, self.config.max_body_bytes, known)


class Answering:
    """One chat answer: turns the engine's events into text, usage, timings and the OpenAI response."""

    def __init__(self, server: OmniServer, req: ChatRequest, row: Any, events: asyncio.Queue,
                 t_arrival: float) -> None:
        self.server, self.req, self.row, self.events = server, req, row, events
        self.t_arrival = t_arrival
        self.detok = server.model.detokenizer()
        self.stop = StopScanner(req.stops)
        self.generated = 0
        self.t_last: float | None = None

    async def pieces(self) -> AsyncIterator[str | tuple[str, BaseException | None]]:
        """Text pieces as they come; last, ('finish', reason, error)."""
        metrics = self.server.metrics
        while True:
            kind, *rest = await self.events.get()
            if kind == "token":
                now = time.perf_counter()
                if self.t_last is None:
                    metrics.ttft.observe(now - self.t_arrival)
                else:
                    metrics.itl.observe(now - self.t_last)
                self.t_last = now
                self.generated += 1
                metrics.completion_tokens += 1
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
                if reason == "cancelled":
                    if self.stop.stopped:
                        reason = "stop"
                    elif error is None:
                        error = EngineClosed("the server is shutting down: the answer was cut")
                yield ("finish", "stop" if reason == "stop" else reason, error)
                return

    def usage(self, prompt: Any) -> dict[str, int]:
        n = prompt.embeds.shape[0]
        return {"prompt_tokens": n, "completion_tokens": self.generated, "total_tokens": n + self.generated}

    async def whole(self, chat_id: str, prompt: Any, request: Request, headers: dict[str, str]) -> Response:
        async def watch() -> None:  # a client that goes away frees its row at the next step
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
            raise self.server.row_error(error)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if self.req.speak:
            data, _ = await self.server.speech_b64(text)
            message["audio"] = {"id": f"audio_{uuid.uuid4().hex}", "data": data,
                                "expires_at": int(time.time()) + 3600, "transcript": text}
        return JSONResponse({"id": chat_id, "object": "chat.completion", "created": int(time.time()),
                             "model": self.server.config.model_id,
                             "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                          "logprobs": None}],
                             "usage": self.usage(prompt)}, headers=headers)

    async def sse(self, chat_id: str, prompt: Any) -> AsyncIterator[str]:
        created = int(time.time())
        model_id = self.server.config.model_id

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None,
                  choices: bool = True) -> str:
            obj = {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
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
                        yield f"data: {json.dumps(self.server.row_error(error).body())}\n\n"
                        return
                    if self.req.speak:
                        data, _ = await self.server.speech_b64(text)
                        yield chunk({"audio": {"id": f"audio_{uuid.uuid4().hex}", "data": data,
                                               "expires_at": int(time.time()) + 3600, "transcript": text}})
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


def run_server(server: OmniServer, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT: then stop admitting, let running rows finish for up to the configured
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

    app = server.build(lifespan)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=bound + 2, lifespan="on")
    log.info("serving %s on http://%s:%d", server.config.model_id, host if ":" not in host else f"[{host}]", port)
    Graceful(config).run(sockets=[sock])
