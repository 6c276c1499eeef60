"""serve.py's Ollama API (/api/...) through the official `ollama` client, and the legacy /v1/completions through
the `openai` client, against one real server; each answer compared with the API's (omni.py) for the same options.

Skipped when checkpoints/demo is absent.
"""
from __future__ import annotations

import base64
import json
from typing import Iterator

import httpx
import ollama
import openai
import pytest

from tests.conftest import EXAMPLES
from tests.test_serve import Served, server
from tests.test_serve import pytestmark as needs_demo
from utils.base.version import __version__

pytestmark = needs_demo  # the same skip as tests/test_serve.py: no demo model, no server

QUESTION = "What is 3 plus 4?"
SAMPLED = {"temperature": 1.0, "seed": 11}


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with server() as s:
        yield s


@pytest.fixture(scope="module")
def client(served: Served) -> ollama.Client:
    return ollama.Client(host=served.base, timeout=120)


@pytest.fixture(scope="module")
def oai(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key="unused", max_retries=0, timeout=120)


def durations_add_up(r: ollama.ChatResponse | ollama.GenerateResponse) -> None:
    """Ollama's durations (ns) are measured, non-negative and split the total (rounding aside)."""
    parts = (r.load_duration, r.prompt_eval_duration, r.eval_duration)
    assert all(isinstance(p, int) and p >= 0 for p in parts) and r.prompt_eval_duration > 0
    assert abs(r.total_duration - sum(parts)) <= 3


