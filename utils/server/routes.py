"""The endpoints: chat completions (joining the engine's running batch), transcriptions, speech, OCR, the model
list, health and metrics. The model is used through omni.py's public API only; one engine (OmniModel.batch_engine)
owns it: chat requests join its decode batch, and transcription, speech and the media encoders run on its
thread between steps."""
from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from omni import OmniError, OmniModel, Transcript
from utils.base.defaults import SPEECH_MEDIA_TYPES
from utils.base.errors import EngineClosed, QueueFull
from utils.base.transcript import format_transcript
from utils.server.metrics import Metrics
from utils.server.protocol import (ApiError, ChatRequest, body_object, budget_field, engine_error, parse_chat,
                                   parse_json, parse_ocr, parse_speech, parse_transcription, type_error)
from utils.server.streaming import Answering, Inbox, Outbox

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
        self.outbox = Outbox()  # the engine's events, handed to the event loop once per engine round
        engine.after_steps(self.outbox.flush)

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

    async def speech_bytes(self, text: str, fmt: str, speed: float = 1.0) -> bytes:
        """`text` spoken (on the engine's thread) at `speed`, as a `fmt` file (encoded in a worker thread)."""
        speech = await self.on_engine(lambda: self.model.speak(text))
        return await run_in_threadpool(lambda: speech.at_speed(speed).encoded(fmt))

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
        if req.n > self.engine.max_batch:
            raise ApiError(400, f"'n' {req.n}: this server decodes at most {self.engine.max_batch} rows together "
                                "(serve.py --max_batch)", "invalid_value", "n")
        if req.speak and "talker" not in self.model.components:
            raise ApiError(400, "audio output needs a talker checkpoint, and this model has none", "invalid_value",
                           "modalities")
        answer, prompt, headers = await self.begin(req, t_arrival, budget_name=budget_field(body))
        chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return StreamingResponse(answer.sse(chat_id, prompt), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        return await answer.whole(chat_id, prompt, request, headers)

    async def begin(self, req: ChatRequest, t_arrival: float, adjust: Callable[[Any], Any] | None = None,
                    budget_name: str = "max_tokens") -> tuple[Answering, Any, dict[str, str]]:
        """The one engine path of every generating route (OpenAI chat and completions, Ollama's chat and
        generate): the request's row submitted, its prompt ready (a failure raised as the client's error). Gives
        the answer's pump, the prompt (for usage) and the response headers. `adjust(prompt)`, on the engine's
        thread, may cut the prepared prompt's budget or refuse it (Ollama's num_ctx); `budget_name`: the client's
        own field for the answer budget, which a note about cutting it names."""
        opts = asdict(req.to_sampling_params(self.defaults))
        if opts["response_format"] is not None:  # a schema or grammar that does not compile: 400 naming the field
            try:
                await run_in_threadpool(self.model.constraint, opts["response_format"])
            except OmniError as exc:
                raise ApiError(400, str(exc), "invalid_value", req.format_field) from exc
        images, wave = await self.load_request_media(req)
        inbox = Inbox(self.outbox, asyncio.get_running_loop())
        put = inbox.put

        def prepare() -> Any:
            prompt = self.model.prepare_chat(req.text, image=images or None, audio=wave, trim=False,
                                             system=req.system, budget_name=budget_name, **opts)
            return prompt if adjust is None else adjust(prompt)

        def handlers(i: int) -> tuple[Callable[..., None], ...]:
            return (lambda tid: put("token", i, tid), lambda r, e: put("finish", i, r, e),
                    lambda entry: put("logprobs", i, entry))

        try:
            rows = self.engine.submit_choices(prepare, [handlers(i) for i in range(req.n)],
                                              on_start=lambda p: put("start", 0, p, time.perf_counter()))
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", "queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except EngineClosed as exc:
            raise ApiError(503, str(exc), "shutting_down") from exc
        try:
            await inbox.wait()
            first = inbox.events.popleft()  # "start", or a failed prepare's "finish"; the rest stays for the pump
            if first[0] == "finish":  # prepare failed: every choice finishes with its error
                raise engine_error(first[3])
        except BaseException:
            for row in rows:
                row.cancel()
            raise
        prompt: Any = first[2]
        self.metrics.prompt_tokens += prompt.embeds.shape[0]
        headers = {"X-Omni-Ignored-Messages": str(req.ignored)}
        if prompt.notes:  # e.g. audio trimmed, the budget cut to what the context leaves: said, not silent
            headers["X-Omni-Warnings"] = "; ".join(prompt.notes).encode("ascii", "replace").decode()
        async def speak(text: str) -> str:
            return base64.b64encode(await self.speech_bytes(text, req.speech_format or "wav")).decode("ascii")
        answer = Answering(req, rows, inbox, t_arrival, self.model.detokenizer, self.metrics, self.model_id, speak,
                           self.model.logprob_entry)
        answer.t_start = first[3]
        return answer, prompt, headers

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
            req = parse_transcription(form)
            data = await upload.read()
        finally:
            await form.close()
        result = await self.transcribe(data, req.words)
        fmt = req.format
        if req.stream:
            return StreamingResponse(transcript_events(result), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        if fmt == "text":
            return PlainTextResponse(result.text + "\n")
        if fmt == "json":
            return JSONResponse({"text": result.text})
        if fmt in ("srt", "vtt"):
            return PlainTextResponse(format_transcript(result, fmt),
                                     media_type="text/vtt" if fmt == "vtt" else "application/x-subrip")
        verbose = {"task": "transcribe", "language": result["language"], "duration": result["duration"],
                   "text": result.text}
        if req.segments:
            verbose["segments"] = result["segments"]
        if req.words:
            verbose["words"] = [w for seg in result["segments"] for w in seg.get("words", [])]
        return JSONResponse(verbose)

    async def transcribe(self, data: bytes, word_timestamps: bool = True) -> Transcript:
        """The one place the server transcribes: OmniModel.transcribe (CTC with segment and word timestamps,
        silences split by the voice-activity pass) over the uploaded bytes, on the engine's thread."""
        if not data:
            raise ApiError(400, "file: the upload is empty", "invalid_media")
        upload = io.BytesIO(data)
        upload.name = "file"
        return await self.on_engine(lambda: self.model.transcribe(upload, word_timestamps=word_timestamps))

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
        req = parse_speech(body)
        return Response(await self.speech_bytes(req.text, req.format, req.speed),
                        media_type=SPEECH_MEDIA_TYPES[req.format])


def transcript_events(result: Transcript) -> Iterator[str]:
    """A finished transcript as OpenAI streams one: a `transcript.text.delta` per segment (joined, they are the
    text), then `transcript.text.done` with the whole text. The CTC pass ends before the first event: the events
    carry OpenAI's shape for streaming clients, not earlier text."""
    for i, seg in enumerate(result.segments):
        delta = seg["text"] if i == 0 else " " + seg["text"]
        yield f"data: {json.dumps({'type': 'transcript.text.delta', 'delta': delta}, ensure_ascii=False)}\n\n"
    yield f"data: {json.dumps({'type': 'transcript.text.done', 'text': result.text}, ensure_ascii=False)}\n\n"
