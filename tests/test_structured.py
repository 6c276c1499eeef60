"""Structured output (utils/engine/constrain.py): answers held to JSON, JSON schemas and grammars by a token mask
before every pick, and forced tool calls. In-process through the API for the engine's behaviour; one real
serve.py talked to with the official `openai` client for the wire format; two CLI runs for the flags."""
from __future__ import annotations

import concurrent.futures
import json
from typing import Any, Iterator

import httpx
import jsonschema
import openai
import pytest
import torch

from tests.conftest import QUESTION, SHARED_FIXTURE, c_step_param, needs_demo, run_demo
from utils.base.errors import OmniError
from utils.base.options import BY_NAME, OptionError, SamplingOptions

pytestmark = needs_demo


def bounded(properties: dict[str, Any]) -> dict[str, Any]:
    """An object schema whose every listed property is required and nothing else allowed."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


SCHEMAS: list[dict[str, Any]] = [
    bounded({"answer": {"type": "integer", "minimum": 0, "maximum": 99}}),
    bounded({"shape": {"enum": ["circle", "square", "triangle"]}, "color": {"enum": ["red", "green", "blue"]}}),
    bounded({"word": {"type": "string", "maxLength": 12}}),
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
    bounded({"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5, "maximum": 5}}),
    bounded({"tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}}),
    bounded({"name": {"type": "string", "pattern": "^[a-z]{1,8}$"}, "age": {"type": "integer", "minimum": 1,
                                                                           "maximum": 120}}),
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10}, {"type": "string", "maxLength": 5}]},
    bounded({"point": bounded({"x": {"type": "integer", "minimum": 0, "maximum": 9},
                               "y": {"type": "integer", "minimum": 0, "maximum": 9}})}),
    bounded({"kind": {"const": "fruit"}, "count": {"enum": [1, 2, 3]}}),
    {"type": "array", "items": bounded({"c": {"enum": ["red", "blue"]}}), "minItems": 1, "maxItems": 2},
    bounded({"label": {"type": "string", "maxLength": 4}, "score": {"type": "integer", "minimum": 0, "maximum": 9},
             "done": {"type": "boolean"}}),
]
PROMPTS = ["What is 3 plus 4?", "Describe the picture.", "Hello", "What colour is the circle?", "Name a shape."]
BUDGET = 48


def schema_format(i: int) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i], "strict": True}}


def cases() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(prompt, response_format, the schema its answer must satisfy): every schema with every prompt, and JSON
    mode with the prompts the demo answers with a finished object."""
    out = [(p, schema_format(i), SCHEMAS[i]) for i in range(len(SCHEMAS)) for p in PROMPTS]
    return out + [(p, {"type": "json_object"}, {"type": "object"}) for p in (QUESTION, "Name a shape.")]


def check_answer(text: str, finish: str, generated: int, schema: dict[str, Any]) -> bool:
    """A finished answer parses and validates; an unfinished one used the whole budget. True if finished."""
    if finish == "length":
        assert generated == BUDGET, (text, generated)
        return False
    assert finish == "stop", finish
    jsonschema.validate(json.loads(text), schema)
    return True


@pytest.fixture(scope="module")
def api_answers(demo_model) -> list[Any]:
    """The API's answers to every case, decoded together (the batch path, per-item formats)."""
    items = [{"text": p, "response_format": fmt} for p, fmt, _ in cases()]
    return demo_model.answer_batch(items, batch_size=len(items), max_new_tokens=BUDGET)


# ---------------------------------------------------------------- the engine, in process

def test_api_answers_validate(api_answers) -> None:
    finished = [check_answer(a.text, a.finish_reason, a.generated_tokens, schema)
                for a, (_, _, schema) in zip(api_answers, cases())]
    assert sum(finished) >= 50, f"only {sum(finished)} of {len(finished)} answers finished within the budget"


def test_batch_answers_equal_one_by_one(demo_model, api_answers) -> None:
    """A constrained row's ids do not depend on its neighbours: `answer` alone gives the batch's answer."""
    for k in (0, 7, 23, len(cases()) - 1):
        prompt, fmt, _ = cases()[k]
        alone = demo_model.answer(prompt, response_format=fmt, max_new_tokens=BUDGET)
        assert (alone.token_ids, alone.finish_reason) == (api_answers[k].token_ids, api_answers[k].finish_reason)


