"""serve.py at its edges: keys no client can send are usage errors and keys are compared as UTF-8 bytes; every typed
field of a request is checked for its JSON type; a request that exactly fills the context is served; JSON
nesting is bounded before parsing (SIGHUP as SIGTERM: test_serve.py).

Real serve.py processes on the demo checkpoints, talked to with httpx and the openai client. The tests that need
no flags of their own share one server with a non-ASCII API key.
"""
from __future__ import annotations

import json
import socket
import sys
from typing import Iterator

import httpx
import pytest

from tests import forkserver
from tests.conftest import REPO
from tests.test_serve import DEMO, Served, server

pytestmark = pytest.mark.skipif(not (DEMO / "omni_sft_tiny" / "omni.pt").is_file(),
                                reason=f"{DEMO} not built (run: python tools/train_demo.py)")

KEY = "clé-секрет-ключ"  # sent as its UTF-8 bytes, as curl does in a UTF-8 shell
AUTH = {"Authorization": b"Bearer " + KEY.encode("utf-8")}


@pytest.fixture(scope="module")
def keyed() -> Iterator[Served]:
    with server("--api_key", KEY) as served:
        yield served


def post(served: Served, path: str, body: object, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{served.base}{path}", content=content, timeout=120,
                      headers={**AUTH, "Content-Type": "application/json"}, **kw)


