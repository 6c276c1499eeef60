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

from utils.base.defaults import SPEECH_FORMATS, SPEECH_SPEEDS
from utils.base.errors import EngineClosed, OmniError
from utils.base.options import BY_NAME, JSON_STYLE, OPTIONS, OptionError, SamplingOptions

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
TIMESTAMP_GRANULARITIES = ("segment", "word")
# a chat answer's spoken audio.format -> the speech format (OpenAI's "pcm16" is the raw 16-bit samples)
CHAT_AUDIO_FORMATS = {**{f: f for f in SPEECH_FORMATS if f != "pcm"}, "pcm16": "pcm"}
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_JSON_DEPTH = 64  # nesting levels of a JSON body (a chat body needs 6); deeper is refused before parsing
# Rows a request sets through fields of OpenAI's own shape (`generation_fields` reads them): max_new_tokens from
# max_completion_tokens / max_tokens, logprobs from `logprobs` (a boolean) with `top_logprobs` (how many).
SHAPED_ROWS = ("max_new_tokens", "logprobs")
# A request's generation fields -> the table's rows; the first of two fields for one row wins.
OPTION_FIELDS: dict[str, str] = {"max_completion_tokens": "max_new_tokens", "max_tokens": "max_new_tokens",
                                 **{o.name: o.name for o in OPTIONS if o.http and o.name not in SHAPED_ROWS}}
MAX_CHOICES = 128  # OpenAI's bound on `n`; the server's --max_batch bounds it further


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

    def response(self, path: str = "") -> JSONResponse:
        """The error as a response; on Ollama's routes (`path` under /api/) in Ollama's shape {"error": message}."""
        body = {"error": self.message} if path.startswith("/api/") else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def type_error(name: str, want: str, value: Any) -> ApiError:
    """A field of the wrong JSON type: 400 naming it, as OpenAI answers (a string "false" is not a boolean)."""
    found = {bool: "boolean", str: "string", dict: "object", list: "array", type(None): "null"}.get(
        type(value), type(value).__name__)
    return ApiError(400, f"'{name}' must be {want}, found {found}", "invalid_type", name)


def refusal(name: str, why: str) -> ApiError:
    """A field the server refuses by name (400): "'NAME' WHY"."""
    return ApiError(400, f"'{name}' {why}", "invalid_value", name)


# ------------------------------------------------------------------ the fields of each request
@dataclass(frozen=True)
class Field:
    """How the server treats one request field, so that none is dropped without a word. "implemented": `note`
    names the test that shows it honoured. "no effect": accepted (of JSON type `kinds`) because it cannot change
    the answer, `note` says why. "refused": a 400 naming the field, `note` the reason, unless its value is one of
    `neutral`, which ask for exactly what the server does anyway (a client library's defaults: a 0 penalty)."""
    status: str
    note: str
    kinds: tuple[type, ...] = ()
    neutral: tuple[Any, ...] = ()

    def accepts(self, value: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in self.neutral)


def implemented(test: str) -> Field:
    return Field("implemented", test)


def no_effect(why: str, *kinds: type) -> Field:
    return Field("no effect", why, kinds)


def refused(why: str, *neutral: Any) -> Field:
    return Field("refused", why, neutral=neutral)


