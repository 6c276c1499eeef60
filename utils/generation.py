"""Autoregressive decoding for the Thinker: prefill, one-token decode steps, sampling, and the generate loop.

Decode attention: the reference μOmni implementation's KV-cached decode lets every generated token attend to
the first position of the sequence only (its incremental mask is `ones(1, S).tril()`), and the μOmni expected
outputs were produced that way. `decode_attention="reference"` reproduces it bit for bit; "causal" attends to
every earlier position, as the models were trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from models.layers import KVCache
from models.thinker import ThinkerLM

EOS_ID = 2
DECODE_ATTENTION = ("reference", "causal")


@dataclass
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    decode_attention: str = "reference"


def first_key_mask(max_len: int, anchors: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, max_len) boolean mask that is True only at each row's first real position."""
    mask = torch.zeros(anchors.shape[0], 1, 1, max_len, dtype=torch.bool, device=anchors.device)
    mask[torch.arange(anchors.shape[0]), 0, 0, anchors] = True
    return mask


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of already seen ids by `penalty`, multiply negative ones."""
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def sample(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from last-position logits (B, V): argmax at temperature 0, else top-k/top-p sampling."""
    if opts.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / opts.temperature
    if opts.top_k > 0:
        kth = logits.topk(min(opts.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= opts.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: ThinkerLM, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the whole prompt once, filling the cache; returns the last position's logits (B, V)."""
    return model(embeds, 0, cache, last_only=True)[:, -1]


def decode_one_token(model: ThinkerLM, token: torch.Tensor, pos: int, cache: KVCache,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """Logits (B, V) for one new token per row placed at position `pos`."""
    return model(model.tok_emb(token[:, None]), pos, cache, mask=mask)[:, -1]


def generate(model: ThinkerLM, embeds: torch.Tensor, opts: SamplingOptions,
             prompt_ids: list[int] | None = None) -> Iterator[int]:
    """Yield new token ids for one sequence (batch 1) until EOS or `max_new_tokens`. EOS is not yielded."""
    total = embeds.shape[1] + opts.max_new_tokens
    cache = model.new_cache(1, total)
    generator = None
    if opts.seed is not None:
        generator = torch.Generator(device=embeds.device).manual_seed(opts.seed)
    decode_mask = None
    if opts.decode_attention == "reference":
        decode_mask = first_key_mask(total, torch.zeros(1, dtype=torch.long, device=embeds.device))
    seen = torch.zeros(1, opts.max_new_tokens + len(prompt_ids or []), dtype=torch.long, device=embeds.device)
    n_seen = 0
    if prompt_ids:
        seen[0, :len(prompt_ids)] = torch.tensor(prompt_ids)
        n_seen = len(prompt_ids)
    with torch.inference_mode():
        logits = prefill(model, embeds, cache)
        pos = embeds.shape[1]
        for step in range(opts.max_new_tokens):
            if opts.repetition_penalty != 1.0 and n_seen:
                logits = apply_repetition_penalty(logits, seen[:, :n_seen], opts.repetition_penalty)
            token = sample(logits, opts, generator)
            tid = int(token)  # the one sync per step: the host needs the id to stop and to stream
            if tid == EOS_ID and not opts.ignore_eos:
                return
            yield tid
            seen[0, n_seen] = token
            n_seen += 1
            if step + 1 == opts.max_new_tokens:
                return
            mask = decode_mask[..., :pos + 1] if decode_mask is not None else None
            logits = decode_one_token(model, token, pos, cache, mask)
            pos += 1