def chat(content: str = "hello", **fields) -> dict:
    return {"model": "muomni", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


# ------------------------------------------------------------------ the API key

@pytest.mark.parametrize("key", ["", "sk-abc\r", "sk-abc\n", " sk-abc", "sk-abc ", "sk\x7fabc", "sk\x1babc",
                                 "sk-abc\u00a0", "sk\x85abc"],
                         ids=["empty", "CR", "LF", "leading-space", "trailing-space", "DEL", "ESC", "NBSP", "NEL"])
def test_a_key_no_client_can_send_is_a_usage_error(key: str) -> None:
    r = forkserver.run([sys.executable, str(REPO / "serve.py"), "--ckpt_dir", str(DEMO), "--port", "0",
                        "--api_key", key], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[-1].startswith("serve.py: error: --api_key: "), r.stderr
    assert "Traceback" not in r.stderr and "loaded" not in r.stderr


def status_with(served: Served, authorization: bytes) -> int:
    """The status of GET /v1/models sent with exactly these Authorization bytes (h11 refuses to send some)."""
    port = int(served.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " +
                     authorization + b"\r\n\r\n")
        head = sock.makefile("rb").readline()
    return int(head.split()[1])


def test_a_non_ascii_key_is_compared_as_utf8_bytes(keyed: Served) -> None:
    url = f"{keyed.base}/v1/models"
    assert httpx.get(url, headers=AUTH, timeout=60).status_code == 200
    assert status_with(keyed, b"Bearer " + KEY.encode("utf-8")) == 200
    for header in (b"Bearer ", b"Bearer", b"Bearer  ", b"Bearer " + KEY.encode("latin-1", "replace"),
                   b"Bearer " + KEY.encode("utf-8")[:-1], b"Basic " + KEY.encode("utf-8")):
        assert status_with(keyed, header) == 401, header
    r = httpx.get(url, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# ------------------------------------------------------------------ typed fields

CHAT_TYPE_ERRORS = [
    ({"stream": True, "stream_options": {"include_usage": "false"}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"include_usage": 0}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"include_usage": True, "chunk_size": 3}}, "stream_options.chunk_size"),
    ({"stream": True, "stream_options": False}, "stream_options"),
    ({"stream": True, "stream_options": []}, "stream_options"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": "true"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"n": "1"}, "n"),
    ({"n": True}, "n"),
    ({"n": 1.0}, "n"),
    ({"stop": 5}, "stop"),
    ({"stop": [["x"]]}, "stop"),
    ({"modalities": "text"}, "modalities"),
    ({"modalities": False}, "modalities"),
    ({"modalities": []}, "modalities"),
    ({"modalities": [["text"]]}, "modalities"),
    ({"modalities": ["text", "audio"], "audio": "wav"}, "audio"),
    ({"modalities": ["text", "audio"], "audio": {"format": ["wav"]}}, "audio.format"),
    ({"modalities": ["text", "audio"], "audio": {"format": "wav", "voice": 3}}, "audio.voice"),
    ({"audio": {"format": "wav"}}, "audio"),
    ({"user": 42}, "user"),
    ({"user": {"id": "u"}}, "user"),
    ({"model": 7}, "model"),
    ({"model": ["muomni"]}, "model"),
]


@pytest.mark.parametrize("fields,param", CHAT_TYPE_ERRORS, ids=[json.dumps(f) for f, _ in CHAT_TYPE_ERRORS])
def test_chat_fields_are_checked_for_type(keyed: Served, fields: dict, param: str) -> None:
    r = post(keyed, "/v1/chat/completions", {**chat(), **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


SPEECH_TYPE_ERRORS = [({"response_format": ["wav"]}, "response_format"), ({"voice": 1}, "voice"),
                      ({"speed": "1"}, "speed"), ({"speed": [2]}, "speed"), ({"speed": True}, "speed"),
                      ({"model": 1}, "model"), ({"input": 5}, "input")]


@pytest.mark.parametrize("fields,param", SPEECH_TYPE_ERRORS, ids=[json.dumps(f) for f, _ in SPEECH_TYPE_ERRORS])
def test_speech_fields_are_checked_for_type(keyed: Served, fields: dict, param: str) -> None:
    r = post(keyed, "/v1/audio/speech", {"model": "muomni", "input": "hi", **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_well_typed_fields_are_honoured(keyed: Served) -> None:
    def events(include_usage: object) -> list[dict]:
        body = chat(stream=True, stream_options={"include_usage": include_usage}, n=1, user="u-1", stop=None, ignore_eos=True,
                    modalities=["text"])
        with httpx.stream("POST", f"{keyed.base}/v1/chat/completions", content=json.dumps(body).encode(),
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=120) as r:
            assert r.status_code == 200, r.read()
            return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert not any("usage" in e for e in events(False))
    assert events(True)[-1]["usage"]["completion_tokens"] == 2


# ------------------------------------------------------------------ the context

def test_a_request_that_exactly_fills_the_context_is_served(keyed: Served) -> None:
    ctx = httpx.get(f"{keyed.base}/v1/models", headers=AUTH, timeout=60).json()["data"][0]["context_length"]
    text = "What is 3 plus 4? " * 3
    first = post(keyed, "/v1/chat/completions", chat(text, max_tokens=1))
    assert first.status_code == 200, first.text
    prompt = first.json()["usage"]["prompt_tokens"]
    fill = post(keyed, "/v1/chat/completions", chat(text, max_tokens=ctx - prompt, ignore_eos=True))
    assert fill.status_code == 200, fill.text
    assert fill.json()["usage"] == {"prompt_tokens": prompt, "completion_tokens": ctx - prompt, "total_tokens": ctx}
    assert "X-Omni-Warnings" not in fill.headers
    # a budget is an upper bound (as llama-server's n_predict): cut to what the context leaves, and said so in
    # the client's own field name, in a header and in usage; the prompt is never cut
    for name in ("max_tokens", "max_completion_tokens"):
        body = chat(text, ignore_eos=True)
        del body["max_tokens"]
        body[name] = ctx - prompt + 100
        over = post(keyed, "/v1/chat/completions", body)
        assert over.status_code == 200, over.text
        assert over.json()["usage"] == {"prompt_tokens": prompt, "completion_tokens": ctx - prompt, "total_tokens": ctx,
                                        "budget_cut": {"requested": ctx - prompt + 100, "allowed": ctx - prompt,
                                                       "context": ctx}}
        assert over.json()["choices"][0]["finish_reason"] == "length"
        assert f"{name} {ctx - prompt + 100} cut to {ctx - prompt}" in over.headers["X-Omni-Warnings"], over.headers
    # a prompt that leaves no room for one token is refused, never trimmed
    full = post(keyed, "/v1/chat/completions", chat(text * 100))
    assert full.status_code == 400 and "leaves no room for an answer" in full.json()["error"]["message"], full.text


# ------------------------------------------------------------------ JSON nesting

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/audio/speech"])
@pytest.mark.parametrize("deep", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                                  b'{"model": "muomni", "messages": ' + b"[" * 100_000],
                         ids=["arrays", "objects", "unclosed"])
def test_deep_json_is_a_400_before_parsing(keyed: Served, path: str, deep: bytes) -> None:
    r = post(keyed, path, deep)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json" and "nested deeper than" in r.json()["error"]["message"]


def test_brackets_inside_strings_do_not_count(keyed: Served) -> None:
    brackets = '[{"\\"' * 500 + "]}"  # brackets and escaped quotes inside one string
    r = post(keyed, "/v1/chat/completions", chat(user=brackets))
    assert r.status_code == 200, r.text

