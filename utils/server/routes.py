"""The endpoints: chat completions (joining the engine's running batch), transcriptions, speech, OCR, the model
list, health and metrics. The model is used through omni.py's public API only; one engine (OmniModel.batch_engine)
owns it: chat requests join its decode batch, and transcription, speech and the media encoders run on its
thread between steps."""
from __future__ import annotations

import asyncio
import base64
import functools
import io
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from omni import OmniError, OmniModel, Transcript
from utils.base.errors import EngineClosed, QueueFull
from utils.base.transcript import format_transcript
from utils.server.metrics import Metrics
from utils.server.protocol import (ApiError, ChatRequest, body_object, engine_error, parse_chat,
                                   parse_json, parse_ocr, parse_speech, transcription_format, type_error)
from utils.server.streaming import Answering

RETRY_AFTER_S = 1


@dataclass
class ServerConfig:
    """serve.py's server flags: the model id requests name, the API key, the body limit, the stop's bound, the page."""
    model_id: str = "muomni"
    api_key: str | None = None
    max_body_bytes: int = 32 * 2 ** 20
    shutdown_timeout: float = 10.0
    webui: bool = True  # the chat page at / (utils/server/webui.py); serve.py --no_webui turns it off


class OmniServer:
    """The route handlers over one model and its engine."""

    def __init__(self, model: OmniModel, engine: Any, config: ServerConfig) -> None:
        self.model, self.engine, self.config = model, engine, config
        self.model_id = config.model_id
        self.defaults = model.sampling_options()  # generation_config.json: what a request does not set
        self.metrics = Metrics(engine)
        self.started = int(time.time())

    # -------------------------------------------------------- helpers
    def check_model(self, name: Any) -> None:
        if name is not None and not isinstance(name, str):
            raise type_error("model", "a string", name)
        if name is not None and name != self.model_id:
            raise ApiError(404, f"model {name!r} not found (this server serves {self.model_id!r})",
                           "model_not_found", "model")

    async def json_body(self, request: Request) -> Any:
        return parse_json(await request.body())

    async def on_engine(self, fn: Callable[[], Any]) -> Any:
        """Run model work on the scheduler thread (it owns the model) and await its result."""
        try:
            return await asyncio.wrap_future(self.engine.call(fn))
        except EngineClosed as exc:
            raise ApiError(503, str(exc), "shutting_down") from exc
        except OmniError as exc:
            raise ApiError(400, str(exc), "invalid_input") from exc

    async def load_request_media(self, req: ChatRequest) -> tuple[list[Any], Any]:
        """Image and audio bytes -> tensors / waveform, in a worker thread (no model weights are involved)."""
        def work() -> tuple[list[Any], Any]:
            media = self.model.load_media(image=req.images or None, audio=req.audio)
            return media.images, media.audio[0] if media.audio else None
        try:
            return await run_in_threadpool(work)
        except OmniError as exc:
            raise ApiError(400, str(exc), "invalid_media") from exc

    async def speech_b64(self, text: str) -> str:
        """`text` spoken (on the engine's thread), as base64 WAV."""
        speech = await self.on_engine(lambda: self.model.speak(text))
        return base64.b64encode(await run_in_threadpool(speech.wav_bytes)).decode("ascii")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.started, "owned_by": "muomni",
                "context_length": self.model.context_length, "components": self.model.components,
                "details": self.details}

    @functools.cached_property
    def details(self) -> dict[str, Any]:
        """What `--info` shows, less the server's file paths (a client has no business knowing them): parameter
        counts, dtype, device, format, architecture, vocabulary, decode mode and step, generation defaults."""
        info = self.model.info()
        return {"format": info["format"], "parameters": info["parameters"], "dtype": info["dtype"],
                "device": info["device"], "decode_attention": info["decode_attention"],
                "decode_kernel": self.engine.kernel, "generation_defaults": info["generation_defaults"],
                "components": {name: {"parameters": part["parameters"]} for name, part in info["components"].items()},
                **({"thinker": info["thinker"]} if "thinker" in info else {}),
                **({"vocabulary": {k: v for k, v in info["vocabulary"].items() if k != "tokenizer"}}
                   if "vocabulary" in info else {})}

    # -------------------------------------------------------- routes
    async def health(self, request: Request) -> Response:
        if self.engine.closing:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "running": self.engine.running, "queued": self.engine.queued,
                             "decode_kernel": self.engine.kernel})

    async def metrics_route(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model_route(self, request: Request) -> Response:
        self.check_model(request.path_params["name"])
        return JSONResponse(self.model_card())

    async def chat(self, request: Request) -> Response:
        t_arrival = time.perf_counter()
        body = await self.json_body(request)
        req = parse_chat(body)
        self.check_model(body.get("model"))
        opts = asdict(req.to_sampling_params(self.defaults))
        if req.speak and "talker" not in self.model.components:
            raise ApiError(400, "audio output needs a talker checkpoint, and this model has none", "invalid_value",
                           "modalities")
        images, wave = await self.load_request_media(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(*event: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def prepare() -> Any:
            return self.model.prepare_chat(req.text, image=images or None, audio=wave, trim=False, **opts)

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
                raise engine_error(first[2])
        except BaseException:
            row.cancel()
            raise
        prompt: Any = first[1]
        self.metrics.prompt_tokens += prompt.embeds.shape[0]
        chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        headers = {"X-Omni-Ignored-Messages": str(req.ignored)}
        if prompt.notes:  # e.g. audio trimmed to what a prompt can use: said, not silent
            headers["X-Omni-Warnings"] = "; ".join(prompt.notes).encode("ascii", "replace").decode()
        answer = Answering(req, row, events, t_arrival, self.model.detokenizer(), self.metrics, self.model_id,
                           self.speech_b64)
        if req.stream:
            return StreamingResponse(answer.sse(chat_id, prompt), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        return await answer.whole(chat_id, prompt, request, headers)

    async def transcriptions(self, request: Request) -> Response:
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
            fmt = transcription_format(form.get("response_format", "json"))
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

    async def ocr(self, request: Request) -> Response:
        """POST /v1/ocr: the text in one image (OmniModel.ocr on the engine's thread). An endpoint of its own rather
        than an option of chat completions: reading text is not a chat answer (no tokens, no sampling options, no
        stream), and a client that wants the text in a question joins it into its message itself, as
        infer_chat.py --ocr --text does ("TEXT (OCR extracted: OCR)")."""
        body = body_object(await self.json_body(request))
        self.check_model(body.get("model"))
        image, max_len = parse_ocr(body)
        options = {} if max_len is None else {"max_len": max_len}
        result = await self.on_engine(lambda: self.model.ocr(image, **options))
        return JSONResponse({"object": "ocr", "model": self.model_id, "text": result.text, "ids": result.ids,
                             "stop": result.stop})

    async def speech(self, request: Request) -> Response:
        body = body_object(await self.json_body(request))
        self.check_model(body.get("model"))
        text = parse_speech(body)
        speech = await self.on_engine(lambda: self.model.speak(text))
        return Response(await run_in_threadpool(speech.wav_bytes), media_type="audio/wav")

