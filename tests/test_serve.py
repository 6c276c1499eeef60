"""serve.py end to end: the real server in a subprocess on a free localhost port, talked to with the official
`openai` client (and httpx for the error cases); answers compared with infer_chat.py run on the same inputs.

Skipped when checkpoints/demo is absent.
"""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import openai
import pytest

from tests import forkserver
from tests.conftest import DEMO, EXAMPLES, REPO, run_cli


pytestmark = pytest.mark.skipif(not (DEMO / "omni_sft_tiny" / "omni.pt").is_file() or
                                not (EXAMPLES / "red_circle.png").is_file(),
                                reason=f"{DEMO} or examples/ not built (run: python tools/train_demo.py)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    """A running serve.py: its process, base URL and the file its stderr goes to (read at any time)."""
    proc: subprocess.Popen
    base: str
    log: Path


def wait_until(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Wait for an observable state; the timeout only bounds a failure, it is never what a test measures."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def server(*extra: str, ckpt: Path = DEMO, env: dict[str, str] | None = None) -> Iterator[Served]:
    """Start serve.py, wait until /health answers, yield it; SIGTERM it afterwards."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="serve-log-") as tmp:
        log = Path(tmp) / "stderr.txt"
        with log.open("w") as err:
            proc = forkserver.popen([sys.executable, str(REPO / "serve.py"), "--ckpt_dir", str(ckpt), "--port",
                                     str(port), "--threads", "1", *extra], cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=err, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"serve.py exited with {proc.returncode}: {log.read_text()}")
                try:
                    return httpx.get(f"{base}/health", timeout=1).status_code == 200
                except httpx.TransportError:
                    return False
            wait_until(up, "serve.py answers /health")
            yield Served(proc, base, log)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def shared() -> Iterator[Served]:
    """The one demo server the tests that need no flags of their own share."""
    with server() as served:
        yield served


@pytest.fixture(scope="module")
def srv(shared: Served) -> str:
    return shared.base


@pytest.fixture(scope="module")
def client(srv: str):
    return openai.OpenAI(base_url=f"{srv}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def one_row(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server with one decode row and one queue place over a tiny model with an 8192-token context, so an
    answer can be made to last far longer than any check needs (8000 tokens) and still be cut at once."""
    from tests.factory import make_tree
    tree = make_tree(tmp_path_factory.mktemp("long") / "checkpoints", ctx_len=LONG_CTX)
    with server("--max_batch", "1", "--max_queue", "1", ckpt=tree) as served:
        yield served


LONG_CTX, LONG_ANSWER = 8192, 8000


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def audio_part(path: Path) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(),
                                                   "format": "wav"}}


# (messages content, the same input for infer_chat.py's pipe mode)
CASES = {
    "text": ("What is 3 plus 4?", ["What is 3 plus 4?"]),
    "text2": ("What is 12 plus 30?", ["What is 12 plus 30?"]),
    "image_default_prompt": ([{"type": "image_url", "image_url": {"url": data_url(EXAMPLES / "red_circle.png")}}],
                             [f"/image {EXAMPLES / 'red_circle.png'}", ""]),
    "image_and_text": ([{"type": "text", "text": "What do you see?"},
                        {"type": "image_url", "image_url": {"url": data_url(EXAMPLES / "blue_square.png")}}],
                       [f"/image {EXAMPLES / 'blue_square.png'}", "What do you see?"]),
    "audio": ([audio_part(EXAMPLES / "green_triangle.wav")], [f"/audio {EXAMPLES / 'green_triangle.wav'}", ""]),
} if (EXAMPLES / "red_circle.png").is_file() else {}


@pytest.fixture(scope="module")
def cli_json() -> dict[str, dict]:
    """infer_chat.py's --json answer objects to every case, from one pipe-mode run (exact text per line)."""
    lines = [line for _, (_, cli) in CASES.items() for line in cli]
    out = run_cli("--ckpt_dir", str(DEMO), "--json", stdin="\n".join(lines) + "\n", timeout=300)
    assert out.returncode == 0, out.stderr
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(answers) == len(CASES)
    return dict(zip(CASES, answers))


@pytest.fixture(scope="module")
def cli_answers(cli_json: dict[str, dict]) -> dict[str, str]:
    return {case: obj["text"] for case, obj in cli_json.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_chat_equals_cli(client, cli_answers, cli_json, case: str) -> None:
    content = CASES[case][0]
    messages = [{"role": "user", "content": content}]
    resp = client.chat.completions.create(model="muomni", messages=messages)
    assert resp.choices[0].message.content == cli_answers[case]
    assert resp.usage.prompt_tokens == cli_json[case]["prompt_tokens"]
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens >= 1 and resp.usage.prompt_tokens >= 2
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="muomni", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == cli_answers[case]
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == resp.choices[0].finish_reason


def test_earlier_turns_and_system_are_not_prompted(client, cli_answers) -> None:
    raw = client.chat.completions.with_raw_response.create(model="muomni", messages=[
        {"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "What is 3 plus 4?"}])
    assert raw.headers["x-omni-ignored-messages"] == "3"
    assert raw.parse().choices[0].message.content == cli_answers["text"]


def test_long_audio_is_trimmed_with_a_warning(client) -> None:
    import numpy as np
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.sin(np.arange(16000 * 12) * 0.05)).astype(np.float32), 16000, format="WAV")
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}
    raw = client.chat.completions.with_raw_response.create(model="muomni", max_tokens=4,
                                                           messages=[{"role": "user", "content": [part]}])
    assert re.match(r"audio trimmed to its first [0-9.]+ s", raw.headers["x-omni-warnings"])
    assert raw.parse().usage.prompt_tokens > 128  # the trimmed audio's frames are in the prompt


def test_max_tokens_seed_and_stop(client) -> None:
    msgs = [{"role": "user", "content": "What is 3 plus 4?"}]
    for budget in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        resp = client.chat.completions.create(model="muomni", messages=msgs, extra_body={"ignore_eos": True},
                                              **budget)
        assert resp.usage.completion_tokens == 3 and resp.choices[0].finish_reason == "length", budget
    sampled = [client.chat.completions.create(model="muomni", messages=msgs, temperature=1.0, seed=11,
                                              max_completion_tokens=12).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    full = client.chat.completions.create(model="muomni", messages=msgs, max_tokens=20,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    # a stop string in the middle: the text ends before it, whenever the row is freed
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop
    cut = client.chat.completions.create(model="muomni", messages=msgs, max_tokens=20, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # a stop string that only the budget's last token completes: the engine finishes the row for its length on
    # the step that emits that token, before the stop is seen, and the answer was still cut at a stop string
    def text(max_tokens: int) -> str:
        return client.chat.completions.create(model="muomni", messages=msgs, max_tokens=max_tokens,
                                              extra_body={"ignore_eos": True}).choices[0].message.content
    last = 20  # the fewest tokens that give the whole text (a last token may add no text of its own)
    while text(last - 1) == full:
        last -= 1
    k = next(k for k in range(1, len(full) + 1) if full.find(full[-k:]) == len(full) - k)
    for stream in (False, True):
        body = {"model": "muomni", "messages": msgs, "max_tokens": last, "stop": [full[-k:]], "ignore_eos": True,
                "stream": stream}
        if stream:
            with httpx.stream("POST", f"{client.base_url}chat/completions", json=body, timeout=120) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
            finish = events[-1]["choices"][0]["finish_reason"]
        else:
            choice = httpx.post(f"{client.base_url}chat/completions", json=body, timeout=120).json()["choices"][0]
            text, finish = choice["message"]["content"], choice["finish_reason"]
        assert (text, finish) == (full[:-k], "stop"), stream


QUESTION = [{"role": "user", "content": "What is 3 plus 4?"}]
LONG = {"max_completion_tokens": 12, "extra_body": {"ignore_eos": True}}  # the demo varies when sampled this long


def api_answer(model, **gen):
    return model.answer("What is 3 plus 4?", **{"max_new_tokens": 12, "ignore_eos": True, **gen})


def test_seeded_sample_equals_the_apis(client, demo_model) -> None:
    resp = client.chat.completions.create(model="muomni", messages=QUESTION, temperature=1.0, seed=7, **LONG)
    api = api_answer(demo_model, temperature=1.0, seed=7)
    assert resp.choices[0].message.content == api.text
    assert api.text != api_answer(demo_model).text  # a server that dropped the temperature would fail
    assert resp.usage.completion_tokens == len(api.token_ids)


def test_penalties_bias_and_min_p_equal_the_apis(client, demo_model) -> None:
    plain = api_answer(demo_model).token_ids
    for fields in ({"presence_penalty": 2.0}, {"frequency_penalty": -2.0}, {"logit_bias": {466: -100}},
                   {"temperature": 1.0, "seed": 7, "min_p": 0.2}):
        typed = {k: v for k, v in fields.items() if k != "min_p"}  # min_p: an extension, as vLLM takes it
        resp = client.chat.completions.create(model="muomni", messages=QUESTION, max_completion_tokens=12, **typed,
                                              extra_body={"ignore_eos": True, **{k: fields[k] for k in fields
                                                                                 if k not in typed}})
        api = api_answer(demo_model, **fields)
        assert resp.choices[0].message.content == api.text, fields
        assert "seed" in fields or api.token_ids != plain, fields  # each of these changes the greedy answer


def test_logprobs_equal_the_apis(client, demo_model) -> None:
    api = api_answer(demo_model, logprobs=2, max_new_tokens=5)
    resp = client.chat.completions.create(model="muomni", messages=QUESTION, logprobs=True, top_logprobs=2,
                                          max_completion_tokens=5, extra_body={"ignore_eos": True})
    got = [e.model_dump() for e in resp.choices[0].logprobs.content]
    assert got == api.logprobs
    chunks = list(client.chat.completions.create(model="muomni", messages=QUESTION, logprobs=True, top_logprobs=2,
                                                 max_completion_tokens=5, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = [e.model_dump() for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == api.logprobs
    assert client.chat.completions.create(model="muomni", messages=QUESTION).choices[0].logprobs is None


def test_n_choices_are_the_apis_seed_plus_i(client, demo_model) -> None:
    gen = {"temperature": 2.0, "seed": 3}
    api = demo_model.answer_choices("What is 3 plus 4?", n=3, max_new_tokens=12, ignore_eos=True, **gen)
    resp = client.chat.completions.create(model="muomni", messages=QUESTION, n=3, **gen, **LONG)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.message.content for c in resp.choices] == [a.text for a in api]
    assert [c.finish_reason for c in resp.choices] == ["length"] * 3
    assert resp.usage.completion_tokens == 36 and resp.usage.prompt_tokens == api[0].prompt_tokens
    chunks = list(client.chat.completions.create(model="muomni", messages=QUESTION, n=3, stream=True,
                                                 stream_options={"include_usage": True}, **gen, **LONG))
    texts = ["", "", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [a.text for a in api] and chunks[-1].usage.completion_tokens == 36
    # each choice has its own stop scanner: cut where its own text has the stop string
    stop = "circle"
    assert any(stop in a.text for a in api) and not all(stop in a.text for a in api)
    cut = client.chat.completions.create(model="muomni", messages=QUESTION, n=3, stop=[stop], **gen, **LONG)
    assert [(c.message.content, c.finish_reason) for c in cut.choices] == \
        [(a.text.split(stop)[0], "stop" if stop in a.text else "length") for a in api]


def test_transcription_equals_cli(client, srv: str) -> None:
    wav = EXAMPLES / "green_triangle.wav"
    out = run_cli("--ckpt_dir", str(DEMO), "--audio_in", str(wav), "--transcribe")
    assert out.returncode == 0, out.stderr
    expected = out.stdout.rstrip("\n")
    with wav.open("rb") as f:
        assert client.audio.transcriptions.create(model="muomni", file=f).text == expected
    for fmt, check in (("text", lambda r: r.text == expected + "\n"),
                       ("verbose_json", lambda r: r.json()["text"] == expected and r.json()["duration"] > 0)):
        r = httpx.post(f"{srv}/v1/audio/transcriptions", files={"file": ("a.wav", wav.read_bytes())},
                       data={"response_format": fmt}, timeout=60)
        assert r.status_code == 200 and check(r), r.text
    # subtitles and word timestamps: the same function as `--transcribe --output_format srt|vtt|json`
    for fmt in ("srt", "vtt"):
        cli = run_cli("--ckpt_dir", str(DEMO), "--audio_in", str(wav), "--transcribe", "--output_format", fmt)
        assert cli.returncode == 0, cli.stderr
        r = httpx.post(f"{srv}/v1/audio/transcriptions", files={"file": ("a.wav", wav.read_bytes())},
                       data={"response_format": fmt}, timeout=60)
        assert r.status_code == 200 and r.text == cli.stdout, (r.text, cli.stdout)
    cli = run_cli("--ckpt_dir", str(DEMO), "--audio_in", str(wav), "--transcribe", "--json")
    r = httpx.post(f"{srv}/v1/audio/transcriptions", files={"file": ("a.wav", wav.read_bytes())},
                   data={"response_format": "verbose_json"}, timeout=60)
    assert r.json()["segments"] == json.loads(cli.stdout)["segments"]
    assert [w["word"] for w in r.json()["words"]] == expected.split()


def test_speech_and_spoken_answer_are_wav(client) -> None:
    import soundfile as sf
    audio = client.audio.speech.create(model="muomni", voice="alloy", input="Hello there", response_format="wav")
    wave, sr = sf.read(io.BytesIO(audio.content))
    assert sr == 16000 and wave.ndim == 1 and len(wave) > 1600
    resp = client.chat.completions.create(model="muomni", messages=[{"role": "user", "content": "What is 3 plus 4?"}],
                                          modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    spoken = resp.choices[0].message.audio
    assert spoken.transcript == resp.choices[0].message.content
    wave, sr = sf.read(io.BytesIO(base64.b64decode(spoken.data)))
    assert sr == 16000 and len(wave) > 0


def test_streamed_spoken_answer(srv: str) -> None:
    body = {"model": "muomni", "stream": True, "modalities": ["text", "audio"], "audio": {"format": "wav"},
            "messages": [{"role": "user", "content": "What is 3 plus 4?"}]}
    with httpx.stream("POST", f"{srv}/v1/chat/completions", json=body, timeout=120) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    text = "".join(d.get("content") or "" for d in deltas)
    audio = [d["audio"] for d in deltas if "audio" in d]
    assert len(audio) == 1 and audio[0]["transcript"] == text and text
    import soundfile as sf
    wave, sr = sf.read(io.BytesIO(base64.b64decode(audio[0]["data"])))
    assert sr == 16000 and len(wave) > 0


def test_models_health_metrics(client, srv: str) -> None:
    client.chat.completions.create(model="muomni", messages=[{"role": "user", "content": "What is 3 plus 4?"}],
                                   max_tokens=2)  # this test's own request, counted below
    assert [m.id for m in client.models.list().data] == ["muomni"]
    details = httpx.get(f"{srv}/v1/models").json()["data"][0]["details"]
    assert details["parameters"] > 0 and details["decode_kernel"] == httpx.get(f"{srv}/health").json()["decode_kernel"]
    assert str(REPO) not in json.dumps(details)  # --info's card without the server's paths
    health = httpx.get(f"{srv}/health").json()
    assert health["status"] == "ok" and health["decode_kernel"].startswith(("c (", "torch ("))
    assert not health["decode_kernel"].startswith("c (") or ", 1 thread, " in health["decode_kernel"]  # --threads 1
    text = httpx.get(f"{srv}/metrics").text
    for name in ("omni_requests_total", "omni_prompt_tokens_total", "omni_completion_tokens_total",
                 "omni_queue_length", "omni_running_rows", "omni_time_to_first_token_seconds_bucket",
                 "omni_inter_token_latency_seconds_bucket"):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    assert re.search(r'^omni_requests_total\{endpoint="/v1/chat/completions",status="200"\} [1-9]', text, re.M)


@pytest.mark.parametrize("body,status,words", [
    ({"model": "muomni", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400, "does not fetch URLs"),
    ({"model": "muomni", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}, 400, "cannot decode"),
    ({"model": "muomni", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "must come from the user"),
    ({"model": "muomni", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "'n'"),
    ({"model": "muomni", "messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "--max_batch"),
    ({"model": "muomni", "messages": [{"role": "user", "content": "hi " * 2000}]}, 400, "leaves no room"),  # a budget
    # over the context is cut, not refused: test_serve_hardening
    ({"model": "muomni", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "number"),
    ({"model": "muomni"}, 422, "messages"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "not found"),
])
def test_chat_errors(srv: str, body: dict, status: int, words: str) -> None:
    r = httpx.post(f"{srv}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] and "code" in err


def huge_png_header(width: int = 9000, height: int = 9000) -> bytes:
    """A PNG whose header claims width x height pixels (81 megapixels) and holds no pixel data."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_image_pixel_limit(srv: str) -> None:
    url = "data:image/png;base64," + base64.b64encode(huge_png_header()).decode()
    r = httpx.post(f"{srv}/v1/chat/completions", timeout=60, json={"model": "muomni", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert r.status_code == 400 and "exceeds the limit of 64000000 pixels" in r.json()["error"]["message"], r.text


def test_bad_json_and_unknown_route(srv: str) -> None:
    r = httpx.post(f"{srv}/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{srv}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_startup_says_the_decode_kernel(shared: Served) -> None:
    """serve.py builds and loads the decode step before it accepts work, and says which on stderr."""
    lines = shared.log.read_text().splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("decode kernel = ")]
    first_request = next(i for i, line in enumerate(lines) if " /health " in line)
    assert said and said[0] < first_request, lines
    assert lines[said[0]] == f"decode kernel = {httpx.get(f'{shared.base}/health').json()['decode_kernel']}"


def test_auth_and_body_limit_on_the_torch_step(tmp_path: Path) -> None:
    # no C compiler: the server runs the torch decode step, and says why at startup
    env = {"CC": str(tmp_path / "no-such-cc"), "MUOMNI_CACHE_DIR": str(tmp_path / "cache")}
    with server("--api_key", "s3cret", "--max_body_mb", "0.01", env=env) as served:
        base = served.base
        assert "decode kernel = torch (no C compiler" in served.log.read_text()
        bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = httpx.get(f"{base}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="muomni", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(f"{base}/health").status_code == 200  # open, as load balancers expect
        # Ollama's routes need the key too, refused in Ollama's error shape; its client sends the key as a header
        r = httpx.get(f"{base}/api/tags")
        assert r.status_code == 401 and r.json() == {"error": "missing or wrong API key (send 'Authorization: "
                                                              "Bearer KEY')"}
        import ollama
        keyed = ollama.Client(host=base, headers={"Authorization": "Bearer s3cret"})
        assert [m.model for m in keyed.list().models] == ["muomni"]
        big = {"model": "muomni", "messages": [{"role": "user", "content": "x" * 20000}]}
        headers = {"Authorization": "Bearer s3cret"}
        r = httpx.post(f"{base}/v1/chat/completions", json=big, headers=headers)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = httpx.post(f"{base}/api/chat", json=big, headers=headers)
        assert r.status_code == 413 and r.json()["error"].startswith("the request body ("), r.text

        def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
            yield json.dumps(big).encode()
        r = httpx.post(f"{base}/v1/chat/completions", content=chunked(), headers=headers)
        assert r.status_code == 413


def metric(base: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", httpx.get(f"{base}/metrics").text, re.M)
    assert m, name
    return float(m.group(1))


def long_body(max_tokens: int = LONG_ANSWER, stream: bool = True) -> dict:
    return {"model": "muomni", "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}


@contextlib.contextmanager
def raw_chat(base: str, body: dict) -> Iterator[socket.socket]:
    """A chat request sent on a bare socket whose answer is never read; leaving the block disconnects it."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        yield sock


def test_queue_full_is_429(one_row: Served) -> None:
    base = one_row.base
    wait_until(lambda: metric(base, "omni_running_rows") == 0, "no row running")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with raw_chat(base, long_body(stream=False)):
            wait_until(lambda: metric(base, "omni_running_rows") == 1, "the long answer takes the one row")
            waiting = pool.submit(httpx.post, f"{base}/v1/chat/completions", json=long_body(5, stream=False),
                                  timeout=120)
            wait_until(lambda: metric(base, "omni_queue_length") == 1, "the second request waits for the row")
            busy = httpx.post(f"{base}/v1/chat/completions", json=long_body(5, stream=False), timeout=120)
            assert busy.status_code == 429, busy.text
            assert busy.headers["retry-after"].isdigit() and busy.json()["error"]["code"] == "queue_full"
        done = waiting.result()  # the long answer's client left: its row went to the waiting request
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 5
    assert done.json()["choices"][0]["finish_reason"] == "length"


def test_disconnect_frees_the_row(one_row: Served) -> None:
    base = one_row.base
    wait_until(lambda: metric(base, "omni_running_rows") == 0, "no row running")
    cancelled, tokens = metric(base, "omni_rows_cancelled_total"), metric(base, "omni_completion_tokens_total")
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=long_body(), timeout=60) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert metric(base, "omni_running_rows") == 1
    wait_until(lambda: metric(base, "omni_rows_cancelled_total") == cancelled + 1, "the streamed row is freed")
    assert metric(base, "omni_running_rows") == 0
    assert metric(base, "omni_completion_tokens_total") - tokens < LONG_ANSWER
    # a non-streaming client that goes away while its answer is generated frees its row too
    with raw_chat(base, long_body(stream=False)):
        wait_until(lambda: metric(base, "omni_running_rows") == 1, "the non-streaming row runs")
    wait_until(lambda: metric(base, "omni_rows_cancelled_total") == cancelled + 2, "the non-streaming row is freed")
    assert metric(base, "omni_running_rows") == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_gracefully(signum: int) -> None:
    with server("--shutdown_timeout", "2") as served:
        proc, base = served.proc, served.base
        body = {"model": "muomni", "messages": [{"role": "user", "content": "What is 3 plus 4?"}],
                "max_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signum)
            rest = list(lines)  # the answer finishes or is cut within the bound; the stream ends either way
        assert proc.wait(timeout=60) == 0
        assert rest
        assert "Traceback" not in served.log.read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health", timeout=2)
