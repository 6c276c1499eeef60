"""The one table of generation options (utils/base/options.py) holds in every front end: for each user-facing row, a
boundary value it accepts and a value it refuses are accepted or refused alike by the command line (exit 2
naming the flag), the REPL's /set (its error line), the server (HTTP 400 naming the client's field) and the API
(SamplingOptions.updated: OptionError). One server and one REPL serve the whole module."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pexpect
import pytest

from tests.conftest import run_cli
from tests.test_repl import ask, spawn
from tests.test_serve import Served, server
from utils.base.defaults import MAX_SEED
from utils.base.options import BY_NAME, OPTIONS, OptionError, SamplingOptions

# row -> (values its range accepts, at the boundaries and beyond the server's old caps), (values it refuses)
VALUES: dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]] = {
    "max_new_tokens": ((1,), (0,)),
    "temperature": ((0.0, 2.5), (-0.5,)),
    "top_k": ((0,), (-1,)),
    "top_p": ((1.0, 1e-6), (0.0, 1.5)),
    "repetition_penalty": ((150.0, 1e-3), (0.0,)),
    "presence_penalty": ((-2.0, 2.0), (2.5,)),
    "frequency_penalty": ((-2.0, 2.0), (-2.5,)),
    "min_p": ((0.0, 1.0), (-0.1, 1.5)),
    "logit_bias": (({5: -100.0}, {5: 100.0, 6: 0.5}), ({5: -100.5},)),
    "seed": ((0, MAX_SEED), (MAX_SEED + 1,)),
    "ignore_eos": ((True,), ("maybe",)),
    "logprobs": ((0, 20), (21,)),
    "decode_attention": (("reference",), ("sideways",)),
    "decode_kernel": (("torch",), ("gpu",)),
}
USER_ROWS = [o for o in OPTIONS if o.cli]
CASES = [pytest.param(name, value, ok, id=f"{name}={value}-{'ok' if ok else 'refused'}")
         for name, (good, bad) in VALUES.items() for ok, values in ((True, good), (False, bad)) for value in values]
# logprobs comes over HTTP as OpenAI shapes it (test_server_logprobs_fields)
HTTP_CASES = [c for c in CASES if BY_NAME[c.values[0]].http and c.values[0] != "logprobs"]


def text(value: Any) -> str:
    """A value as it is typed on a command line or after /set (a logit_bias as JSON without spaces)."""
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_every_user_facing_row_is_covered() -> None:
    assert sorted(VALUES) == sorted(o.name for o in USER_ROWS)


def test_flags_and_set_names_are_the_rows() -> None:
    from utils.cli.args import build_parser
    from utils.cli.repl import SETTABLE
    parser = build_parser("infer_chat.py", "")
    group = next(g for g in parser._action_groups if g.title == "generation")
    flags = {a.dest: a for a in group._group_actions if a.dest != "system"}
    assert list(flags) == [o.name for o in USER_ROWS] == list(SETTABLE)
    for o in USER_ROWS:
        assert flags[o.name].default is None  # generation_config.json still applies
        assert flags[o.name].metavar == o.metavar and o.help in flags[o.name].help
    assert {"--temp", "--top-p", "--max-new-tokens"} <= set(parser._option_string_actions)


@pytest.mark.parametrize("name,value,ok", CASES)
def test_command_line(name: str, value: Any, ok: bool) -> None:
    flag = f"--{name}"
    r = run_cli("--ckpt_dir", "unused", flag if value is True else f"{flag}={text(value)}", "--help")
    if ok:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 2 and f"error: argument {flag}" in r.stderr and r.stdout == "", r.stderr


@pytest.fixture(scope="module")
def repl(tiny_tree: Path) -> Iterator[pexpect.spawn]:
    child = spawn("--ckpt_dir", str(tiny_tree), "--quiet", "--device", "cpu", "--json")  # --json: logprobs shown
    yield child
    child.close(force=True)


@pytest.mark.parametrize("name,value,ok", CASES)
def test_repl_set(repl: pexpect.spawn, name: str, value: Any, ok: bool) -> None:
    said = ask(repl, f"/set {name} {text(value)}")
    if ok:
        assert f"set {name} to" in said and "error" not in said, said
        ask(repl, f"/set {name} default")
    else:
        assert f"error: /set {name} {text(value)}: " in said, said


def test_repl_set_aliases_read_their_row(repl: pexpect.spawn) -> None:
    assert "set temperature to 2.5" in ask(repl, "/set temp 2.5")
    assert "error: /set repetition_penalty 0: 0.0 must be a number > 0" in ask(repl, "/set repeat_penalty 0")
    assert "set max_new_tokens to 3" in ask(repl, "/set parameter num_predict 3")
    shown = ask(repl, "/set")
    assert all(f"{o.name} " in shown for o in USER_ROWS) and "temperature 2.5" in shown, shown
    ask(repl, "/set temperature default")
    ask(repl, "/set max_new_tokens default")


@pytest.fixture(scope="module")
def served(tiny_tree: Path) -> Iterator[Served]:
    with server(ckpt=tiny_tree) as s:
        yield s


def chat(base: str, **fields: Any) -> httpx.Response:
    body = {"model": "muomni", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **fields}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)


@pytest.mark.parametrize("name,value,ok", HTTP_CASES)
def test_server(served: Served, name: str, value: Any, ok: bool) -> None:
    for field in ("max_tokens", "max_completion_tokens") if name == "max_new_tokens" else (name,):
        r = chat(served.base, **{field: value})
        if ok:
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("fields,param", [({"logprobs": True, "top_logprobs": 0}, None),
                                          ({"logprobs": True, "top_logprobs": 20}, None),
                                          ({"logprobs": False}, None),
                                          ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                                          ({"top_logprobs": 2}, "top_logprobs"),
                                          ({"logprobs": 2}, "logprobs")])
def test_server_logprobs_fields(served: Served, fields: dict, param: str | None) -> None:
    """OpenAI's `logprobs` (a boolean) and `top_logprobs` (how many, 0-20) feed the table's logprobs row."""
    r = chat(served.base, ignore_eos=True, **fields)
    if param is None:
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["logprobs"]
        if fields["logprobs"]:
            assert [len(e["top_logprobs"]) for e in got["content"]] == [fields["top_logprobs"]], got
        else:
            assert got is None
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_repl_refuses_logprobs_without_json() -> None:
    from utils.base.errors import OmniError
    from utils.cli.repl import set_option
    with pytest.raises(OmniError, match="--json only"):
        set_option(None, argparse.Namespace(json=False), "logprobs 2")


def test_command_line_refuses_logprobs_without_json() -> None:
    r = run_cli("--ckpt_dir", "unused", "--text", "hi", "--logprobs", "2")
    assert r.returncode == 2 and "--logprobs needs --json" in r.stderr and r.stdout == "", r.stderr


@pytest.mark.parametrize("name", [o.name for o in OPTIONS if not o.http])
def test_server_refuses_the_rows_its_engine_fixes(served: Served, name: str) -> None:
    r = chat(served.base, **{name: BY_NAME[name].default})
    assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text


def test_server_takes_max_tokens_not_the_rows_name(served: Served) -> None:
    r = chat(served.base, max_new_tokens=4)  # refused by name, not ignored
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_new_tokens", r.text
    r = chat(served.base, max_tokens=1, max_completion_tokens=3, ignore_eos=True)  # OpenAI's newer name wins
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


@pytest.mark.parametrize("name,value,ok", CASES)
def test_api(name: str, value: Any, ok: bool) -> None:
    if ok:
        assert getattr(SamplingOptions().updated(**{name: value}), name) == value
    else:
        with pytest.raises(OptionError) as exc:
            SamplingOptions().updated(**{name: value})
        assert exc.value.name == name


def test_argparse_type_names_the_reason() -> None:
    from utils.cli.args import option_type
    with pytest.raises(argparse.ArgumentTypeError, match=r"\(or -1: a random seed\)"):
        option_type(BY_NAME["seed"])("-2")
    assert option_type(BY_NAME["seed"])("-1") == -1