SERVE = "tests/test_serve.py::"
AUDIT = "tests/test_serve_fields.py::"
STRUCTURED = "tests/test_structured.py::"
NOT_YET = "is not supported by this server"
LEGACY_FUNCTIONS = "is not supported: OpenAI's deprecated function calling; send 'tools' and 'tool_choice'"
# Every field of a chat.completions request (OpenAI's, as the `openai` package types them, and the vLLM-style
# extensions of the options table): tests/test_serve_fields.py checks the table against the package and each row's
# behaviour. Implementing a field turns its row into `implemented(<its test>)`.
CHAT_FIELDS: dict[str, Field] = {
    "messages": implemented(SERVE + "test_chat_equals_cli"),
    "model": implemented(SERVE + "test_chat_errors"),
    "stream": implemented(SERVE + "test_chat_equals_cli"),
    "stream_options": implemented(SERVE + "test_chat_equals_cli"),
    "max_tokens": implemented(SERVE + "test_max_tokens_seed_and_stop"),
    "max_completion_tokens": implemented(SERVE + "test_max_tokens_seed_and_stop"),
    "temperature": implemented(SERVE + "test_max_tokens_seed_and_stop"),
    "seed": implemented(SERVE + "test_max_tokens_seed_and_stop"),
    "stop": implemented(SERVE + "test_max_tokens_seed_and_stop"),
    "top_p": implemented(AUDIT + "test_sampling_fields_equal_the_api"),
    "top_k": implemented(AUDIT + "test_sampling_fields_equal_the_api"),
    "repetition_penalty": implemented(AUDIT + "test_sampling_fields_equal_the_api"),
    "ignore_eos": implemented(SERVE + "test_max_tokens_seed_and_stop"),
    "n": implemented(SERVE + "test_n_choices_are_the_apis_seed_plus_i"),
    "modalities": implemented(SERVE + "test_speech_and_spoken_answer_are_wav"),
    "audio": implemented(AUDIT + "test_spoken_answer_formats"),
    "frequency_penalty": implemented(SERVE + "test_penalties_bias_and_min_p_equal_the_apis"),
    "presence_penalty": implemented(SERVE + "test_penalties_bias_and_min_p_equal_the_apis"),
    "logit_bias": implemented(SERVE + "test_penalties_bias_and_min_p_equal_the_apis"),
    "min_p": implemented(SERVE + "test_penalties_bias_and_min_p_equal_the_apis"),
    "logprobs": implemented(SERVE + "test_logprobs_equal_the_apis"),
    "top_logprobs": implemented(SERVE + "test_logprobs_equal_the_apis"),
    # accepted without effect: none can change the answer
    "user": no_effect("an end-user id for the provider's abuse monitoring", str),
    "safety_identifier": no_effect("an end-user id for the provider's abuse monitoring", str),
    "metadata": no_effect("tags for stored completions; this server stores nothing", dict),
    "store": no_effect("whether the provider keeps the completion; this server keeps nothing", bool),
    "service_tier": no_effect("the provider's processing tier (latency and price, not the answer)", str),
    "prompt_cache_key": no_effect("routing for the provider's prompt cache; a cache never changes an answer", str),
    "prompt_cache_retention": no_effect("how long the provider's prompt cache keeps a prefix", str),
    "prompt_cache_options": no_effect("breakpoints and lifetime of the provider's prompt cache", dict),
    # refused by name until implemented
    "response_format": implemented(STRUCTURED + "test_server_answers_validate_and_equal_the_api"),
    "tools": implemented(STRUCTURED + "test_forced_tool_call"),
    "tool_choice": implemented(STRUCTURED + "test_forced_tool_call"),
    "parallel_tool_calls": no_effect("at most one tool call is made whatever it says", bool),
    "functions": refused(LEGACY_FUNCTIONS),
    "function_call": refused(LEGACY_FUNCTIONS),
    "prediction": refused(f"{NOT_YET}: predicted outputs are not used"),
    "reasoning_effort": refused("is not supported: μOmni does not reason before it answers"),
    "verbosity": refused("is not supported: an answer's length is bounded by max_tokens only"),
    "web_search_options": refused("is not supported: the server searches nothing"),
    "moderation": refused("is not supported: the server runs no moderation model"),
    "max_new_tokens": refused("cannot be set per request: send max_tokens or max_completion_tokens"),
    **{o.name: refused("cannot be set per request: the server's engine fixes it when it starts")
       for o in OPTIONS if not o.http},
}
SPEECH_FIELDS: dict[str, Field] = {
    "input": implemented(AUDIT + "test_speech_formats_and_speed"),
    "model": implemented(AUDIT + "test_speech_formats_and_speed"),
    "response_format": implemented(AUDIT + "test_speech_formats_and_speed"),
    "speed": implemented(AUDIT + "test_speech_formats_and_speed"),
    "voice": no_effect("μOmni's talker has one voice; OpenAI requires the field, so every client sends one", str,
                       dict),
    "stream_format": refused("is not supported except 'audio': the audio is the response body, not SSE events",
                            "audio"),
    "instructions": refused("is not supported: the μOmni talker is not conditioned on text"),
}
TRANSCRIPTION_FIELDS: dict[str, Field] = {  # form fields; a list's parts come as "name[]"
    "file": implemented(SERVE + "test_transcription_equals_cli"),
    "model": implemented(SERVE + "test_transcription_equals_cli"),
    "response_format": implemented(SERVE + "test_transcription_equals_cli"),
    "stream": implemented(AUDIT + "test_streamed_transcription"),
    "timestamp_granularities": implemented(AUDIT + "test_timestamp_granularities"),
    "language": refused("is not supported: the CTC head reads one alphabet and takes no language hint"),
    "languages": refused("is not supported: the CTC head reads one alphabet and takes no language hint"),
    "prompt": refused("is not supported: a CTC transcription cannot be prompted"),
    "keywords": refused("is not supported: a CTC transcription cannot be prompted"),
    "temperature": refused("is not supported: the transcript is the greedy CTC path, with no sampling"),
    "include": refused("is not supported: transcript log-probabilities are not returned"),
    "chunking_strategy": refused("is not supported: the server splits the audio at silences itself (README, "
                                 "Transcription)"),
    "known_speaker_names": refused("is not supported: there is no speaker diarization"),
    "known_speaker_references": refused("is not supported: there is no speaker diarization"),
}