def test_chat_equals_the_api(client: ollama.Client, demo_model) -> None:
    expected = demo_model.answer(QUESTION)
    assert expected.text == "7"
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat(model="muomni", messages=messages)
    assert (r.message.role, r.message.content, r.done, r.done_reason) == ("assistant", "7", True, "stop")
    assert (r.prompt_eval_count, r.eval_count) == (expected.prompt_tokens, expected.generated_tokens)
    durations_add_up(r)
    parts = list(client.chat(model="muomni:latest", messages=messages, stream=True))
    assert "".join(p.message.content for p in parts) == "7"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True] and parts[-1].message.content == ""
    assert (parts[-1].done_reason, parts[-1].eval_count) == ("stop", expected.generated_tokens)
    durations_add_up(parts[-1])
    # seeded sampling, a budget and a stop string: each as the API answers with the same options
    sampled = demo_model.chat(QUESTION, max_new_tokens=12, **SAMPLED)
    r = client.chat(model="muomni", messages=messages, options={**SAMPLED, "num_predict": 12})
    assert r.message.content == sampled
    short = client.chat(model="muomni", messages=messages, options={"num_predict": 1})
    assert (short.message.content, short.eval_count, short.done_reason) == \
        (demo_model.chat(QUESTION, max_new_tokens=1), 1, "length")
    stop = sampled[len(sampled) // 2:len(sampled) // 2 + 2]
    cut = client.chat(model="muomni", messages=messages, options={**SAMPLED, "num_predict": 12, "stop": [stop]})
    assert (cut.message.content, cut.done_reason) == (sampled[:sampled.index(stop)], "stop")


def test_chat_history_images_and_load(client: ollama.Client, served: Served, demo_model) -> None:
    r = httpx.post(f"{served.base}/api/chat", timeout=120, json={"model": "muomni", "stream": False, "messages": [
        {"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"}, {"role": "user", "content": QUESTION}]})
    assert r.headers["x-omni-ignored-messages"] == "3" and r.json()["message"]["content"] == "7"
    image = EXAMPLES / "blue_square.png"
    expected = demo_model.chat("What do you see?", image=image)
    r = client.chat(model="muomni", messages=[{"role": "user", "content": "What do you see?", "images": [image]}])
    assert r.message.content == expected
    assert client.chat(model="muomni", messages=[]).done_reason == "load"  # a client preloading the model


def test_generate_equals_the_api(client: ollama.Client, demo_model) -> None:
    r = client.generate(model="muomni", prompt=QUESTION)
    assert (r.response, r.done_reason, r.eval_count) == ("7", "stop", demo_model.answer(QUESTION).generated_tokens)
    durations_add_up(r)
    parts = list(client.generate(model="muomni", prompt=QUESTION, stream=True, options={**SAMPLED, "num_predict": 12}))
    assert "".join(p.response for p in parts) == demo_model.chat(QUESTION, max_new_tokens=12, **SAMPLED)
    assert parts[-1].done and parts[-1].eval_count >= 1
    image = EXAMPLES / "red_circle.png"
    b64 = base64.b64encode(image.read_bytes()).decode()
    assert client.generate(model="muomni", images=[b64]).response == demo_model.chat(image=image)  # default prompt
    # `system` is joined before the prompt as the API's `system` does
    assert client.generate(model="muomni", prompt=QUESTION, system="Answer with digits.").response == \
        demo_model.chat(QUESTION, system="Answer with digits.")
    assert client.generate(model="muomni").done_reason == "load"


def test_num_ctx_caps_prompt_and_answer(served: Served, demo_model) -> None:
    prompt = demo_model.answer(QUESTION).prompt_tokens
    body = {"model": "muomni", "prompt": QUESTION, "stream": False, "options": {"num_ctx": prompt + 1}}
    r = httpx.post(f"{served.base}/api/generate", json=body, timeout=120)
    assert (r.json()["eval_count"], r.json()["done_reason"]) == (1, "length"), r.text
    assert r.headers["x-omni-warnings"] == f"num_predict reduced from 32 to 1 to fit num_ctx {prompt + 1}"
    r = httpx.post(f"{served.base}/api/generate", json={**body, "options": {"num_ctx": prompt}}, timeout=120)
    assert r.status_code == 400 and "leaves no room" in r.json()["error"], r.text


def test_list_show_ps_version(client: ollama.Client, served: Served, demo_model) -> None:
    [listed] = client.list().models
    assert listed.model == "muomni" and listed.size > 0 and len(listed.digest) == 64
    assert (listed.details.family, listed.details.quantization_level) == ("muomni", "F32")
    shown = client.show("muomni")
    assert shown.modelinfo["muomni.context_length"] == demo_model.context_length == 512
    assert shown.modelinfo["general.parameter_count"] == demo_model.info()["parameters"]
    assert shown.capabilities == ["completion", "vision"] and "num_predict 32" in shown.parameters.splitlines()
    [running] = client.ps().models
    assert (running.model, running.size_vram, running.context_length) == ("muomni", 0, 512)
    assert httpx.get(f"{served.base}/api/version").json() == {"version": __version__}
    assert httpx.head(f"{served.base}/").status_code == 200  # the probe of Ollama's CLI
    r = httpx.get(f"{served.base}/api/pull")
    assert (r.status_code, r.json()) == (404, {"error": "GET /api/pull: no such route"})
    with pytest.raises(ollama.ResponseError) as err:
        client.show("llama3")
    assert err.value.status_code == 404 and "not found" in err.value.error


@pytest.mark.parametrize("path,fields,name", [
    ("/api/chat", {"options": {"mirostat": 1}}, "options.mirostat"),
    ("/api/chat", {"options": {"temperature": "hot"}}, "options.temperature"),
    ("/api/chat", {"options": {"top_p": 0}}, "options.top_p"),
    ("/api/chat", {"options": {"num_predict": -1}}, "options.num_predict"),
    ("/api/chat", {"options": {"num_ctx": 100000}}, "options.num_ctx"),
    ("/api/chat", {"format": "yaml"}, "format"),
    ("/api/chat", {"format": "json", "options": {"stop": ["}"]}}, "options.stop"),
    ("/api/chat", {"think": True}, "think"),
    ("/api/chat", {"keep_alive": 0}, "keep_alive"),
    ("/api/chat", {"keep_alive": "soon"}, "keep_alive"),
    ("/api/chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/api/chat", {"logprobs": True}, "logprobs"),
    ("/api/chat", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0].role"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": ["not base64!"]}]},
     "messages[0].images[0]"),
    ("/api/chat", {"mirostat": 1}, "mirostat"),
    ("/api/generate", {"suffix": "end"}, "suffix"),
    ("/api/generate", {"template": "{{ .System }}"}, "template"),
    ("/api/generate", {"context": [1, 2, 3]}, "context"),
    ("/api/generate", {"raw": True, "system": "Be brief."}, "system"),
])
def test_refused_by_name(served: Served, path: str, fields: dict, name: str) -> None:
    body = {"model": "muomni", "stream": False, **fields}
    body.setdefault("messages" if path == "/api/chat" else "prompt",
                    [{"role": "user", "content": "hi"}] if path == "/api/chat" else "hi")
    r = httpx.post(f"{served.base}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert isinstance(error, str) and name in error, error


def test_format_holds_the_answer_to_json(client: ollama.Client, demo_model) -> None:
    """`format` "json" and a JSON schema: the answer is the API's under the same response_format, and parses."""
    schema = {"type": "object", "properties": {"sum": {"type": "integer"}}, "required": ["sum"]}
    for fmt, response_format in (("json", {"type": "json_object"}),
                                 (schema, {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}})):
        r = client.chat(model="muomni", messages=[{"role": "user", "content": QUESTION}], format=fmt,
                        options={"num_predict": 24})
        api = demo_model.answer(QUESTION, max_new_tokens=24, response_format=response_format)
        assert r.message.content == api.text
        if r.done_reason == "stop":
            value = json.loads(r.message.content)
            assert isinstance(value, dict) and (fmt == "json" or isinstance(value["sum"], int))