@pytest.mark.parametrize("kernel", ["torch", c_step_param()])
def test_mask_applies_on_the_greedy_path(demo_model, kernel: str) -> None:
    """The demo answers this question in free text; constrained, each id is the argmax of the masked logits
    (recomputed here by teacher forcing through the engine), on the C step as on the torch one: a constrained
    row taking the step's own argmax would emit unmasked ids."""
    from utils.engine.generation import forced_logits

    fmt = schema_format(1)
    plain = demo_model.answer(QUESTION, max_new_tokens=BUDGET, decode_kernel=kernel)
    assert not plain.text.startswith("{")
    ans = demo_model.answer(QUESTION, response_format=fmt, max_new_tokens=BUDGET, decode_kernel=kernel)
    assert ans.finish_reason == "stop" and json.loads(ans.text) == {"shape": "circle", "color": "red"}
    assert ans.timing["decode_kernel"].startswith(kernel)
    parts = demo_model.parts
    ids = parts.tokenizer.prompt_ids(QUESTION)
    embeds = parts.thinker.tok_emb(torch.tensor(ids))
    logits = forced_logits(parts.thinker, embeds, ans.token_ids, demo_model.sampling_options(decode_kernel=kernel))
    state = demo_model.constraint(fmt)
    for step, tid in enumerate(ans.token_ids + [2]):  # the answer, then the EOS that ended it
        masked = state.mask(logits[step:step + 1].clone())
        assert int(masked.argmax()) == tid, f"step {step}"
        assert (tid == 2) == state.accepting
        if tid != 2:
            state.advance(tid)


def test_sampled_answers_validate_and_repeat(demo_model) -> None:
    """The mask comes before temperature sampling: seeded sampled answers validate, and a seed repeats."""
    schema = SCHEMAS[4]
    texts = []
    for seed in range(6):
        ans = demo_model.answer("Hello", response_format=schema_format(4), max_new_tokens=BUDGET, temperature=1.0,
                                seed=seed)
        check_answer(ans.text, ans.finish_reason, ans.generated_tokens, schema)
        texts.append(ans.text)
    assert len(set(texts)) > 1
    again = demo_model.answer("Hello", response_format=schema_format(4), max_new_tokens=BUDGET, temperature=1.0,
                              seed=0)
    assert again.text == texts[0]


def test_budget_runs_out_mid_answer(demo_model, api_answers) -> None:
    """The budget cuts a constrained answer where it is: finish_reason "length", the full answer's first ids."""
    ans = demo_model.answer(PROMPTS[0], response_format=schema_format(1), max_new_tokens=3)
    full = api_answers[len(PROMPTS)]  # schema 1, the same prompt
    assert ans.finish_reason == "length" and ans.token_ids == full.token_ids[:3]
    assert ans.text == demo_model.parts.tokenizer.decode(full.token_ids[:3])
    with pytest.raises(ValueError):
        json.loads(ans.text)


def test_grammar_and_refusals(demo_model) -> None:
    gbnf = demo_model.answer("Hello", response_format={"type": "grammar", "grammar": 'root ::= "yes" | "no"'})
    lark = demo_model.answer("Hello", response_format={"type": "grammar", "grammar": 'start: "yes" | "no"'})
    assert gbnf.text in ("yes", "no") and lark.text == gbnf.text and gbnf.finish_reason == "stop"
    with pytest.raises(OmniError, match="ignore_eos cannot be combined with response_format"):
        demo_model.answer("Hello", response_format={"type": "json_object"}, ignore_eos=True)
    with pytest.raises(OmniError, match="response_format: .*does not exist"):
        demo_model.answer("Hello", response_format=schema_format(0) | {
            "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}})
    with pytest.raises(OmniError, match="response_format grammar"):
        demo_model.answer("Hello", response_format={"type": "grammar", "grammar": "root ::= ("})


@pytest.mark.parametrize("value, words", [
    ({"type": "xml"}, "type 'xml' must be one of"),
    ({"type": "json_object", "schema": {}}, "takes no 'schema'"),
    ({"type": "json_schema"}, "needs 'json_schema'"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": []}}, "json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}}, "strict"),
    ({"type": "grammar", "grammar": " "}, "needs 'grammar'"),
    ("json", "must be an object"),
])
def test_format_row_refuses_by_name(value: Any, words: str) -> None:
    with pytest.raises(OptionError, match=words) as info:
        BY_NAME["response_format"].check(value)
    assert info.value.name == "response_format"


def test_text_format_is_no_constraint() -> None:
    assert BY_NAME["response_format"].check({"type": "text"}) is None
    assert not SamplingOptions(response_format={"type": "json_object"}).greedy


