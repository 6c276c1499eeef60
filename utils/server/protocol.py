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
import json
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
MAX_JSON_DEPTH = 64  # nesting levels of a JSON body (a chat body needs 6); deeper is refused before parsing
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
    """A field of the wrong JSON type: 400 naming it, as OpenAI answers (a string "false" is not a boolean)."""
    found = {bool: "boolean", str: "string", dict: "object", list: "array", type(None): "null"}.get(
        type(value), type(value).__name__)
    return ApiError(400, f"'{name}' must be {want}, found {found}", "invalid_type", name)


STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_ok(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether no bracket of `raw` lies more than `limit` levels deep, counted outside strings, before json.loads
    sees it (its recursion would end in a RecursionError, and a 500, on a body nested 100,000 deep). Cheap: most
    bodies hold fewer brackets than the limit; otherwise the strings are cut out and the brackets counted."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return True
    depth = 0
    for c in STRING.sub(b"", raw).translate(None, NOT_BRACKETS):
        depth += 1 if c in (0x5B, 0x7B) else -1
        if depth > limit:
            return False
    return True


def parse_json(raw: bytes) -> Any:
    """A request's JSON body, its nesting bounded first (400, not a RecursionError)."""
    if not json_depth_ok(raw):
        raise ApiError(400, f"the body is not accepted: JSON nested deeper than {MAX_JSON_DEPTH} levels",
                       "invalid_json")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})", "invalid_json") from exc


def engine_error(exc: BaseException | None) -> ApiError:
    """The response for a row that failed in the engine: bad input is the client's (400), a stop is 503."""
    if isinstance(exc, OmniError):
        return ApiError(400, str(exc), "invalid_input")
    if isinstance(exc, EngineClosed):
        return ApiError(503, str(exc), "shutting_down")
    logging.getLogger("muomni.server").error("generation failed: %s: %s", type(exc).__name__, exc)
    return ApiError(500, f"generation failed ({type(exc).__name__})", "internal_error")


def optional(obj: dict[str, Any], name: str, kind: type, want: str, default: Any, prefix: str = "") -> Any:
    """Field `name` of `obj` when it has JSON type `kind`, `default` when absent or null, else a 400 naming it
    (`prefix` places a nested field: 'stream_options.include_usage')."""
    value = obj.get(name)
    if value is None:
        return default
    if type(value) is not kind:  # not isinstance: True is an int, and "false" is not a boolean
        raise type_error(prefix + name, want, value)
    return value


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
    if n is not None and (type(n) is not int or n != 1):
        raise ApiError(400, f"'n' {n!r}: only n = 1 is served", "invalid_value", "n")
    stream = optional(body, "stream", bool, "a boolean", False)
    stream_options = optional(body, "stream_options", dict, "an object", {})
    unknown = sorted(set(stream_options) - {"include_usage"})
    if unknown:
        raise ApiError(400, f"'stream_options.{unknown[0]}' is not supported (only include_usage)",
                       "invalid_value", f"stream_options.{unknown[0]}")
    include_usage = optional(stream_options, "include_usage", bool, "a boolean", False, "stream_options.")
    if stream_options and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "invalid_value",
                       "stream_options")
    optional(body, "user", str, "a string", None)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a non-empty string or up to {MAX_STOP} of them", "invalid_value", "stop")
    modalities = optional(body, "modalities", list, "an array", ["text"])
    if not all(m in ("text", "audio") for m in modalities) or "text" not in modalities:
        raise ApiError(400, "'modalities' must be [\"text\"] or [\"text\", \"audio\"]", "invalid_value", "modalities")
    speak = "audio" in modalities
    spec = optional(body, "audio", dict, "an object", None)
    if spec is not None:
        if not speak:
            raise ApiError(400, "'audio' (the spoken answer's format) needs 'modalities': [\"text\", \"audio\"]",
                           "invalid_value", "audio")
        optional(spec, "voice", str, "a string", None, "audio.")
    if speak and (spec is None or optional(spec, "format", str, "a string", "wav", "audio.") != "wav"):
        raise ApiError(400, "audio output needs 'audio': {\"format\": \"wav\"} (only wav is produced)",
                       "invalid_value", "audio")
    return ChatRequest(text, images, audio, len(messages) - 1, stream, include_usage, stops, speak,
                       generation_fields(body))


def parse_speech(body: Any) -> str:
    """The text of an audio.speech request (WAV at the model's one voice and pace is the only output)."""
    body = body_object(body)
    text = body.get("input")
    if not isinstance(text, str):
        raise type_error("input", "a string", text)
    fmt = optional(body, "response_format", str, "a string", "wav")
    if fmt != "wav":
        raise ApiError(400, f"response_format {fmt!r} is not supported (only wav)", "invalid_value",
                       "response_format")
    optional(body, "voice", str, "a string", None)
    speed = body.get("speed")
    if speed is not None and (type(speed) not in (int, float) or speed != 1):
        raise ApiError(400, f"'speed' {speed!r}: only speed 1 is produced", "invalid_value", "speed")
    return text


OCR_FIELDS = ("model", "image_url", "max_len")


def parse_ocr(body: Any) -> tuple[bytes, int | None]:
    """A /v1/ocr request: {"image_url": {"url": "data:image/png;base64,..."} (or the data URL itself), "max_len":
    optional int, "model": optional} -> (the encoded image, max_len or None). Any other field is refused."""
    body = body_object(body)
    unknown = sorted(set(body) - set(OCR_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(map(repr, unknown))} (an OCR request takes "
                            f"{', '.join(OCR_FIELDS)})", "unknown_field", unknown[0])
    if body.get("image_url") is None:
        raise ApiError(422, "'image_url' (the image, as a base64 data: URL) is required", "missing_field",
                       "image_url")
    return _image_bytes(body, "image_url"), optional(body, "max_len", int, "an integer", None)


def transcription_format(fmt: Any) -> str:
    if fmt not in TRANSCRIPTION_FORMATS:
        raise ApiError(400, f"response_format {fmt!r} is not supported (use {', '.join(TRANSCRIPTION_FORMATS)})",
                       "invalid_value", "response_format")
    return fmt
