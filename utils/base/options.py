"""The one table of generation options: name, type, default, range and meaning of each, declared once.

Every front end derives its form of an option from this table, so a value is accepted or refused the same way
everywhere: argparse types and help (utils.cli.args), the REPL's `/set`, the server's request parsing
(utils.server), the API's keyword checks (`SamplingOptions.checked`), generation_config.json. Each front end
reports a refusal in its own form (exit 2, HTTP 400 naming the field, OmniError); the reason is the table's.
Torch-free: `--help` and usage errors never import torch.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from utils.base.defaults import DECODE_ATTENTION, DECODE_KERNELS, DEFAULT_MAX_NEW_TOKENS, MAX_SEED


class OptionError(ValueError):
    """A value an option's row refuses; `name` is the option, the message says why (without the name)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} {reason}")
        self.name, self.reason = name, reason


@dataclass(frozen=True)
class Option:
    """One row of the table. `kind` is int, float, bool, str or dict; numbers lie in [low, high] (low excluded
    with `low_open`); a str option takes one of `choices`; a dict option either maps token ids (ints >= 0, or
    their decimal strings as JSON object keys are) to numbers in [low, high], or, with a `shape`, is checked and
    normalised by it (its `help` says the accepted shapes); text for a dict option is a JSON object. `nullable`
    options may be None (meaning "not set": the engine decides, e.g. a seed drawn from the global generator).
    `cli`: a command-line flag and a REPL `/set` name; `http`: a field of a server request (the others are fixed
    when the server's engine starts, so a request naming one is refused by name)."""
    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    metavar: str | None = None
    cli: bool = True
    http: bool = True
    shape: Callable[[dict], Any] | None = None

    def range_text(self) -> str:
        """The accepted values in words, for help texts and refusals."""
        if self.kind is bool:
            return "true or false"
        if self.kind is dict:
            if self.shape is not None:
                return "an object"
            return f"an object of token id -> number in [{self.low:g}, {self.high:g}]"
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        noun = "an integer" if self.kind is int else "a number"
        low, high = self.low, self.high
        show = (lambda x: str(int(x))) if self.kind is int else (lambda x: f"{x:g}")
        if low is not None and high is not None and high != math.inf:
            return f"{noun} in {'(' if self.low_open else '['}{show(low)}, {show(high)}]"
        if low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {show(low)}"
        return noun

    def check(self, value: Any) -> Any:
        """The value, if this row accepts it (ints accepted for float options, as float); else OptionError.
        Python types only: text is parsed by `parse` first."""
        if value is None:
            if self.nullable:
                return None
            raise OptionError(self.name, f"must be {self.range_text()}, not null")
        if self.kind is dict:
            if not isinstance(value, dict):
                raise OptionError(self.name, f"{value!r} must be {self.range_text()}")
            if self.shape is None:
                return self._check_map(value)
            try:
                return self.shape(value)
            except ValueError as exc:
                raise OptionError(self.name, str(exc)) from None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise OptionError(self.name, f"{value!r} must be true or false")
            return value
        if self.kind is str:
            if not isinstance(value, str) or value not in (self.choices or ()):
                raise OptionError(self.name, f"{value!r} must be {self.range_text()}")
            return value
        given = value  # refusals show the value as it came
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(self.name, f"{value!r} must be {self.range_text()}")
        if self.kind is int and not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                raise OptionError(self.name, f"{value!r} must be {self.range_text()}")
            value = int(value)
        if self.kind is float:
            if not math.isfinite(value):
                raise OptionError(self.name, f"{value!r} must be a finite number")
            value = float(value)
        low, high = self.low, self.high
        if (low is not None and (value < low or (self.low_open and value == low))) or \
                (high is not None and value > high):
            raise OptionError(self.name, f"{given!r} must be {self.range_text()}")
        return value

    def _check_map(self, value: Any) -> dict[int, float]:
        """A token map's value as {token id: float}, each key and number checked."""
        number = Option(self.name, float, None, "", low=self.low, high=self.high)
        out: dict[int, float] = {}
        for key, bias in value.items():
            tid = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise OptionError(self.name, f"key {key!r} must be a token id (an integer >= 0)")
            try:
                out[tid] = number.check(bias)
            except OptionError as exc:
                raise OptionError(self.name, f"[{key!r}]: {exc.reason}") from None
        return out

    def parse(self, text: str) -> Any:
        """A value from command-line or REPL text, checked."""
        if self.kind is dict:
            try:
                value = json.loads(text)
            except ValueError:
                raise OptionError(self.name, f"{text!r} is not a JSON object (e.g. '{{\"434\": -100}}')") from None
            return self.check(value)
        if self.kind is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise OptionError(self.name, f"{text!r} must be true or false")
        if self.kind is str:
            return self.check(text)
        try:
            value = self.kind(text)
        except ValueError:
            raise OptionError(self.name, f"{text!r} is not {'an integer' if self.kind is int else 'a number'}") \
                from None
        return self.check(value)


