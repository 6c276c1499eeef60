"""The server's streaming path in process: the engine's events handed to the event loop once per engine round
(Outbox: one wake-up per loop for every request with news), a request's tokens that arrive together streamed as
one chunk (valid OpenAI chunks, the same text, usage and logprobs), and the windowed detokeniser (its pieces join
to the whole decode)."""
from __future__ import annotations

import asyncio
import json
import random
from types import SimpleNamespace
from typing import Any

import torch

from tests.conftest import needs_demo

pytestmark = needs_demo


class FakeLoop:
    """Records call_soon_threadsafe calls (what the engine's thread asks of an event loop)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
        self.calls.append((fn, *args))


def test_one_wake_up_per_loop_and_round() -> None:
    from utils.server.streaming import Inbox, Outbox
    outbox, loop, other = Outbox(), FakeLoop(), FakeLoop()
    boxes = [Inbox(outbox, loop) for _ in range(16)] + [Inbox(outbox, other)]  # type: ignore[arg-type]
    for box in boxes:  # a step: every request gets a token (and one a finish)
        box.put("token", 0, 7)
    boxes[0].put("finish", 0, "length", None)
    outbox.flush()
    assert [len(call[1]) for call in loop.calls] == [16] and [len(call[1]) for call in other.calls] == [1]
    assert [list(box.events) for box in boxes[:2]] == [[("token", 0, 7), ("finish", 0, "length", None)],
                                                       [("token", 0, 7)]]
    outbox.flush()  # a round with no events wakes nobody
    assert len(loop.calls) == 1


class Row:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def stream(model: Any, batches: list[list[tuple[Any, ...]]], **fields: Any) -> list[str]:
    """The SSE writes of one answer whose engine events arrive in `batches` (each handed over by one flush)."""
    from utils.server.metrics import Metrics
    from utils.server.protocol import ChatRequest
    from utils.server.streaming import Answering, Inbox, Outbox

    async def main() -> list[str]:
        outbox = Outbox()
        inbox = Inbox(outbox, asyncio.get_running_loop())
        req = ChatRequest(text="x", images=[], audio=None, ignored=0, stream=True, include_usage=True, stops=[],
                          speech_format=None, options=fields)

        async def speak(text: str) -> str:
            raise AssertionError("no audio was asked for")
        answer = Answering(req, [Row()], inbox, 0.0, model.detokenizer, Metrics(None), "muomni", speak,
                           model.logprob_entry)
        writes = answer.sse("chatcmpl-test", SimpleNamespace(embeds=torch.zeros(5, 1), fitted={}))
        out = [await writes.__anext__()]  # the role chunk
        for batch in batches:
            for event in batch:
                inbox.put(*event)
            outbox.flush()
            out.append(await writes.__anext__())
        out += [w async for w in writes]
        return out
    return asyncio.run(main())


def events(writes: list[str]) -> list[Any]:
    """Every SSE event of the writes, JSON-decoded ([DONE] as the string)."""
    out = []
    for write in writes:
        assert write.endswith("\n\n")
        for event in write[:-2].split("\n\n"):
            assert event.startswith("data: ")
            out.append(event[6:] if event == "data: [DONE]" else json.loads(event[6:]))
    return out


def test_tokens_that_arrive_together_go_out_as_one_chunk(demo_model) -> None:
    tok = demo_model.parts.tokenizer
    ids = tok.encode("hello world how are you")
    writes = stream(demo_model, [[("token", 0, t) for t in ids[:5]],
                                 [("token", 0, t) for t in ids[5:]] + [("finish", 0, "length", None)]])
    first, second = events(writes[1:2]), events(writes[2:3])
    assert len(first) == 1 and first[0]["choices"][0]["delta"] == {"content": tok.decode(ids[:5])}
    assert first[0]["object"] == "chat.completion.chunk" and first[0]["choices"][0]["finish_reason"] is None
    assert [e["choices"][0]["finish_reason"] for e in second] == [None, "length"]
    every = events(writes)
    assert every[-1] == "[DONE]" and every[-2]["usage"]["completion_tokens"] == len(ids)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in every[:-2])
    assert text == tok.decode(ids)


def test_coalesced_logprobs_go_with_their_text(demo_model) -> None:
    """Each chunk carries the logprobs entries of the tokens whose text it holds; held-back text keeps its
    entries for the chunk that sends it (an incomplete UTF-8 character here)."""
    from utils.engine.sampling import TokenLogprobs
    tok = demo_model.parts.tokenizer
    sp = tok.sp
    byte = {int(sp.IdToPiece(i)[3:5], 16): i for i in range(sp.GetPieceSize()) if sp.IsByte(i)}
    ids = tok.encode("hi") + [byte[b] for b in "日".encode()]
    entry = [TokenLogprobs(t, -0.5, [(t, -0.5)]) for t in ids]
    split = len(ids) - 1  # the character's last byte comes in the second batch
    batches = [[e for t, lp in zip(ids[:split], entry) for e in (("logprobs", 0, lp), ("token", 0, t))],
               [("logprobs", 0, entry[-1]), ("token", 0, ids[-1]), ("finish", 0, "length", None)]]
    chunks = [e for e in events(stream(demo_model, batches, logprobs=2)) if e != "[DONE]" and e["choices"]]
    sent = [(c["choices"][0]["delta"].get("content"), [x["token"] for x in (c["choices"][0]["logprobs"] or
                                                                          {"content": []})["content"]])
            for c in chunks if c["choices"][0]["delta"].get("content")]
    tokens = [demo_model.logprob_entry(e)["token"] for e in entry]
    assert sent == [("hi", tokens[:split - 2]), ("日", tokens[split - 2:])]


def test_detokeniser_window_joins_to_the_whole_decode(demo_model) -> None:
    """Random answers of ordinary pieces, lone "▁", control ids, ids past the vocabulary, whole and broken UTF-8
    byte sequences: the pieces always join to decode(ids), however long the answer."""
    from utils.media.tokenizer import IncrementalDecoder
    tok = demo_model.parts.tokenizer
    sp = tok.sp
    byte = {int(sp.IdToPiece(i)[3:5], 16): i for i in range(sp.GetPieceSize()) if sp.IsByte(i)}
    ordinary = [i for i in range(sp.GetPieceSize()) if not sp.IsByte(i) and not sp.IsControl(i)]
    rng = random.Random(0)
    for _ in range(400):
        ids: list[int] = []
        while len(ids) < 60:
            kind = rng.random()
            if kind < 0.45:
                ids.append(rng.choice(ordinary))
            elif kind < 0.55:
                ids.append(sp.PieceToId("\u2581"))
            elif kind < 0.65:
                ids.append(rng.choice([0, 1, 2]))
            elif kind < 0.72:
                ids.append(rng.randrange(sp.GetPieceSize(), 32000))
            elif kind < 0.9:
                ids += [byte[b] for b in rng.choice("é日本😀ï").encode()]
            else:
                ids.append(byte[rng.randrange(256)])
        dec = IncrementalDecoder(tok)
        assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids), ids
