"""Picking the next id from a decode step's output: temperature / top-k / top-p sampling, the repetition
penalty, and the int8-screened exact greedy argmax (utils.weights.quant.GreedyHead) that plain greedy decoding
on the CPU uses (the same argmax for a quarter of the vocabulary projection's memory traffic)."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from models.thinker import ThinkerLM
from utils.base.options import SamplingOptions
from utils.weights.quant import GreedyHead, greedy_head_supported


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of already seen ids by `penalty`, multiply negative ones.
    `seen`: boolean (B, V), True where the id occurred in the row's prompt or answer so far."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from last-position logits (B, V): argmax at temperature 0, else top-k/top-p sampling."""
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
