"""Autoregressive decoding for the Thinker and the Talker: one KV-cached engine (`Decoder`: prefill, then one
position per step), sampling, and the Thinker's generate loops (`generate`: one sequence, streamed;
`generate_batch`: several prompts at once, left-padded). utils.engine.speech drives the same Decoder for the Talker.

Decode attention: "causal" (the default) attends to every earlier position, as the models were trained, so
the ids equal a full causal forward at every step. "reference" reproduces a defect of the reference μOmni
implementation, kept only for comparing with old outputs: its KV-cached decode let every generated token
attend to the first position of the sequence only (its incremental mask is `ones(1, S).tril()`, spec §4).

Speed: the KV cache, the masks and the per-row rotary rows are allocated once per generation and only
sliced afterwards; the one host sync per step is reading the sampled ids. In reference mode every decode
step of a row attends to one fixed key, and softmax over a single score is exactly 1, so the attention
sub-layer returns that key's value whatever the query: its output is computed once after the prefill and
reused (bit-identical to running the masked attention each step, and it skips q/k/v, RoPE and the cache
writes that nothing would ever read). Greedy steps on CPU read the vocabulary projection as int8 and rescore
the few candidates exactly (utils.weights.quant.GreedyHead): the same argmax for a quarter of the memory traffic.
The C step (utils.engine.native.step) runs the prefill and every step of a float32 or int8 thinker on the CPU in
one call each, for the whole batch. The torch step runs on (B, d) rows with q/k/v and gate/up fused into one
matmul each (models.layers.Block.decode; the fused weight copies and per-block plans are refreshed at a
Decoder's first torch step, so a weight change between generations is seen).
"""
from __future__ import annotations

import time
import weakref
from typing import Any, Iterator

import torch
from torch import nn

from models.layers import CausalStack, refresh_fused
from models.thinker import ThinkerLM
from utils.base.defaults import DECODE_ATTENTION, EOS_ID
from utils.base.options import SamplingOptions
from utils.engine.native.step import NativeSession, native_model
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


