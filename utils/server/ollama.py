"""Ollama's API on serve.py: /api/chat and /api/generate (NDJSON streaming by default, or one body with
`stream: false`), /api/tags, /api/show, /api/ps and /api/version, so Ollama's clients (the `ollama` Python and
JS libraries, Open WebUI, editors' plugins) work against μOmni. Errors are Ollama's shape, {"error": "..."}.

The answers come from the OpenAI chat route's engine path (OmniServer.begin: the same row, prompt and stop
scanner); only the wire format differs. The model is the server's one model, named as on /v1 (`--model_name`);
Ollama's default tag is accepted (`muomni:latest` is `muomni`).

Prompts map as on /v1/chat/completions (utils.server.protocol): /api/chat prompts with the last message only,
which must come from the user (its `content`, its `images` as base64 strings; images without text get the
CLI's default prompt); earlier turns and system messages are not shown to the model and
`X-Omni-Ignored-Messages` counts them. /api/generate prompts with `prompt` and `images`, its `system` joined
before the text as the API's `system` does ("SYSTEM TEXT").

`options`: temperature, num_predict (max_new_tokens), top_k, top_p, seed, repeat_penalty (repetition_penalty:
over every token of the prompt and answer), each checked by its row of utils.base.options as the OpenAI fields
are; stop (strings the answer is cut at, as OpenAI's `stop`); num_ctx (a cap on prompt plus answer, at most the
model's context: the answer budget is cut to fit it, said in X-Omni-Warnings; a prompt that leaves no room is
refused). Any other option is refused by name.

The other request fields, decided one by one:
- `format` ("json" or a JSON schema): the answer held to it, as the OpenAI route's `response_format`
  (`output_format`); with `options.stop` refused, since a stop string would cut the structured answer.
- `keep_alive`: no effect: the server keeps its one model loaded while it runs, which meets any keep-alive; 0
  (unload now) is refused, as the server never unloads it.
- `think`: false is what the model does; true or a level is refused (μOmni has no thinking mode).
- `raw` (generate): no effect: μOmni has no template, so the raw prompt and the templated one are the same
  `[bos] text`; with `system` refused (a raw prompt has no place for one).
- `template` (generate): refused unless empty (the one prompt form is `[bos] text`).
- `context` (generate): refused unless empty (μOmni answers single turns); responses carry no `context`.
- `suffix` (generate): refused unless empty (no fill-in-the-middle).
- `tools` (chat): refused unless empty (no tool calling); `logprobs` / `top_logprobs`: refused when asked.
- An empty /api/generate prompt without images, or /api/chat with no messages, answers done_reason "load" as
  Ollama does (the model is loaded already): clients send them to preload a model.

Durations are nanoseconds, measured per request: total (arrival to the last token), load (arrival until the
prompt is ready: media decoded and encoded, a row free; the model itself was loaded once, at start),
prompt_eval (the prefill), eval (first token to the end). prompt_eval_count is the prompt's positions (image
and audio tokens included), eval_count the answer's tokens.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from omni import OmniError
from utils.base.version import __version__
from utils.server.protocol import (ApiError, ChatRequest, _b64, body_object, checked_fields, engine_error,
                                   optional, refusal, stop_strings, type_error)
from utils.server.routes import OmniServer
from utils.server.streaming import Answering

# Ollama's option names -> rows of the options table
OPTION_ROWS: dict[str, str] = {"num_predict": "max_new_tokens", "temperature": "temperature", "top_k": "top_k",
                               "top_p": "top_p", "seed": "seed", "repeat_penalty": "repetition_penalty"}
OPTIONS = (*OPTION_ROWS, "stop", "num_ctx")
MAX_STOP = 64  # stop strings per request (Ollama sets no limit; each costs a search per piece)
COMMON = {"model", "stream", "options", "format", "keep_alive", "think", "logprobs", "top_logprobs"}
CHAT_FIELDS = COMMON | {"messages", "tools"}
GENERATE_FIELDS = COMMON | {"prompt", "images", "system", "raw", "template", "context", "suffix"}
MESSAGE_FIELDS = {"role", "content", "images"}
DURATION = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)([+-]?(\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))*")
NDJSON = "application/x-ndjson"


def output_format(value: Any) -> dict[str, Any] | None:
    """`format` as the options table's response_format: "json" (any JSON object) or a JSON schema the answer
    must follow (constrained decoding, utils.engine.constrain); absent or "" for free text."""
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise refusal("format", f"{value!r} must be \"json\" or a JSON schema object")


def with_format(rows: dict[str, Any], stops: list[str], value: Any) -> None:
    """`format` into the request's rows; refused with stop strings, which would cut the structured answer."""
    fmt = output_format(value)
    if fmt is not None:
        if stops:
            raise refusal("options.stop", "cannot be combined with 'format': a stop string would cut the answer")
        rows["response_format"] = fmt