RESPONSE_FORMATS = ("text", "json_object", "json_schema", "grammar")
# How JSON answers are written (llguidance's JSON options): compact, as json.dumps writes it, since a small model
# given free whitespace can pad an answer with it until the budget runs out.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def response_format(value: dict) -> dict | None:
    """A response format checked and normalised (OpenAI's shapes, plus a grammar): {"type": "text"} is None (no
    constraint); {"type": "json_object"}; {"type": "json_schema", "json_schema": {"name": NAME, "schema": {...},
    "strict": BOOL, "description": TEXT}}; {"type": "grammar", "grammar": GBNF or Lark text}. ValueError says
    what is wrong (whether a schema or grammar compiles is the engine's to say)."""
    kind = value.get("type")
    if kind not in RESPONSE_FORMATS:
        raise ValueError(f"type {kind!r} must be one of {', '.join(RESPONSE_FORMATS)}")
    keys = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"},
            "grammar": {"type", "grammar"}}[kind]
    extra = sorted(set(value) - keys)
    if extra:
        raise ValueError(f"of type {kind!r} takes no {extra[0]!r}")
    if kind == "text":
        return None
    if kind == "grammar":
        if not isinstance(value.get("grammar"), str) or not value["grammar"].strip():
            raise ValueError("of type 'grammar' needs 'grammar': the GBNF or Lark text")
        return {"type": kind, "grammar": value["grammar"]}
    if kind == "json_object":
        return {"type": kind}
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("of type 'json_schema' needs 'json_schema': an object with 'name' and 'schema'")
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if extra:
        raise ValueError(f"json_schema takes no {extra[0]!r} (only name, schema, strict, description)")
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ValueError("json_schema.name must be 1 to 64 letters, digits, '_' or '-'")
    if not isinstance(spec.get("schema"), dict):
        raise ValueError("json_schema.schema must be a JSON schema object")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ValueError("json_schema.strict must be true or false")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise ValueError("json_schema.description must be a string")
    return {"type": kind, "json_schema": dict(spec)}


OPTIONS: tuple[Option, ...] = (
    Option("max_new_tokens", int, DEFAULT_MAX_NEW_TOKENS, low=1, metavar="N",
           help="Most tokens to generate (an upper bound: never more than the context has room for)."),
    Option("temperature", float, 0.0, low=0.0, metavar="T",
           help="Sampling temperature; 0 means greedy decoding."),
    Option("top_k", int, 0, low=0, metavar="K",
           help="Sample only among the K most likely tokens (0 = no limit)."),
    Option("top_p", float, 1.0, low=0.0, high=1.0, low_open=True, metavar="P",
           help="Nucleus sampling: sample among the most likely tokens whose probabilities sum to P (1 = off)."),
    Option("repetition_penalty", float, 1.0, low=0.0, low_open=True, metavar="R",
           help="Divide the scores of tokens already in the prompt or answer by R (1 = off; 1.1-1.3 discourages "
                "loops)."),
    Option("presence_penalty", float, 0.0, low=-2.0, high=2.0, metavar="P",
           help="Subtract P from the score of every token the answer already contains (OpenAI's presence penalty; "
                "0 = off, > 0 discourages repeating a token)."),
    Option("frequency_penalty", float, 0.0, low=-2.0, high=2.0, metavar="F",
           help="Subtract F times the number of times a token already occurs in the answer from its score "
                "(OpenAI's frequency penalty; 0 = off)."),
    Option("min_p", float, 0.0, low=0.0, high=1.0, metavar="P",
           help="Sample only among tokens whose probability is at least P times the most likely token's (0 = off)."),
    Option("logit_bias", dict, None, low=-100.0, high=100.0, nullable=True, metavar="JSON",
           help="Add a bias to the scores of token ids, as a JSON object of id -> bias in [-100, 100] "
                "(e.g. '{\"434\": -100}'); -100 bans the token."),
    Option("seed", int, None, low=0, high=MAX_SEED, nullable=True, metavar="S",
           help="Random seed for sampling: the same seed gives the same output."),
    Option("ignore_eos", bool, False,
           help="Keep generating after the end-of-sequence token, up to max_new_tokens."),
    Option("logprobs", int, None, low=0, high=20, nullable=True, metavar="N",
           help="Report each generated token's log-probability under the model (its raw distribution, before "
                "penalties, biases and temperature) and the N most likely alternatives at that position (0-20)."),
    Option("response_format", dict, None, nullable=True, cli=False, shape=response_format,
           help="Hold the answer to a format (constrained decoding, utils.engine.constrain): {\"type\": "
                "\"json_object\"} (any JSON object), {\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., "
                "\"schema\": {...}}} (JSON valid against the schema, whatever 'strict' says), {\"type\": "
                "\"grammar\", \"grammar\": GBNF or Lark text}; {\"type\": \"text\"} or null: free text."),
    Option("decode_attention", str, DECODE_ATTENTION[0], choices=DECODE_ATTENTION, http=False,
           help="'causal' attends to every earlier position, as the models were trained. 'reference' reproduces "
                "a DEFECT of the μOmni reference implementation (each generated token attends to the first "
                "position only), kept only to compare with its old outputs."),
    Option("decode_kernel", str, DECODE_KERNELS[0], choices=DECODE_KERNELS, http=False,
           help="The decode step: 'auto' runs it in C where it applies (float32 or int8 thinker on the CPU, "
                "causal decoding), else in torch; 'c' requires the C step; 'torch' never uses it."),
    Option("fast_greedy", bool, True, cli=False, http=False,
           help="Greedy decoding on the CPU through the int8-screened exact argmax (the same ids; off only to "
                "measure it)."),
)
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