def test_vocabulary_without_the_characters_is_refused() -> None:
    """The reference fixture's 400-piece tokenizer has no byte fallback and no "{": JSON cannot start."""
    from utils.engine.constrain import Vocabulary
    from utils.media.tokenizer import Tokenizer

    path = SHARED_FIXTURE / "thinker_tiny" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    vocab = Vocabulary(Tokenizer(path), 400)
    with pytest.raises(OmniError, match="no token of this model's vocabulary"):
        vocab.constraint({"type": "json_object"})
    words = vocab.constraint({"type": "grammar", "grammar": 'start: " the" " short"'})
    assert vocab(b" the short") == [9, 68] and not words.accepting
    words.advance(9)
    words.advance(68)
    assert words.accepting


# ---------------------------------------------------------------- the server, with the official client

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": bounded({"city": {"type": "string", "maxLength": 10}})}},
         {"type": "function", "function": {"name": "add", "parameters": bounded(
             {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}})}}]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    from tests.test_serve import server
    with server() as s:
        yield s.base


@pytest.fixture(scope="module")
def client(served: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, prompt: str, **kw: Any) -> Any:
    return client.chat.completions.create(model="muomni", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=BUDGET, **kw)


def test_server_answers_validate_and_equal_the_api(client, api_answers) -> None:
    """Every case sent at once (the server batches them): 100% of the finished answers validate, and each is
    the API's answer for the same options, finish_reason included."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda c: chat(client, c[0], response_format=c[1]), cases()))
    for reply, api, (_, _, schema) in zip(replies, api_answers, cases()):
        choice = reply.choices[0]
        assert (choice.message.content, choice.finish_reason) == (api.text, api.finish_reason)
        check_answer(choice.message.content, choice.finish_reason, reply.usage.completion_tokens, schema)


@pytest.mark.parametrize("choice, name", [
    ({"type": "function", "function": {"name": "add"}}, "add"),
    ("required", None),  # two tools: the grammar lets the answer pick one, name first
])
def test_forced_tool_call(client, choice: Any, name: str | None) -> None:
    reply = chat(client, QUESTION, tools=TOOLS, tool_choice=choice)
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
    (call,) = reply.choices[0].message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in PARAMETERS
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    deltas = list(chat(client, QUESTION, tools=TOOLS, tool_choice=choice, stream=True))
    calls = [d.choices[0].delta.tool_calls[0] for d in deltas if d.choices and d.choices[0].delta.tool_calls]
    assert calls[0].id and calls[0].function.name == call.function.name and calls[0].function.arguments == ""
    assert all(c.id is None and c.function.name is None for c in calls[1:]) and len(calls) > 2
    assert "".join(c.function.arguments for c in calls) == call.function.arguments
    assert deltas[-1].choices[0].finish_reason == "tool_calls"


def test_tool_call_cut_by_the_budget(client) -> None:
    reply = client.chat.completions.create(model="muomni", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=3, tools=TOOLS[:1], tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 3
    assert choice.message.tool_calls[0].function.arguments == '{"ci'  # '{', '"', 'ci': where the budget cut it


def test_tool_choice_none_answers_in_text(client) -> None:
    plain = chat(client, QUESTION)
    none = chat(client, QUESTION, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.content == plain.choices[0].message.content and not none.choices[0].message.tool_calls


@pytest.mark.parametrize("body, param, words", [
    ({"tools": TOOLS}, "tool_choice", "never taught to call tools"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", 'set \'tool_choice\' to "required" or name'),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [{"type": "custom"}]}, "tools", "only function tools"),
    ({"functions": [{"name": "f"}], "function_call": "auto"}, "functions", "deprecated"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"$ref": "#/x"}}}},
     "response_format", "does not exist"),
    ({"response_format": {"type": "yaml"}}, "response_format", "must be one of"),
    ({"response_format": {"type": "json_object"}, "stop": "}"}, "stop", "would cut it"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "cannot be combined"),
    ({"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"}, "response_format",
     "forced tool call"),
])
def test_refusals_name_the_field(served: str, body: dict, param: str, words: str) -> None:
    r = httpx.post(f"{served}/v1/chat/completions", timeout=60,
                   json={"model": "muomni", "messages": [{"role": "user", "content": "Hi"}], **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"], r.text


# ---------------------------------------------------------------- the command line

def test_cli_format_flags(tmp_path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS[1]))
    out = run_demo("--text", QUESTION, "--json_schema_file", str(schema), "--json", "--quiet")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["finish_reason"] == "stop" and json.loads(answer["text"]) == {"shape": "circle", "color": "red"}
    both = run_demo("--text", QUESTION, "--json_object", "--grammar", 'root ::= "a"')
    assert both.returncode == 2 and "--json_object and --grammar cannot be combined" in both.stderr