JSON_NAMES = {str: "a string", dict: "an object", bool: "a boolean"}


def check_fields(body: dict[str, Any], table: dict[str, Field]) -> None:
    """Every field of `body` by its row of `table`: an unknown field, or a refused one with a non-neutral value,
    is a 400 naming it; a no-effect field must have its JSON type. Null is "not given", as for every field."""
    for name, value in body.items():
        field = table.get(name)
        if field is None:
            raise ApiError(400, f"unknown field '{name}': this server does not implement it", "unknown_parameter",
                           name)
        if value is None or field.status == "implemented":
            continue
        if field.status == "refused" and not field.accepts(value):
            raise ApiError(400, f"'{name}' {field.note}", "unsupported_parameter", name)
        if field.kinds and type(value) not in field.kinds:
            raise type_error(name, " or ".join(JSON_NAMES[k] for k in field.kinds), value)


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


def optional(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], want: str, default: Any,
             prefix: str = "") -> Any:
    """Field `name` of `obj` when it has JSON type `kind` (or one of them), `default` when absent or null, else a
    400 naming it (`prefix` places a nested field: 'stream_options.include_usage')."""
    value = obj.get(name)
    if value is None:
        return default
    if type(value) not in (kind if isinstance(kind, tuple) else (kind,)):  # not isinstance: True is an int
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


TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class ToolCall:
    """A forced function call: the functions the answer may call. With one, the answer is its arguments (JSON
    valid against its parameters); with several, the grammar makes it NAME + newline + that function's
    arguments, so the name comes first (and can be streamed first)."""
    names: list[str]
    response_format: dict[str, Any]

    def split(self, text: str) -> tuple[str | None, str]:
        """(function name, arguments text) of an answer so far; the name is None until it is complete."""
        if len(self.names) == 1:
            return self.names[0], text
        name, newline, args = text.partition("\n")
        return (name, args) if newline else (None, "")


