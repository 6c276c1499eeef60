"""The sampling options beyond temperature / top-k / top-p (utils/engine/sampling.py and the Scheduler's pick path):
presence and frequency penalties, logit_bias and min_p by their formulas on hand-made logits and by one
end-to-end effect each on the demo model; log-probabilities against teacher-forced logits; `n` choices of one
prompt prefilled once, choice i seeded seed + i; and the greedy fast path kept for rows that ask for none of it."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import one_json, run_demo
from utils.base.defaults import EOS_ID
from utils.base.options import SamplingOptions
from utils.engine import generation
from utils.engine.generation import Scheduler, forced_logits
from utils.engine.sampling import apply_count_penalties, apply_logit_bias, bias_tensors, sample, token_logprobs

QUESTION = "What is 3 plus 4?"
LONG = dict(max_new_tokens=12, ignore_eos=True)  # long enough for the demo to repeat itself


# ---------------------------------------------------------------- the formulas, on hand-made logits

def test_presence_and_frequency_penalties_are_openais_formulas() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    out = apply_count_penalties(logits, counts, presence=0.5, frequency=0.25)
    # score - count * frequency - (count > 0) * presence
    assert out.tolist() == [[1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 4.0]]
    assert apply_count_penalties(logits, counts, presence=-2.0, frequency=0.0).tolist() == [[1.0, 4.0, 5.0, 4.0]]


def test_logit_bias_adds_and_minus_100_bans() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = apply_logit_bias(logits, *bias_tensors({0: 5.0, 2: -100.0, 3: -1.5}, logits.device))
    assert out.tolist() == [[6.0, 2.0, float("-inf"), 2.5]]
    assert int(sample(out, SamplingOptions(), None)[0]) == 0


def test_min_p_keeps_tokens_within_p_of_the_best() -> None:
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, SamplingOptions(temperature=1.0, min_p=0.6), gen)[0]) for _ in range(300)}
    assert drawn == {0, 1}  # 0.3 / 0.4 = 0.75 >= 0.6; 0.2 / 0.4 = 0.5 < 0.6
    drawn = {int(sample(logits, SamplingOptions(temperature=1.0), gen)[0]) for _ in range(300)}
    assert drawn == {0, 1, 2, 3}


def test_token_logprobs_are_the_log_softmax_and_sorted() -> None:
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 2.5]])
    entry = token_logprobs(logits, 3, 3)
    ref = torch.log_softmax(logits[0], -1)
    assert entry.id == 3 and math.isclose(entry.logprob, float(ref[3]), abs_tol=1e-6)
    assert [t for t, _ in entry.top] == [1, 4, 3]
    assert all(math.isclose(lp, float(ref[t]), abs_tol=1e-6) for t, lp in entry.top)
    assert token_logprobs(logits, 0, 0).top == []


# ---------------------------------------------------------------- end to end on the demo model

def forced(model, ids: list[int], **gen) -> torch.Tensor:
    """Teacher-forced logits after the question's prompt and each of `ids` but the last."""
    prompt = model.prepare_chat(QUESTION, **gen)
    return forced_logits(model.parts.thinker, prompt.embeds, ids[:-1], prompt.opts)


