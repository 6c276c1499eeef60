"""Picking the next id from a decode step's output: the score adjustments (repetition, presence and frequency
penalties, logit bias), temperature / top-k / top-p / min-p sampling, the log-probabilities a row may ask for,
and the int8-screened exact greedy argmax (utils.weights.quant.GreedyHead) that plain greedy decoding on the CPU
uses (the same argmax for a quarter of the vocabulary projection's memory traffic)."""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from models.thinker import ThinkerLM
from utils.base.options import SamplingOptions
from utils.weights.quant import GreedyHead, greedy_head_supported


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of already seen ids by `penalty`, multiply negative ones.
    `seen`: boolean (B, V), True where the id occurred in the row's prompt or answer so far."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def apply_count_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
                          ) -> torch.Tensor:
    """OpenAI's formulas: score[j] - counts[j] * frequency - (counts[j] > 0) * presence, where `counts` (B, V)
    holds how often each id occurred in the row's answer so far (the prompt is not counted)."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


BAN = -100.0  # a logit_bias of -100 bans the token (its score becomes -inf), as OpenAI documents it


def bias_tensors(bias: dict[int, float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A logit_bias as (ids, values) for `apply_logit_bias`, built once per row; -100 becomes -inf."""
    ids = torch.tensor(list(bias), dtype=torch.long, device=device)
    values = torch.tensor([float("-inf") if b <= BAN else b for b in bias.values()], device=device)
    return ids, values


def apply_logit_bias(logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Add `values` to the scores of `ids` (a row's logits (1, V)); -inf values ban their ids."""
    return logits.index_add(-1, ids, values.to(logits.dtype).expand(logits.shape[0], -1))


@dataclass
class TokenLogprobs:
    """One generated token's log-probability under the model, and the `top` most likely (id, logprob) pairs at
    its position, most likely first."""
    id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tid: int, k: int) -> TokenLogprobs:
    """The log_softmax of a row's raw logits (1, V) at `tid`, and its `k` best ids: one host read, paid only
    by the rows that ask."""
    lp = torch.log_softmax(logits[0].float(), -1)
    top = lp.topk(k) if k else None
    values = (torch.cat([lp[tid:tid + 1], top.values]) if top is not None else lp[tid:tid + 1]).tolist()
    ids = top.indices.tolist() if top is not None else []
    return TokenLogprobs(tid, values[0], list(zip(ids, values[1:])))


def sample(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from last-position logits (B, V): argmax at temperature 0, else temperature, then top-k,
    top-p and min-p, then a draw from `generator`."""
    if opts.temperature <= 0:
        return logits.argmax(-1)
    # float64, relative to each row's best logit and with +inf (a penalty of 1e-300 makes one) clamped: any
    # temperature > 0, even 1e-300, then gives finite scaled logits whose best one is 0 (probability > 0).
    logits = logits.double().nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float64).max)
    logits = (logits - logits.amax(-1, keepdim=True)) / opts.temperature
    if opts.top_k > 0:
        kth = logits.topk(min(opts.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= opts.top_p  # keep the smallest prefix reaching top_p
        drop[..., 0] = False  # the best id always stays, however small top_p is (1e-300 is 0 in any float)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if opts.min_p > 0.0:  # the best scaled logit is 0: p / p_max = exp(logit); the best id always stays
        logits = logits.masked_fill(logits < math.log(opts.min_p), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


SCREEN_MIN_VOCAB = 1024
SCREEN_MIN_TOKENS = 32  # building the int8 copy costs about as much as this many float32 steps save
_GREEDY_HEADS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, GreedyHead]]" = weakref.WeakKeyDictionary()


def greedy_screen(model: ThinkerLM, opts: SamplingOptions) -> GreedyHead | None:
    """The int8 screen a one-off generation with `opts` uses for its plain greedy rows, if any: built only when
    the budget is long enough to repay it (a cached one is used either way)."""
    if not opts.greedy or not opts.fast_greedy:
        return None
    return greedy_head(model, build=opts.max_new_tokens >= SCREEN_MIN_TOKENS)


def greedy_head(model: ThinkerLM, build: bool = True) -> GreedyHead | None:
    """The int8-screened exact argmax for `model.lm_head` (float weights on CPU), built once per weight
    version (only if `build`; a cached one is returned either way)."""
    lin = model.lm_head
    if type(lin) is not nn.Linear or not greedy_head_supported(lin.weight, lin.bias):
        return None
    if lin.weight.shape[0] < SCREEN_MIN_VOCAB:
        return None  # a small projection is cheap to compute in full
    w = lin.weight
    if w.is_inference():
        return None  # no version counter: an in-place update could not be noticed
    key = (w.data_ptr(), w._version, tuple(w.shape))
    hit = _GREEDY_HEADS.get(lin)
    if hit is None or hit[0] != key:
        if not build:
            return None
        with torch.inference_mode():
            hit = (key, GreedyHead(w))
        _GREEDY_HEADS[lin] = hit
    return hit[1]