def _functions(tools: list[Any]) -> dict[str, dict[str, Any]]:
    """The `tools` array checked: function name -> its parameters schema (none: no parameters)."""
    found: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ApiError(400, f"'{at}' must be {{\"type\": \"function\", \"function\": {{...}}}} (only function "
                                "tools are served)", "invalid_value", "tools")
        fn = tool["function"]
        extra = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        if extra:
            raise ApiError(400, f"'{at}.function.{extra[0]}' is not supported", "invalid_value", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ApiError(400, f"'{at}.function.name' must be 1 to 64 letters, digits, '_' or '-'",
                           "invalid_value", "tools")
        if name in found:
            raise ApiError(400, f"'{at}': function {name!r} is declared twice", "invalid_value", "tools")
        optional(fn, "description", str, "a string", None, f"{at}.function.")
        optional(fn, "strict", bool, "a boolean", None, f"{at}.function.")
        found[name] = optional(fn, "parameters", dict, "a JSON schema object", NO_PARAMETERS, f"{at}.function.")
    return found


def parse_tools(body: dict[str, Any]) -> ToolCall | None:
    """The forced function call of a request, if any. μOmni was never taught to call tools, so it cannot decide
    between answering and calling: `tool_choice` must force the call ("required": one of the tools; or a named
    function), and "none" answers in text as OpenAI does. The legacy `functions` are refused by name."""
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise ApiError(400, f"'{legacy}' (OpenAI's deprecated form) is not served: send 'tools' and "
                                "'tool_choice'", "unsupported_parameter", legacy)
    tools = optional(body, "tools", list, "an array", [])
    choice = body.get("tool_choice")
    if not tools:
        if choice is not None and choice != "none":
            raise ApiError(400, "'tool_choice' needs 'tools'", "invalid_value", "tool_choice")
        return None
    functions = _functions(tools)
    if choice is None or choice == "auto":
        raise ApiError(400, "this model was never taught to call tools, so it cannot choose between answering and "
                            "calling one: set 'tool_choice' to \"required\" or name the function ({\"type\": "
                            "\"function\", \"function\": {\"name\": ...}}), or \"none\" to answer in text",
                       "invalid_value", "tool_choice")
    if choice == "none":
        return None
    if choice == "required":
        names = list(functions)
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise ApiError(400, f"'tool_choice' names function {name!r}, which 'tools' does not declare",
                           "invalid_value", "tool_choice")
        names = [name]
    else:
        raise ApiError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", "invalid_value", "tool_choice")
    if len(names) == 1:
        fmt = {"type": "json_schema", "json_schema": {"name": names[0], "schema": functions[names[0]]}}
    else:
        fmt = {"type": "grammar", "grammar": "start: " + "\n | ".join(
            f'"{n}\\n" %json ' + json.dumps({**functions[n], "x-guidance": JSON_STYLE}) for n in names)}
    return ToolCall(names, fmt)


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
    speech_format: str | None  # the spoken answer's (SPEECH_FORMATS), None for text only
    options: dict[str, Any]
    n: int = 1  # choices (one prefill, n rows)
    system: str | None = None  # joined before the text as the API's `system` does (Ollama's /api/generate)
    tool: ToolCall | None = None

    @property
    def speak(self) -> bool:
        return self.speech_format is not None

    @property
    def format_field(self) -> str:
        """The field a refusal of the answer's format names: `tools` for a forced call, else `response_format`."""
        return "tools" if self.tool is not None else "response_format"

    def to_sampling_params(self, defaults: SamplingOptions) -> SamplingOptions:
        """The typed options of this request: the model's defaults (generation_config.json) with the client's."""
        try:
            return defaults.updated(**self.options).checked()
        except OptionError as exc:
            field = self.format_field if exc.name == "response_format" else exc.name
            raise ApiError(400, str(exc), "invalid_value", field) from None


def generation_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The generation options of a request body, row name -> value. A field is checked by its row (400 naming
    the field when refused); a null field is not given; a row the server fixes at start is refused by name."""
    for option in OPTIONS:
        if body.get(option.name) is not None and option.name not in OPTION_FIELDS and option.name != "logprobs":
            fix = "send max_tokens or max_completion_tokens" if option.name == "max_new_tokens" else \
                "the server's engine fixes it when it starts"
            raise ApiError(400, f"'{option.name}' cannot be set per request: {fix}", "invalid_value", option.name)
    options = checked_fields(body, OPTION_FIELDS)
    wanted = optional(body, "logprobs", bool, "a boolean", False)
    top = body.get("top_logprobs")
    if top is not None:
        if not wanted:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "invalid_value", "top_logprobs")
        try:
            BY_NAME["logprobs"].check(top)
        except OptionError as exc:
            raise ApiError(400, f"'top_logprobs' {exc.reason}", "invalid_value", "top_logprobs") from None
    if wanted:
        options["logprobs"] = top or 0
    return options


def checked_fields(body: dict[str, Any], names: dict[str, str], prefix: str = "") -> dict[str, Any]:
    """Row name -> value for each field of `body` that `names` maps to a row (field -> row), checked by that
    row: a refusal is a 400 naming the field as sent (`prefix` places a nested one: 'options.num_predict')."""
    options: dict[str, Any] = {}
    for name, row in names.items():
        value = body.get(name)
        if value is None or row in options:
            continue
        try:
            options[row] = BY_NAME[row].check(value)
        except OptionError as exc:
            raise ApiError(400, f"'{prefix}{name}' {exc.reason}", "invalid_value", prefix + name) from None
    return options


def budget_field(body: dict[str, Any]) -> str:
    """The client's own name for the answer budget (the field it sent, max_tokens when it sent none), so that a
    note about the budget speaks its language."""
    return next((name for name, row in OPTION_FIELDS.items() if row == "max_new_tokens" and body.get(name) is not None),
                "max_tokens")


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


def stream_fields(body: dict[str, Any]) -> tuple[bool, bool]:
    """OpenAI's `stream` and `stream_options.include_usage` (only with `stream`)."""
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
    return stream, include_usage


def stop_strings(value: Any, name: str = "stop", limit: int = MAX_STOP) -> list[str]:
    """A request's stop strings: one non-empty string or a list of up to `limit`."""
    stops = [value] if isinstance(value, str) else [] if value is None else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > limit:
        raise ApiError(400, f"'{name}' must be a non-empty string or up to {limit} of them", "invalid_value", name)
    return stops


def parse_chat(body: Any) -> ChatRequest:
    """Validate a chat.completions body and map its last message onto a μOmni prompt (module docstring)."""
    body = body_object(body)
    check_fields(body, CHAT_FIELDS)
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

    n = optional(body, "n", int, "an integer", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"'n' {n!r} must be an integer in [1, {MAX_CHOICES}]", "invalid_value", "n")
    stream, include_usage = stream_fields(body)
    stops = stop_strings(body.get("stop"))
    modalities = optional(body, "modalities", list, "an array", ["text"])
    if not all(m in ("text", "audio") for m in modalities) or "text" not in modalities:
        raise ApiError(400, "'modalities' must be [\"text\"] or [\"text\", \"audio\"]", "invalid_value", "modalities")
    speak = "audio" in modalities
    spec = optional(body, "audio", dict, "an object", None)
    audio_format = None
    if spec is not None:
        if not speak:
            raise ApiError(400, "'audio' (the spoken answer's format) needs 'modalities': [\"text\", \"audio\"]",
                           "invalid_value", "audio")
        unknown = sorted(set(spec) - {"format", "voice"})
        if unknown:
            raise ApiError(400, f"unknown field 'audio.{unknown[0]}': this server does not implement it",
                           "unknown_parameter", f"audio.{unknown[0]}")
        optional(spec, "voice", (str, dict), "a string or an object", None, "audio.")  # one voice: SPEECH_FIELDS
        audio_format = optional(spec, "format", str, "a string", None, "audio.")
    if speak and audio_format not in CHAT_AUDIO_FORMATS:
        raise ApiError(400, f"audio output needs 'audio': {{\"format\": ...}}, one of {', '.join(CHAT_AUDIO_FORMATS)}"
                       + ("" if audio_format is None else f" (found {audio_format!r})"), "invalid_value",
                       "audio" if spec is None else "audio.format")
    if speak and n > 1:
        raise ApiError(400, "'n' > 1 with audio output is not served (one spoken answer per request)",
                       "invalid_value", "n")
    options = generation_fields(body)
    tool = parse_tools(body)
    if tool is not None:
        if speak:
            raise ApiError(400, "a tool call is not spoken: drop \"audio\" from 'modalities'", "invalid_value",
                           "modalities")
        if options.get("response_format") is not None:
            raise ApiError(400, "'response_format' cannot be combined with a forced tool call (the call's "
                                "arguments are the answer's format)", "invalid_value", "response_format")
        options["response_format"] = tool.response_format
    if stops and options.get("response_format") is not None:
        raise ApiError(400, "'stop' cannot be combined with a structured answer (response_format or a tool call): "
                            "a stop string would cut it", "invalid_value", "stop")
    return ChatRequest(text, images, audio, len(messages) - 1, stream, include_usage, stops,
                       CHAT_AUDIO_FORMATS[audio_format] if speak else None, options, n=n, tool=tool)


@dataclass
class SpeechRequest:
    """An audio.speech request: the text, the file format (SPEECH_FORMATS) and the tempo (SPEECH_SPEEDS)."""
    text: str
    format: str
    speed: float


def parse_speech(body: Any) -> SpeechRequest:
    """Validate an audio.speech body (its fields: SPEECH_FIELDS)."""
    body = body_object(body)
    check_fields(body, SPEECH_FIELDS)
    text = body.get("input")
    if not isinstance(text, str):
        raise type_error("input", "a string", text)
    fmt = optional(body, "response_format", str, "a string", "wav")
    if fmt not in SPEECH_FORMATS:
        raise ApiError(400, f"response_format {fmt!r} is not supported (use {', '.join(SPEECH_FORMATS)})",
                       "invalid_value", "response_format")
    speed = optional(body, "speed", (int, float), "a number", 1.0)
    low, high = SPEECH_SPEEDS
    if not low <= speed <= high:
        raise ApiError(400, f"'speed' {speed!r}: must be between {low} and {high}", "invalid_value", "speed")
    return SpeechRequest(text, fmt, float(speed))


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


@dataclass
class TranscriptionRequest:
    """An audio.transcriptions form (its fields: TRANSCRIPTION_FIELDS) less the upload itself."""
    format: str
    stream: bool
    segments: bool  # verbose_json's "segments" (with their "words" when `words` too)
    words: bool     # verbose_json's "words"


def parse_transcription(form: Any) -> TranscriptionRequest:
    """Validate an audio.transcriptions form: every field by TRANSCRIPTION_FIELDS (a list's parts come as
    'name[]'), `stream` as "true"/"false", `timestamp_granularities` with verbose_json only."""
    fields: dict[str, list[Any]] = {}
    for key, value in form.multi_items():
        fields.setdefault(key[:-2] if key.endswith("[]") else key, []).append(value)
    check_fields(fields, TRANSCRIPTION_FIELDS)
    fmt = fields.get("response_format", ["json"])[-1]
    if fmt not in TRANSCRIPTION_FORMATS:
        raise ApiError(400, f"response_format {fmt!r} is not supported (use {', '.join(TRANSCRIPTION_FORMATS)})",
                       "invalid_value", "response_format")
    stream = fields.get("stream", ["false"])[-1]
    if stream not in ("true", "false"):
        raise ApiError(400, f"'stream' must be true or false, found {stream!r}", "invalid_value", "stream")
    if stream == "true" and fmt not in ("json", "text"):
        raise ApiError(400, f"'stream' gives the text as it comes: use response_format json or text, not {fmt!r}",
                       "invalid_value", "stream")
    granularities = fields.get("timestamp_granularities")
    if granularities is None:
        return TranscriptionRequest(fmt, stream == "true", True, True)
    wrong = [g for g in granularities if g not in TIMESTAMP_GRANULARITIES]
    if wrong:
        raise ApiError(400, f"timestamp_granularities {wrong[0]!r} is not supported (use "
                            f"{', '.join(TIMESTAMP_GRANULARITIES)})", "invalid_value", "timestamp_granularities")
    if fmt != "verbose_json":
        raise ApiError(400, "timestamp_granularities needs response_format verbose_json (the only one with "
                            "timestamps to choose)", "invalid_value", "timestamp_granularities")
    return TranscriptionRequest(fmt, False, "segment" in granularities, "word" in granularities)