def check_budget(model: CausalStack, prompt_len: int, max_new_tokens: int, opts: SamplingOptions) -> None:
    """Programming errors (the API validates user input earlier): bad mode, or a prompt that cannot fit."""
    if opts.decode_attention not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention {opts.decode_attention!r}: use one of {', '.join(DECODE_ATTENTION)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens {max_new_tokens}: must be >= 0")
    if prompt_len < 1:
        raise ValueError("generation needs a prompt of at least one position")
    if prompt_len + max_new_tokens > model.rotary.max_len:
        raise ValueError(f"prompt of {prompt_len} positions + max_new_tokens {max_new_tokens} exceeds the "
                         f"context of {model.rotary.max_len}")


class Decoder:
    """KV-cached decoding of B prompts, left-padded to a common length T (row b starts at column pads[b]), for
    any `CausalStack` (the Thinker: token ids in, logits out; the Talker: code frames in, a pair of logits out).

    Row b's positions count from 0 at its first real column, so its numbers equal those of decoding it
    alone. Prefill mask: causal and only real keys (a padding query sees itself, so no softmax row is
    empty); decode mask: the real keys so far ("causal"), or the row's first real key ("reference", done as
    the constant attention output described in the module docstring). All of it is built here, once.
    """

    def __init__(self, model: CausalStack, embeds: torch.Tensor, pads: list[int] | None, opts: SamplingOptions,
                 max_new: list[int] | None = None, screen: GreedyHead | None = None) -> None:
        """`max_new`: per-row token budgets (default: opts.max_new_tokens for every row); the cache has room
        for the largest, and each row's prompt plus its own budget must fit the context. `screen`: the
        int8-screened greedy argmax to use (`greedy_screen`). The decode steps run in C where
        `opts.decode_kernel` and the model allow (utils.engine.native.step); `kernel` says which path and why."""
        B, T, _ = embeds.shape
        pads = list(pads) if pads is not None else [0] * B
        if len(pads) != B or not all(0 <= p < T for p in pads):
            raise ValueError(f"pads {pads}: need one pad count in 0..{T - 1} per row")
        max_new = list(max_new) if max_new is not None else [opts.max_new_tokens] * B
        if len(max_new) != B:
            raise ValueError(f"max_new {max_new}: need one budget per row")
        for p, n in zip(pads, max_new):
            check_budget(model, T - p, n, opts)
        dev = embeds.device
        self.model, self.embeds = model, embeds
        self.fused_fresh = False  # the torch step's fused weight copies are refreshed on its first use
        self.reference = opts.decode_attention == "reference"
        total = T + max(max_new)
        self.cache = model.new_cache(B, total)
        self.pos = T  # the cache column the next token goes to
        self.anchors = torch.tensor(pads, dtype=torch.long, device=dev)
        self.padded = any(pads)
        self.attn_out: list[torch.Tensor] | None = None
        self.prefill_positions = self.prefill_mask = self.key_mask = self.rope_rows = None
        if self.padded:
            cols = torch.arange(total, device=dev)
            # (B, total); clamped at the table's end for columns a row with a smaller budget never uses
            positions = (cols[None] - self.anchors[:, None]).clamp(0, model.rotary.max_len - 1)
            real = cols[None] >= self.anchors[:, None]  # (B, total)
            eye = torch.eye(T, dtype=torch.bool, device=dev)
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            self.prefill_positions = positions[:, :T]
            self.prefill_mask = (causal & (real[:, None, :T] | eye))[:, None]  # (B, 1, T, T)
            if not self.reference:
                self.key_mask = real[:, None, None, :]  # (B, 1, 1, total), sliced per step
                rot = model.rotary
                self.rope_rows = (rot.cos[positions][:, :, None], rot.rot_sin[positions][:, :, None])
        self.screen = screen
        native, self.kernel = native_model(model, opts.decode_kernel, self.reference, screen)
        self.native = NativeSession(native, self.cache.k, self.cache.v, T) if native is not None else None
        self.pads = pads

    def prefill(self, greedy: bool = False) -> Any:
        """Logits after the prompts ((B, V); the model's `head` decides); fills the cache (and, in reference
        mode, the attention constants). With the C step each row's real positions are run on their own (so
        a row's numbers do not depend on its batch); `greedy` then returns the greedy ids (B,) instead."""
        if self.native is not None:
            out = [self.native.prefill(self.embeds[b, p:], b, p, greedy).clone() for b, p in enumerate(self.pads)]
            self.embeds = None
            return torch.cat(out)
        logits = self.model.head(self.model.hidden(self.embeds, 0, self.cache, self.prefill_positions,
                                                   self.prefill_mask, last_only=True))
        if self.reference:
            self.attn_out = self.model.reference_attention(self.cache, self.anchors)
        self.embeds = None  # not needed any more
        return logits

    def native_step(self, tokens: torch.Tensor, greedy: bool) -> torch.Tensor:
        """The C step (when `native`): greedy ids (B,), or logits (B, V), after appending `tokens` (B,) at the
        next column; views of buffers that the next step overwrites."""
        pos = self.pos
        self.pos += 1
        return self.native.step(tokens, pos, self.anchors if self.padded else None, greedy)

    def step(self, tokens: torch.Tensor, hidden: bool = False) -> Any:
        """Logits after appending `tokens` (what the model's `embed_step` takes, one entry per row) at the next
        column (`hidden`: the normed hidden states (B, d) instead, from the torch step)."""
        if self.native is not None and not hidden:
            return self.native_step(tokens, greedy=False).clone()
        if not self.fused_fresh:
            refresh_fused(self.model)
            self.fused_fresh = True
        pos = self.pos
        self.pos += 1
        x = self.model.embed_step(tokens)
        if self.reference:
            h = self.model.decode_hidden(x, pos, self.cache, None, None, None, self.attn_out)
        else:
            if self.rope_rows is not None:
                cos, rot_sin = self.rope_rows[0][:, pos], self.rope_rows[1][:, pos]
            else:
                rot = self.model.rotary
                cos, rot_sin = rot.cos[pos:pos + 1], rot.rot_sin[pos:pos + 1]
            mask = self.key_mask[..., :pos + 1] if self.key_mask is not None else None
            h = self.model.decode_hidden(x, pos, self.cache, cos, rot_sin, mask)
        return h if hidden else self.model.head(h)


SCREEN_MIN_VOCAB = 1024
SCREEN_MIN_TOKENS = 32  # building the int8 copy costs about as much as this many float32 steps save
_GREEDY_HEADS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, GreedyHead]]" = weakref.WeakKeyDictionary()


def greedy_screen(model: ThinkerLM, opts: SamplingOptions) -> GreedyHead | None:
    """The int8 screen plain greedy decoding (no repetition penalty) uses with `opts`, if any."""
    if opts.temperature > 0 or opts.repetition_penalty != 1.0 or not opts.fast_greedy:
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