def check_fields(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise refusal(unknown[0], f"is not supported by this server (known fields: {', '.join(sorted(known))})")


def keep_alive(value: Any) -> None:
    """Checked, and of no effect: the one model stays loaded while the server runs. 0 (unload now) is refused."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise type_error("keep_alive", "a number of seconds or a duration string (\"5m\")", value)
    if isinstance(value, str) and value != "0" and not DURATION.fullmatch(value):
        raise refusal("keep_alive", f"{value!r} is not a duration (e.g. \"5m\", \"1h30m\", -1)")
    zero = value == 0 if not isinstance(value, str) else not any(c in "123456789" for c in value)
    if zero:
        raise refusal("keep_alive", "0 asks to unload the model: this server keeps its one model loaded while it "
                                    "runs")


def common_fields(body: dict[str, Any]) -> bool:
    """The fields chat and generate share, other than the prompt: `stream` (default true, as Ollama) returned."""
    keep_alive(body.get("keep_alive"))
    think = body.get("think")
    if think not in (None, False):
        raise refusal("think", f"{think!r}: this model has no thinking mode (send false or leave it out)")
    if optional(body, "logprobs", bool, "a boolean", False):
        raise refusal("logprobs", "is not available on this server")
    if optional(body, "top_logprobs", int, "an integer", 0):
        raise refusal("top_logprobs", "is not available on this server")
    return optional(body, "stream", bool, "a boolean", True)


def request_options(body: dict[str, Any], context_length: int) -> tuple[dict[str, Any], list[str], int | None]:
    """`options` -> (table rows -> values, stop strings, num_ctx), each checked; other keys refused by name."""
    options = optional(body, "options", dict, "an object", {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise refusal(f"options.{unknown[0]}", f"is not supported by this server (supported: {', '.join(OPTIONS)})")
    num_predict = options.get("num_predict")
    if type(num_predict) is int and num_predict < 0:
        raise refusal("options.num_predict", f"{num_predict} (no limit / fill the context) is not served: give a "
                                             "number of tokens")
    rows = checked_fields(options, OPTION_ROWS, "options.")
    stops = stop_strings(options.get("stop"), "options.stop", MAX_STOP)
    num_ctx = options.get("num_ctx")
    if num_ctx is not None and (type(num_ctx) is not int or not 1 <= num_ctx <= context_length):
        raise refusal("options.num_ctx", f"{num_ctx!r} must be an integer in [1, {context_length}] (the model's "
                                         "context)")
    return rows, stops, num_ctx


def fit_context(num_ctx: int | None) -> Callable[[Any], Any] | None:
    """num_ctx as a cap on a prepared prompt: the answer budget cut to what the cap leaves (with a note), a prompt
    that leaves no room refused."""
    if num_ctx is None:
        return None

    def fit(prompt: Any) -> Any:
        room = num_ctx - prompt.embeds.shape[0]
        if room < 1:
            raise OmniError(f"options.num_ctx {num_ctx}: the prompt ({prompt.embeds.shape[0]} positions) leaves no "
                            "room for an answer")
        if prompt.opts.max_new_tokens > room:
            prompt.notes.append(f"num_predict reduced from {prompt.opts.max_new_tokens} to {room} to fit "
                                f"num_ctx {num_ctx}")
            prompt.opts.max_new_tokens = room
        return prompt
    return fit


def images_of(value: Any, where: str) -> list[bytes]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise type_error(where, "an array of base64 strings", value)
    return [_b64(image, f"{where}[{i}]") for i, image in enumerate(value)]


def chat_prompt(messages: list[Any]) -> tuple[str | None, list[bytes], int]:
    """The last message as the prompt (text or None for the default prompt of its images), its images, and how
    many earlier messages the model does not see (module docstring)."""
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", "invalid_type", "messages")
    where = f"messages[{len(messages) - 1}]"
    last = messages[-1]
    if last["role"] != "user":
        raise refusal(f"{where}.role", f"{last['role']!r}: the last message must come from the user: μOmni answers "
                                       "one user turn")
    extra = sorted(k for k in set(last) - MESSAGE_FIELDS if last[k] not in (None, "", []))
    if extra:
        raise refusal(f"{where}.{extra[0]}", "is not supported: the prompt is the message's content and images")
    text = optional(last, "content", str, "a string", "", f"{where}.")
    images = images_of(last.get("images"), f"{where}.images")
    if not text.strip():
        if not images:
            raise refusal(where, "is empty (no content or images)")
        return None, images, len(messages) - 1
    return text, images, len(messages) - 1


def nanoseconds(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def now_text() -> str:
    """Ollama's created_at: RFC 3339 in UTC."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Ollama:
    """Ollama's routes over an OmniServer (its engine, model card and name)."""

    def __init__(self, server: OmniServer) -> None:
        self.server = server

    def routes(self) -> list[Route]:
        return [Route("/api/chat", self.chat, methods=["POST"]),
                Route("/api/generate", self.generate, methods=["POST"]),
                Route("/api/tags", self.tags, methods=["GET"]),
                Route("/api/show", self.show, methods=["POST"]),
                Route("/api/ps", self.ps, methods=["GET"]),
                Route("/api/version", self.version, methods=["GET"])]

    # -------------------------------------------------------- the model as Ollama describes it
    def check_model(self, name: Any) -> None:
        """The server's model, by its name or with Ollama's default tag (`muomni:latest`)."""
        if isinstance(name, str) and name.endswith(":latest"):
            name = name[:-len(":latest")]
        self.server.check_model(name)

    @functools.cached_property
    def weights(self) -> tuple[int, float]:
        """Bytes and newest modification time of the weights files the model was loaded from."""
        files = {src for part in self.server.model.info()["components"].values()
                 if os.path.isfile(src := str(part["weights"]))}
        stats = [os.stat(f) for f in files]
        return sum(s.st_size for s in stats), max((s.st_mtime for s in stats), default=self.server.started)

    @functools.cached_property
    def entry(self) -> dict[str, Any]:
        """The model as /api/tags and /api/ps list it: `digest` is the sha256 of the served model's card (its
        details and weights files' sizes and times), not of a weights blob as in Ollama."""
        info = self.server.details
        size, mtime = self.weights
        dtype = str(info["dtype"])
        level = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype, dtype.upper())
        count = info["parameters"]
        scale = next((d, u) for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if count >= d or d == 1)
        details = {"parent_model": "", "format": info["format"], "family": "muomni", "families": ["muomni"],
                   "parameter_size": f"{count / scale[0]:.1f}{scale[1]}", "quantization_level": level}
        card = json.dumps({"name": self.server.model_id, "details": info, "size": size, "mtime": mtime},
                          sort_keys=True, default=str)
        modified = datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")
        return {"name": self.server.model_id, "model": self.server.model_id, "modified_at": modified, "size": size,
                "digest": hashlib.sha256(card.encode()).hexdigest(), "details": details}

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [self.entry]})

    async def ps(self, request: Request) -> Response:
        # no expires_at: the model stays loaded until the server stops
        on_gpu = not str(self.server.details["device"]).startswith("cpu")
        return JSONResponse({"models": [{**{k: v for k, v in self.entry.items() if k != "modified_at"},
                                         "size_vram": self.entry["size"] if on_gpu else 0,
                                         "context_length": self.server.model.context_length}]})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})  # μOmni's own version

    async def show(self, request: Request) -> Response:
        body = body_object(await self.server.json_body(request))
        check_fields(body, {"model", "name", "verbose"})
        self.check_model(body.get("model", body.get("name")))
        if optional(body, "verbose", bool, "a boolean", False):
            raise refusal("verbose", "is not available: the model info below is all there is (no token lists)")
        info = self.server.details
        defaults = info["generation_defaults"]
        parameters = {"num_predict": defaults["max_new_tokens"], "temperature": defaults["temperature"],
                      "top_k": defaults["top_k"], "top_p": defaults["top_p"],
                      "repeat_penalty": defaults["repetition_penalty"]}
        model_info: dict[str, Any] = {"general.architecture": "muomni", "general.parameter_count": info["parameters"],
                                      "muomni.context_length": self.server.model.context_length}
        if "thinker" in info:
            t = info["thinker"]
            model_info.update({"muomni.block_count": t["layers"], "muomni.embedding_length": t["d_model"],
                               "muomni.attention.head_count": t["heads"],
                               "muomni.attention.head_count_kv": t["kv_heads"],
                               "muomni.feed_forward_length": t["d_ff"], "muomni.expert_count": t["experts"],
                               "muomni.rope.freq_base": t["rope_theta"]})
        if "vocabulary" in info:
            model_info["muomni.vocab_size"] = info["vocabulary"]["embedding_rows"]
        components = self.server.model.components
        return JSONResponse({
            "parameters": "\n".join(f"{k} {v:g}" for k, v in parameters.items()),
            "template": "{{ .Prompt }}",  # no chat template: the prompt is [bos] text
            "details": self.entry["details"], "model_info": model_info,
            "capabilities": ["completion"] + (["vision"] if "vision" in components else []),
            "modified_at": self.entry["modified_at"]})

    # -------------------------------------------------------- answers
    async def chat(self, request: Request) -> Response:
        t_arrival = time.perf_counter()
        body = body_object(await self.server.json_body(request))
        check_fields(body, CHAT_FIELDS)
        self.check_model(body.get("model"))
        stream = common_fields(body)
        if optional(body, "tools", list, "an array", []):
            raise refusal("tools", "is not supported: μOmni has no tool calling")
        messages = optional(body, "messages", list, "an array", [])
        rows, stops, num_ctx = request_options(body, self.server.model.context_length)
        with_format(rows, stops, body.get("format"))
        if not messages:
            return self.loaded({"message": {"role": "assistant", "content": ""}})
        text, images, ignored = chat_prompt(messages)
        req = ChatRequest(text, images, audio=None, ignored=ignored, stream=stream, include_usage=False,
                          stops=stops, speech_format=None, options=rows)
        return await self.answer(request, req, t_arrival, num_ctx,
                                 lambda piece: {"message": {"role": "assistant", "content": piece}})

    async def generate(self, request: Request) -> Response:
        t_arrival = time.perf_counter()
        body = body_object(await self.server.json_body(request))
        check_fields(body, GENERATE_FIELDS)
        self.check_model(body.get("model"))
        stream = common_fields(body)
        for name in ("suffix", "template"):
            if optional(body, name, str, "a string", ""):
                raise refusal(name, "is not supported: the one prompt form is [bos] text" if name == "template"
                             else "is not supported: μOmni does not fill in the middle")
        if optional(body, "context", list, "an array", []):
            raise refusal("context", "is not supported: μOmni answers single turns (responses carry no context)")
        raw = optional(body, "raw", bool, "a boolean", False)
        system = optional(body, "system", str, "a string", None) or None
        if raw and system:
            raise refusal("system", "has no place in a raw prompt ('raw': true)")
        prompt = optional(body, "prompt", str, "a string", "")
        images = images_of(body.get("images"), "images")
        rows, stops, num_ctx = request_options(body, self.server.model.context_length)
        with_format(rows, stops, body.get("format"))
        if not prompt and not images:
            return self.loaded({"response": ""})
        req = ChatRequest(prompt or None, images, audio=None, ignored=0, stream=stream, include_usage=False,
                          stops=stops, speech_format=None, options=rows, system=system)
        return await self.answer(request, req, t_arrival, num_ctx, lambda piece: {"response": piece})

    def loaded(self, empty: dict[str, Any]) -> Response:
        """Ollama's answer to a request with nothing to answer: the model is loaded (it always is here)."""
        return JSONResponse({"model": self.server.model_id, "created_at": now_text(), **empty, "done": True,
                             "done_reason": "load"})

    async def answer(self, request: Request, req: ChatRequest, t_arrival: float, num_ctx: int | None,
                     frame: Callable[[str], dict[str, Any]]) -> Response:
        """Run `req` on the engine path of every generating route; `frame(text)` shapes one message."""
        answer, prompt, headers = await self.server.begin(req, t_arrival, fit_context(num_ctx),
                                                          budget_name="options.num_predict")

        def message(piece: str) -> dict[str, Any]:
            return {"model": self.server.model_id, "created_at": now_text(), **frame(piece)}

        def last(finish: str) -> dict[str, Any]:
            return {**message(""), **done(answer, prompt, finish)}

        if not req.stream:
            text, finish, _ = (await answer.collect(request))[0]
            return JSONResponse({**message(text), **done(answer, prompt, finish)}, headers=headers)
        return StreamingResponse(ndjson(answer, message, last), media_type=NDJSON, headers=headers)