def test_logprobs_are_the_models_distribution(demo_model) -> None:
    plain = demo_model.answer(QUESTION, **LONG)
    ans = demo_model.answer(QUESTION, logprobs=3, **LONG)
    assert ans.token_ids == plain.token_ids  # asking for logprobs does not change a greedy answer
    assert len(ans.logprobs) == len(ans.token_ids)
    ref = torch.log_softmax(forced(demo_model, ans.token_ids, **LONG), -1)
    for i, (tid, entry) in enumerate(zip(ans.token_ids, ans.logprobs)):
        assert abs(entry["logprob"] - float(ref[i, tid])) < 1e-5, i
        top = entry["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["logprob"] == entry["logprob"]  # greedy: the chosen token is the most likely
        for item in (entry, *top):
            assert item["bytes"] == list(item["token"].encode("utf-8"))
    # the tokens spell the answer; the end-of-sequence ids (ignore_eos) show as their piece, which the text lacks
    assert {e["token"] for t, e in zip(ans.token_ids, ans.logprobs) if t == EOS_ID} == {"</s>"}
    assert "".join(e["token"] for t, e in zip(ans.token_ids, ans.logprobs) if t != EOS_ID).lstrip() == ans.text
    assert ans.to_json()["logprobs"] == {"content": ans.logprobs} and "logprobs" not in plain.to_json()


def test_logprobs_of_a_sampled_row_are_before_temperature(demo_model) -> None:
    ans = demo_model.answer(QUESTION, logprobs=0, temperature=1.7, seed=3, **LONG)
    ref = torch.log_softmax(forced(demo_model, ans.token_ids, **LONG), -1)
    assert all(abs(e["logprob"] - float(ref[i, t])) < 1e-5 and e["top_logprobs"] == []
               for i, (t, e) in enumerate(zip(ans.token_ids, ans.logprobs)))


def test_logit_bias_bans_a_token_of_the_greedy_answer(demo_model) -> None:
    plain = demo_model.answer(QUESTION, **LONG).token_ids
    banned = 466  # "7"
    assert banned in plain
    ids = demo_model.answer(QUESTION, logit_bias={banned: -100}, **LONG).token_ids
    assert banned not in ids and len(ids) == len(plain)
    assert demo_model.answer(QUESTION, logit_bias={"300": 100}, max_new_tokens=3).token_ids == [300, 300, 300]


@pytest.mark.parametrize("presence,frequency", [(2.0, 0.0), (0.0, 1.5), (0.0, -2.0)])
def test_count_penalties_change_the_greedy_answer_by_their_formula(demo_model, presence, frequency) -> None:
    plain = demo_model.answer(QUESTION, **LONG).token_ids
    ids = demo_model.answer(QUESTION, presence_penalty=presence, frequency_penalty=frequency, **LONG).token_ids
    assert ids != plain
    logits = forced(demo_model, ids, **LONG)
    for i, tid in enumerate(ids):  # each pick is the argmax of the scores penalised by the answer so far
        counts = torch.bincount(torch.tensor(ids[:i], dtype=torch.long), minlength=logits.shape[1]).float()
        scores = logits[i] - counts * frequency - (counts > 0).float() * presence
        assert int(scores.argmax()) == tid, i


def test_min_p_one_is_greedy(demo_model) -> None:
    plain = demo_model.answer(QUESTION, **LONG).token_ids
    sampled = demo_model.answer(QUESTION, temperature=1.0, seed=7, **LONG).token_ids
    assert sampled != plain
    assert demo_model.answer(QUESTION, temperature=1.0, seed=7, min_p=1.0, **LONG).token_ids == plain


@pytest.mark.parametrize("mode", [{}, {"decode_kernel": "torch"}, {"decode_attention": "reference"}],
                         ids=["c-step", "torch-step", "reference"])
def test_n_choices_share_one_prefill_and_are_seeded_seed_plus_i(demo_model, monkeypatch, mode) -> None:
    """The first choice's prefill is copied to the others' slots (cache columns, or the reference mode's
    attention outputs): each choice then decodes exactly as the request alone with seed + i."""
    calls = []
    prefill = generation.Slots.prefill
    monkeypatch.setattr(generation.Slots, "prefill", lambda self, *a, **k: calls.append(1) or prefill(self, *a, **k))
    gen = dict(temperature=2.0, seed=3, logprobs=1, **LONG, **mode)
    choices = demo_model.answer_choices(QUESTION, n=3, **gen)
    assert len(calls) == 1
    calls.clear()
    alone = [demo_model.answer(QUESTION, **{**gen, "seed": 3 + i}) for i in range(3)]
    assert [c.token_ids for c in choices] == [a.token_ids for a in alone]
    for c, a in zip(choices, alone):  # the torch step's numbers vary with the batch at float rounding
        assert [e["token"] for e in c.logprobs] == [e["token"] for e in a.logprobs]
        assert all(abs(x["logprob"] - y["logprob"]) < 1e-5 for x, y in zip(c.logprobs, a.logprobs))
    assert len({tuple(c.token_ids) for c in choices}) > 1


def test_the_greedy_fast_path_stays_for_rows_that_ask_nothing_new(demo_model, monkeypatch) -> None:
    """A batch of plain greedy rows steps with the ids-only path (the C step's argmax / the int8 screen); a row
    asking for logprobs makes the step return logits, and the plain row's ids stay the same."""
    model = demo_model
    paths: list[bool] = []
    step = generation.Slots.step
    monkeypatch.setattr(generation.Slots, "step", lambda self, inputs, greedy=False: paths.append(greedy) or
                        step(self, inputs, greedy))

    def run(asks: dict) -> list[list[int]]:
        prompts = [model.prepare_chat(QUESTION, max_new_tokens=6, ignore_eos=True),
                   model.prepare_chat(QUESTION, max_new_tokens=6, ignore_eos=True, **asks)]
        engine = Scheduler(model.parts.thinker, 2, 64, prompts[0].opts)
        outs: list[list[int]] = [[], []]
        for p, out in zip(prompts, outs):
            engine.add(p, out.append, lambda reason, error: None)
        engine.run()
        return outs

    plain = run({})
    assert paths and all(paths)
    paths.clear()
    mixed = run({"logprobs": 2})
    assert paths and not any(paths)
    assert mixed == plain


def test_cli_json_logprobs() -> None:
    out = one_json(run_demo("--text", QUESTION, "--json", "--logprobs", "2"))
    content = out["logprobs"]["content"]
    assert len(content) == out["generated_tokens"] and [len(e["top_logprobs"]) for e in content] == [2] * len(content)
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    banned = one_json(run_demo("--text", QUESTION, "--json", "--logit_bias", json.dumps({"466": -100})))
    assert 466 in out["token_ids"] and 466 not in banned["token_ids"]


def test_cli_n_answers_are_the_apis(demo_model) -> None:
    r = run_demo("--text", QUESTION, "--n", "3", "--json", "--temperature", "2", "--seed", "3", "--max_new_tokens",
                 "12", "--ignore_eos")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    want = demo_model.answer_choices(QUESTION, n=3, temperature=2.0, seed=3, **LONG)
    assert [(g["index"], g["token_ids"]) for g in got] == [(i, a.token_ids) for i, a in enumerate(want)]
    r = run_demo("--n", "2")  # not a one-shot question
    assert r.returncode == 2 and "--n needs a one-shot question" in r.stderr
