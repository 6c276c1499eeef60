"""The legacy OpenAI text completions route, POST /v1/completions (evaluation harnesses and older tools use it).

The prompt is raw text: μOmni has no chat template, so a completion's prompt is exactly what a chat message with
the same text gives, `[bos] text` (an empty prompt is `[bos]` alone). `prompt` may be a list of strings: each is
a choice of its own (`index` in list order), all decoded together by the one engine (OmniServer.begin, the chat
route's path). `echo` puts the prompt before each choice's text; `stop`, `max_tokens`, `temperature`, `top_p`,
`seed` and the vLLM extensions (`top_k`, `repetition_penalty`, `ignore_eos`) are checked as on chat
completions; `stream` sends text_completion chunks and `data: [DONE]` (`stream_options.include_usage` a last
usage chunk). `presence_penalty`, `frequency_penalty`, `logit_bias` as on chat; `logprobs` N (0 to 5, the legacy
API's bound) gives each choice's `logprobs` in the legacy shape: `tokens`, `token_logprobs` (the model's raw
distribution, as on chat), `top_logprobs` (the N likeliest tokens -> logprob) and `text_offset` (each token's
character offset in the choice's text, the echoed prompt included). Refused by name: `suffix` (no
fill-in-the-middle), `n` and `best_of` other than 1 (send several prompts), token-id prompts, and any field this
route does not know.
"""
from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from utils.base.options import BY_NAME
from utils.server.protocol import (OPTION_FIELDS, ApiError, ChatRequest, body_object, budget_field, engine_error,
                                   generation_fields, optional, refusal, stop_strings, stream_fields)
from utils.server.routes import OmniServer
from utils.server.streaming import Answering, freed_on_disconnect

MAX_LEGACY_LOGPROBS = 5  # the legacy API's bound on `logprobs`
KNOWN = {"model", "prompt", "stream", "stream_options", "echo", "stop", "n", "user", "suffix", "logprobs",
         "best_of", "logit_bias", "presence_penalty", "frequency_penalty", *OPTION_FIELDS, *BY_NAME}


def parse_completion(body: Any) -> tuple[list[str], bool, ChatRequest]:
    """A completions body -> (the prompts, echo, the request every prompt's row is made from)."""
    body = body_object(body)
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise refusal(unknown[0], "is not supported by /v1/completions")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise ApiError(422, "'prompt' must be a string or a non-empty array of strings", "invalid_type", "prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise refusal("prompt", "must be text: token-id prompts are not supported")
    if body.get("suffix") is not None:
        raise refusal("suffix", "is not supported: μOmni does not fill in the middle")
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and (type(value) is not int or value != 1):
            raise refusal(name, f"{value!r}: only 1 is served (send several prompts for several answers)")
    top = optional(body, "logprobs", int, "an integer", None)
    if top is not None and not 0 <= top <= MAX_LEGACY_LOGPROBS:
        raise refusal("logprobs", f"{top!r} must be an integer in [0, {MAX_LEGACY_LOGPROBS}]")
    stream, include_usage = stream_fields(body)
    optional(body, "user", str, "a string", None)
    echo = optional(body, "echo", bool, "a boolean", False)
    options = generation_fields({k: v for k, v in body.items() if k != "logprobs"})  # chat's is a boolean
    if top is not None:
        options["logprobs"] = top
    template = ChatRequest(None, [], audio=None, ignored=0, stream=stream, include_usage=include_usage,
                           stops=stop_strings(body.get("stop")), speech_format=None, options=options)
    return prompts, echo, template


def legacy_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """Chat-shaped logprobs entries (OmniModel.logprob_entry) in the legacy completions shape; `offset`: where
    the first token's text starts in the choice's text."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


class Completions:
    """The /v1/completions handler over an OmniServer."""

    def __init__(self, server: OmniServer) -> None:
        self.server = server

    async def create(self, request: Request) -> Response:
        t_arrival = time.perf_counter()
        body = await self.server.json_body(request)
        prompts, echo, template = parse_completion(body)
        self.server.check_model(body.get("model"))
        begun: list[tuple[Answering, Any, dict[str, str]]] = []
        try:
            for text in prompts:
                begun.append(await self.server.begin(replace(template, text=text), t_arrival,
                                                     budget_name=budget_field(body)))
        except BaseException:
            for answer, _, _ in begun:
                answer.cancel()
            raise
        answers = [answer for answer, _, _ in begun]
        warnings = [f"prompt {i}: {h['X-Omni-Warnings']}" for i, (_, _, h) in enumerate(begun)
                    if "X-Omni-Warnings" in h]
        headers = {"X-Omni-Warnings": "; ".join(warnings)} if warnings else {}
        counts = functools.partial(usage, [p for _, p, _ in begun], answers)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.server.model_id}
        echoed = prompts if echo else [""] * len(prompts)
        if template.stream:
            return StreamingResponse(sse(head, answers, echoed, counts if template.include_usage else None,
                                         template.options.get("logprobs") is not None),
                                     media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        try:
            async with freed_on_disconnect(request, answers):
                results = [r[0] for r in await asyncio.gather(*(a.results() for a in answers))]
        finally:
            for answer in answers:
                answer.cancel()  # a no-op once finished; frees the others when one failed
        wanted = template.options.get("logprobs") is not None
        choices = [{"text": echoed[i] + text, "index": i, "finish_reason": finish,
                    "logprobs": legacy_logprobs(entries, len(echoed[i])) if wanted else None}
                   for i, (text, finish, entries) in enumerate(results)]
        return JSONResponse({**head, "choices": choices, "usage": counts()}, headers=headers)


def usage(prompts: list[Any], answers: list[Answering]) -> dict[str, int]:
    """The request's token counts over all its choices (read once the answers are done)."""
    prompt = sum(p.embeds.shape[0] for p in prompts)
    completion = sum(a.generated for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def sse(head: dict[str, Any], answers: list[Answering], echoed: list[str],
              counts: Callable[[], dict[str, int]] | None, wanted: bool = False) -> AsyncIterator[str]:
    """text_completion chunks as each choice's pieces come (the echoed prompt first), each choice's last chunk
    with its finish_reason, then the usage chunk when asked and `data: [DONE]`; an error is one error event.
    With `wanted`, each chunk carries its tokens' legacy logprobs. Leaving early (the client went away) frees
    every row."""
    offsets = [len(text) for text in echoed]  # where each choice's next token starts in its text

    def chunk(index: int, text: str, finish: str | None = None, entries: list[dict[str, Any]] | None = None) -> str:
        logprobs = None
        if wanted and entries is not None:
            logprobs = legacy_logprobs(entries, offsets[index])
            offsets[index] += sum(len(e["token"]) for e in entries)
        obj = {**head, "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, answer: Answering) -> None:
        async for batch in answer.pieces():
            await merged.put((index, batch))

    tasks = [asyncio.create_task(pump(i, a)) for i, a in enumerate(answers)]
    try:
        first = "".join(chunk(i, text) for i, text in enumerate(echoed) if text)
        if first:
            yield first
        left = len(answers)
        while left:
            index, batch = await merged.get()
            out = []
            for item in batch:
                if len(item) == 3:
                    out.append(chunk(index, item[1], entries=item[2]))
                    continue
                _, _, finish, error = item
                if error is not None:
                    yield "".join(out) + f"data: {json.dumps(engine_error(error).body())}\n\n"
                    return
                out.append(chunk(index, "", finish))
                left -= 1
            yield "".join(out)
        if counts is not None:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': counts()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        for answer in answers:
            answer.cancel()