def done(answer: Answering, prompt: Any, finish: str) -> dict[str, Any]:
    """The last message's fields: why it ended, token counts and measured durations (module docstring)."""
    return {"done": True, "done_reason": finish,
            "total_duration": nanoseconds(answer.t_end - answer.t_arrival),
            "load_duration": nanoseconds(answer.t_start - answer.t_arrival),
            "prompt_eval_count": prompt.embeds.shape[0],
            "prompt_eval_duration": nanoseconds(answer.t_first - answer.t_start),
            "eval_count": answer.generated, "eval_duration": nanoseconds(answer.t_end - answer.t_first)}


async def ndjson(answer: Answering, message: Callable[[str], dict[str, Any]],
                 last: Callable[[str], dict[str, Any]]) -> AsyncIterator[str]:
    """One JSON object a line, each with a piece of the answer, then the `done` one; an error mid-answer is one
    {"error": ...} line, as Ollama streams it. Leaving early (the client went away) frees the row."""
    try:
        async for batch in answer.pieces():
            out = []
            for item in batch:
                if len(item) == 4:
                    _, _, finish, error = item
                    line = {"error": engine_error(error).message} if error is not None else last(finish)
                    yield "".join(out) + json.dumps(line, ensure_ascii=False) + "\n"
                    return
                out.append(json.dumps({**message(item[1]), "done": False}, ensure_ascii=False) + "\n")
            yield "".join(out)
    finally:
        answer.cancel()
