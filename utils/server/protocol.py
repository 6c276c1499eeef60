"""The OpenAI wire format: request bodies turned into typed requests, and errors turned into OpenAI error bodies.

Each generation field of a chat request is checked by its row of the options table (utils.base.options), so
the server accepts and refuses exactly what the CLI, the REPL and the API do; a refusal is HTTP 400 whose
`param` is the client's own field name (`max_tokens` and `max_completion_tokens` both feed `max_new_tokens`).
`ChatRequest.to_sampling_params` then gives the engine typed options, as vLLM's request classes do.

How OpenAI messages map onto μOmni's single-turn prompt: the thinker was trained on one user turn
(`[image tokens][audio tokens][bos] text`) without a chat template, so only the LAST message is the prompt,
and it must come from the user. Its text parts are joined with newlines; its images (in order) and its one
audio clip become the image and audio tokens. A message with media but no text gets the CLI's default prompt.
Earlier turns and system/developer messages are not shown to the model (it has no way to read them): they
are accepted, so chat UIs that send the whole history work, and the response says how many were left out in
the `X-Omni-Ignored-Messages` header.
"""
from __future__ import annotations

import base64
import binascii
import logging
import re
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from utils.base.errors import EngineClosed, OmniError
from utils.base.options import BY_NAME, OPTIONS, OptionError, SamplingOptions

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
MAX_STOP = 4  # stop strings per request, as OpenAI
# A request's generation fields -> the table's rows; the first of two fields for one row wins.
OPTION_FIELDS: dict[str, str] = {"max_completion_tokens": "max_new_tokens", "max_tokens": "max_new_tokens",
                                 **{o.name: o.name for o in OPTIONS if o.http and o.name != "max_new_tokens"}}


class ApiError(Exception):
    """An OpenAI-style error response: {"error": {"message", "type", "param", "code"}}."""

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


def type_error(name: str, want: str, value: Any) -> ApiError:
    return ApiError(422, f"'{name}' must be {want}, found {type(value).__name__}", "invalid_type", name)


def engine_error(exc: BaseException | None) -> ApiError:
    """The response for a row that failed in the engine: bad input is the client's (400), a stop is 503."""
    if isinstance(exc, OmniError):
        return ApiError(400, str(exc), "invalid_input")
    if isinstance(exc, EngineClosed):
        return ApiError(503, str(exc), "shutting_down")
    logging.getLogger("muomni.server").error("generation failed: %s: %s", type(exc).__name__, exc)
    return ApiError(500, f"generation failed ({type(exc).__name__})", "internal_error")


def body_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object", "invalid_type")
    return body


def _b64(data: Any, what: str) -> bytes:
    if not isinstance(data, str):
        raise type_error(what, "a base64 string", data)
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
    """A chat.completions request as the engine needs it: the prompt's parts, how to answer, and the generation
    options the client gave (row name -> value, each checked by its row)."""
    text: str | None
    images: list[bytes]
    audio: bytes | None
    ignored: int
    stream: bool
    include_usage: bool
    stops: list[str]
    speak: bool
    options: dict[str, Any]

    def to_sampling_params(self, defaults: SamplingOptions) -> SamplingOptions:
        """The typed options of this request: the model's defaults (generation_config.json) with the client's."""
        return defaults.updated(**self.options)


def generation_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The generation options of a request body, row name -> value. A field is checked by its row (400 naming
    the field when refused); a null field is not given; a row the server fixes at start is refused by name."""
    for option in OPTIONS:
        if body.get(option.name) is not None and option.name not in OPTION_FIELDS:
            fix = "send max_tokens or max_completion_tokens" if option.name == "max_new_tokens" else \
                "the server's engine fixes it when it starts"
            raise ApiError(400, f"'{option.name}' cannot be set per request: {fix}", "invalid_value", option.name)
    options: dict[str, Any] = {}
    for name, row in OPTION_FIELDS.items():
        value = body.get(name)
        if value is None or row in options:
            continue
        try:
            options[row] = BY_NAME[row].check(value)
        except OptionError as exc:
            raise ApiError(400, f"'{name}' {exc.reason}", "invalid_value", name) from None
    return options


def _content(last: dict[str, Any], where: str) -> tuple[str | None, list[bytes], bytes | None]:
    """The last message's text (None: the CLI's default prompt for its media), images and audio clip."""
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
                    raise type_error(f"{at}.text", "a string", part.get("text"))
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
        raise type_error(f"{where}.content", "a string or an array of content parts", content)
    text = "\n".join(texts)
    if not text.strip():
        if not images and audio is None:
            raise ApiError(400, f"{where}: the message is empty (no text, image or audio)", "invalid_value",
                           "messages")
        return None, images, audio
    return text, images, audio


def parse_chat(body: Any) -> ChatRequest:
    """Validate a chat.completions body and map its last message onto a μOmni prompt (module docstring)."""
    body = body_object(body)
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
    text, images, audio = _content(last, where)

    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, f"'n' {n!r}: only n = 1 is served", "invalid_value", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise type_error("stream", "a boolean", stream)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise type_error("stream_options", "an object", stream_options)
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
    return ChatRequest(text, images, audio, len(messages) - 1, stream, include_usage, stops, speak,
                       generation_fields(body))


def parse_speech(body: Any) -> str:
    """The text of an audio.speech request (WAV is the only format produced)."""
    body = body_object(body)
    text = body.get("input")
    if not isinstance(text, str):
        raise type_error("input", "a string", text)
    fmt = body.get("response_format", "wav")
    if fmt != "wav":
        raise ApiError(400, f"response_format {fmt!r} is not supported (only wav)", "invalid_value",
                       "response_format")
    return text


def transcription_format(fmt: Any) -> str:
    if fmt not in TRANSCRIPTION_FORMATS:
        raise ApiError(400, f"response_format {fmt!r} is not supported (use {', '.join(TRANSCRIPTION_FORMATS)})",
                       "invalid_value", "response_format")
    return fmt