class Picker:
    """Turns the decoder's output into the next ids: sampling options, repetition penalty, and for plain
    greedy float32 decoding on CPU the int8-screened exact argmax (the decoder's `screen`); greedy C steps
    return the ids themselves."""

    def __init__(self, model: ThinkerLM, dec: Decoder, opts: SamplingOptions, prompts: list[list[int]],
                 device: torch.device) -> None:
        self.model, self.dec, self.opts = model, dec, opts
        self.generator = _generator(opts, device)
        self.penalty = opts.repetition_penalty != 1.0
        self.seen = _seen_mask(prompts, len(prompts), model.cfg.vocab_size, device) if self.penalty else None
        self.rows = torch.arange(len(prompts), device=device)
        self.greedy = opts.temperature <= 0 and not self.penalty
        self.screen = dec.screen

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.penalty:
            logits = apply_repetition_penalty(logits, self.seen, self.opts.repetition_penalty)
        return sample(logits, self.opts, self.generator)

    def first(self) -> torch.Tensor:
        if self.dec.native is not None and self.greedy:
            return self.dec.prefill(greedy=True)
        return self.pick(self.dec.prefill())

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed `tokens` (B,) and return the ids that follow them."""
        if self.penalty:
            self.seen[self.rows, tokens] = True
        if self.dec.native is not None:
            out = self.dec.native_step(tokens, self.greedy)
            return out if self.greedy else self.pick(out)
        if self.screen is None:
            return self.pick(self.dec.step(tokens))
        return self.screen.argmax(self.dec.step(tokens, hidden=True), self._full_argmax)

    def _full_argmax(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.head(h).argmax(-1)


def _seen_mask(prompts: list[list[int]], batch: int, vocab: int, device: torch.device) -> torch.Tensor:
    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    for b, ids in enumerate(prompts):
        ids = [i for i in ids if 0 <= i < vocab]
        if ids:
            seen[b, torch.tensor(ids, device=device)] = True
    return seen


def _generator(opts: SamplingOptions, device: torch.device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(opts.seed) if opts.seed is not None else None


def generate(model: ThinkerLM, embeds: torch.Tensor, opts: SamplingOptions,
             prompt_ids: list[int] | None = None, info: dict[str, Any] | None = None) -> Iterator[int]:
    """Yield new token ids for one sequence (batch 1) until EOS or `max_new_tokens`. EOS is not yielded.
    `info`, if given, receives "decode_kernel": the decode path taken (see Decoder.kernel)."""
    if opts.max_new_tokens <= 0:
        return
    with torch.inference_mode():
        dec = Decoder(model, embeds, None, opts, screen=greedy_screen(model, opts))
        if info is not None:
            info["decode_kernel"] = dec.kernel
        picker = Picker(model, dec, opts, [prompt_ids or []], embeds.device)
        token = picker.first()
        for step in range(opts.max_new_tokens):
            tid = int(token)  # the one sync per step: the host needs the id to stop and to stream
            if tid == EOS_ID and not opts.ignore_eos:
                return
            yield tid
            if step + 1 == opts.max_new_tokens:
                return
            token = picker.next(token)


def left_pad(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Stack (T_i, d) prompts into (B, max T, d), zero padding on the left; returns it and each row's pad."""
    T = max(e.shape[0] for e in embeds)
    out = embeds[0].new_zeros(len(embeds), T, embeds[0].shape[-1])
    pads = []
    for b, e in enumerate(embeds):
        out[b, T - e.shape[0]:] = e
        pads.append(T - e.shape[0])
    return out, pads


def generate_batch(model: ThinkerLM, embeds: list[torch.Tensor], prompt_ids: list[list[int]] | None,
                   opts: SamplingOptions, max_new_tokens: list[int] | None = None,
                   step_times: list[float] | None = None, info: dict[str, Any] | None = None
                   ) -> list[list[int]]:
    """New token ids for several prompts at once (each embeds[i] is (T_i, d)), EOS not included.

    Prompts are left-padded to a common length; each row's positions and masks make its greedy answer equal
    to `generate` on that prompt alone. A row stops contributing once it emits EOS or reaches its budget
    (`max_new_tokens[i]`, default `opts.max_new_tokens`); the loop ends when every row has finished.
    Sampling uses one generator for the whole batch, so sampled answers depend on the batch they are in
    (greedy ones do not). `step_times`, if given, receives time.perf_counter() as each step's ids arrive
    (entry i: when every row's i-th token was known). `info` as for `generate`.
    """
    if not embeds:
        return []
    if any(e.ndim != 2 for e in embeds):
        raise ValueError("generate_batch: each prompt's embeddings must be (T_i, d)")
    B = len(embeds)
    prompt_ids = prompt_ids if prompt_ids is not None else [[] for _ in range(B)]
    if len(prompt_ids) != B:
        raise ValueError(f"generate_batch: {B} prompts but {len(prompt_ids)} prompt id lists")
    budgets = list(max_new_tokens) if max_new_tokens is not None else [opts.max_new_tokens] * B
    if len(budgets) != B:
        raise ValueError(f"generate_batch: {B} prompts but {len(budgets)} max_new_tokens")
    out: list[list[int]] = [[] for _ in range(B)]
    done = [n <= 0 for n in budgets]
    if all(done):
        return out
    device = embeds[0].device
    with torch.inference_mode():
        x, pads = left_pad(embeds)
        dec = Decoder(model, x, pads, opts, [max(n, 0) for n in budgets], screen=greedy_screen(model, opts))
        if info is not None:
            info["decode_kernel"] = dec.kernel
        picker = Picker(model, dec, opts, prompt_ids, device)
        tokens = picker.first()
        while True:
            ids = tokens.tolist()  # the one sync per step
            if step_times is not None:
                step_times.append(time.perf_counter())
            for b, tid in enumerate(ids):
                if done[b]:
                    continue
                if tid == EOS_ID and not opts.ignore_eos:
                    done[b] = True
                    continue
                out[b].append(tid)
                done[b] = len(out[b]) >= budgets[b]
            if all(done):
                break
            tokens = picker.next(tokens)
    return out