def test_accepted_fields_of_no_effect(client: ollama.Client) -> None:
    """keep_alive (the model stays loaded), think false and raw (no template: the same prompt) answer as without."""
    r = client.generate(model="muomni", prompt=QUESTION, keep_alive="5m", think=False, raw=True)
    assert r.response == "7"
    r = client.chat(model="muomni", messages=[{"role": "user", "content": QUESTION}], keep_alive=-1)
    assert r.message.content == "7"


def test_completions_equal_the_api(oai: openai.OpenAI, demo_model) -> None:
    expected = demo_model.answer(QUESTION)
    r = oai.completions.create(model="muomni", prompt=QUESTION)
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == [(0, "7", "stop")]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (expected.prompt_tokens, expected.generated_tokens)
    second = "What is 12 plus 30?"
    answers = [expected.text, demo_model.chat(second)]
    r = oai.completions.create(model="muomni", prompt=[QUESTION, second], echo=True)
    assert [c.text for c in r.choices] == [QUESTION + answers[0], second + answers[1]]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(oai.completions.create(model="muomni", prompt=[QUESTION, second], stream=True,
                                         stream_options={"include_usage": True}))
    assert ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in (0, 1)] \
        == answers
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    sampled = demo_model.chat(QUESTION, max_new_tokens=12, **SAMPLED)
    r = oai.completions.create(model="muomni", prompt=QUESTION, max_tokens=12, **SAMPLED)
    assert r.choices[0].text == sampled
    stop = sampled[len(sampled) // 2:len(sampled) // 2 + 2]
    r = oai.completions.create(model="muomni", prompt=QUESTION, max_tokens=12, stop=stop, **SAMPLED)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (sampled[:sampled.index(stop)], "stop")
    r = oai.completions.create(model="muomni", prompt=QUESTION, max_tokens=1)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (demo_model.chat(QUESTION, max_new_tokens=1), "length")


def test_completions_logprobs_and_penalties_equal_the_apis(oai: openai.OpenAI, demo_model) -> None:
    """Legacy `logprobs` N: the API's log-probabilities in the legacy shape (whole and streamed, offsets after
    the echoed prompt); the penalties and logit_bias as on chat."""
    api = demo_model.answer(QUESTION, max_new_tokens=6, ignore_eos=True, logprobs=2)
    r = oai.completions.create(model="muomni", prompt=QUESTION, max_tokens=6, logprobs=2, echo=True,
                               extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [e["token"] for e in api.logprobs]
    assert lp.token_logprobs == [e["logprob"] for e in api.logprobs]
    assert lp.top_logprobs == [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in api.logprobs]
    assert lp.text_offset[0] == len(QUESTION) and len(lp.text_offset) == 6
    chunks = list(oai.completions.create(model="muomni", prompt=QUESTION, max_tokens=6, logprobs=2, stream=True,
                                         extra_body={"ignore_eos": True}))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    for options in ({"presence_penalty": 1.5, "frequency_penalty": 1.0}, {"logit_bias": {"434": -100}}):
        r = oai.completions.create(model="muomni", prompt=QUESTION, max_tokens=8, **options)
        assert r.choices[0].text == demo_model.chat(QUESTION, max_new_tokens=8, **options)


@pytest.mark.parametrize("fields,name", [
    ({"suffix": "end"}, "suffix"), ({"logprobs": 6}, "logprobs"), ({"logprobs": True}, "logprobs"),
    ({"n": 2}, "n"), ({"best_of": 2}, "best_of"), ({"prompt": [1, 2, 3]}, "prompt"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"decode_kernel": "c"}, "decode_kernel"), ({"temperature": -1}, "temperature"), ({"mirostat": 1}, "mirostat"),
])
def test_completions_refused_by_name(served: Served, fields: dict, name: str) -> None:
    r = httpx.post(f"{served.base}/v1/completions", json={"model": "muomni", "prompt": QUESTION, **fields}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
    assert f"'{name}'" in r.json()["error"]["message"]