@dataclass
class SamplingOptions:
    """One generation's options, one field per row of OPTIONS (same names, same defaults)."""
    max_new_tokens: int = BY_NAME["max_new_tokens"].default
    temperature: float = BY_NAME["temperature"].default
    top_k: int = BY_NAME["top_k"].default
    top_p: float = BY_NAME["top_p"].default
    repetition_penalty: float = BY_NAME["repetition_penalty"].default
    presence_penalty: float = BY_NAME["presence_penalty"].default
    frequency_penalty: float = BY_NAME["frequency_penalty"].default
    min_p: float = BY_NAME["min_p"].default
    logit_bias: dict[int, float] | None = BY_NAME["logit_bias"].default
    seed: int | None = BY_NAME["seed"].default
    ignore_eos: bool = BY_NAME["ignore_eos"].default
    logprobs: int | None = BY_NAME["logprobs"].default
    response_format: dict | None = BY_NAME["response_format"].default
    decode_attention: str = BY_NAME["decode_attention"].default
    decode_kernel: str = BY_NAME["decode_kernel"].default
    fast_greedy: bool = BY_NAME["fast_greedy"].default

    @property
    def counts(self) -> bool:
        """Whether the presence or frequency penalty needs the counts of the ids generated so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        """Picks the argmax of the raw scores and asks for nothing else (no penalty, bias, mask or logprobs): the
        ids alone suffice, the path the int8 screen and the C step's own argmax take."""
        return (self.temperature <= 0 and self.repetition_penalty == 1.0 and not self.counts
                and not self.logit_bias and self.logprobs is None and self.response_format is None)

    def updated(self, **values: Any) -> "SamplingOptions":
        """A copy with `values` set, each checked by its row (None leaves a field as it is); an unknown name
        is an OptionError naming it."""
        for name in values:
            if name not in BY_NAME:
                raise OptionError(name, f"is not a generation option (known: {', '.join(BY_NAME)})")
        return replace(self, **{k: BY_NAME[k].check(v) for k, v in values.items() if v is not None})

    def checked(self) -> "SamplingOptions":
        """Self, after checking every field against its row (OptionError for the first bad one)."""
        for f in fields(self):
            BY_NAME[f.name].check(getattr(self, f.name))
        if self.ignore_eos and self.response_format is not None:
            raise OptionError("ignore_eos", "cannot be combined with response_format: the format decides where "
                                            "the answer ends")
        return self


def _table_matches_dataclass() -> None:
    names = [f.name for f in fields(SamplingOptions)]
    if names != list(BY_NAME):
        raise AssertionError(f"SamplingOptions fields {names} != OPTIONS {list(BY_NAME)}")
    for f in fields(SamplingOptions):
        if f.default != BY_NAME[f.name].default:
            raise AssertionError(f"SamplingOptions.{f.name} default {f.default!r} != the table's")


_table_matches_dataclass()
