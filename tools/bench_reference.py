"""What bench.py measures below the public API: the μOmni reference's decode loop (the baseline its speed-up
rows compare with), the bytes a decode step reads, and the top-1 agreement of a quantized thinker with the
float32 one on teacher-forced decode steps. bench.py times everything else through omni.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.layers import apply_rotary  # noqa: E402
from models.thinker import ThinkerLM  # noqa: E402
from utils.base.options import SamplingOptions  # noqa: E402
from utils.engine.generation import forced_logits, generate  # noqa: E402
from utils.engine.sampling import SCREEN_MIN_VOCAB  # noqa: E402


def baseline_generate(model, embeds, n_new: int, causal: bool = False) -> list[int]:
    """Greedy decode written the way the μOmni reference wrote it, on the project's modules: the KV cache
    grows by torch.cat every step, every tensor is checked for NaN/Inf with .any() (a host sync each), the
    causal / incremental masks are rebuilt every step, and K/V are repeat_interleave'd to the query heads.
    Reference decode semantics (each new token sees the first position only: mask ones(1, S).tril()), or
    with `causal` every earlier position (mask ones(1, S))."""
    def check(*tensors):
        for t in tensors:
            if torch.isnan(t).any() or torch.isinf(t).any():
                raise RuntimeError("NaN/Inf")

    L = len(model.blocks)
    keys: list = [None] * L
    values: list = [None] * L

    def forward(x, start):
        B, T, _ = x.shape
        S = start + T
        mask = torch.ones(T, S, device=x.device).tril(diagonal=start).bool()  # rebuilt every call
        cos, sin = model.rotary.tables(start, T, None)
        for i, block in enumerate(model.blocks):
            attn = block.attn
            h = block.norm1(x)
            check(h)
            q = attn.q(h).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
            k = attn.k(h).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
            v = attn.v(h).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            check(q, k, v)
            keys[i] = k if keys[i] is None else torch.cat([keys[i], k], dim=2)
            values[i] = v if values[i] is None else torch.cat([values[i], v], dim=2)
            group = attn.n_heads // attn.n_kv_heads
            kk = keys[i].repeat_interleave(group, dim=1)
            vv = values[i].repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
            out = attn.o(out.transpose(1, 2).reshape(B, T, -1))
            check(out)
            x = x + out
            x = x + (block.moe if hasattr(block, "moe") else block.mlp)(block.norm2(x))
            check(x)
        logits = model.lm_head(model.norm(x[:, -1]))
        check(logits)
        return logits

    out: list[int] = []
    with torch.no_grad():
        logits = forward(embeds, 0)
        pos = embeds.shape[1]
        for step in range(n_new):
            token = logits.argmax(-1)
            out.append(int(token))
            if step + 1 == n_new:
                break
            x = model.tok_emb(token[:, None])
            # the reference's incremental mask: ones(1, S).tril() -> only the first key is visible
            S = pos + 1
            cos, sin = model.rotary.tables(pos, 1, None)
            B = 1
            for i, block in enumerate(model.blocks):
                attn = block.attn
                h = block.norm1(x)
                check(h)
                q = attn.q(h).view(B, 1, attn.n_heads, attn.head_dim).transpose(1, 2)
                k = attn.k(h).view(B, 1, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
                v = attn.v(h).view(B, 1, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
                check(q, k, v)
                keys[i] = torch.cat([keys[i], k], dim=2)
                values[i] = torch.cat([values[i], v], dim=2)
                group = attn.n_heads // attn.n_kv_heads
                kk = keys[i].repeat_interleave(group, dim=1)
                vv = values[i].repeat_interleave(group, dim=1)
                mask = torch.ones(1, S, device=x.device)
                mask = (mask if causal else mask.tril()).bool()
                o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
                o = attn.o(o.transpose(1, 2).reshape(B, 1, -1))
                check(o)
                x = x + o
                x = x + (block.moe if hasattr(block, "moe") else block.mlp)(block.norm2(x))
                check(x)
            logits = model.lm_head(model.norm(x[:, -1]))
            check(logits)
            pos += 1
    return out


def baseline_rate(thinker: ThinkerLM, prompt: list[int], n_new: int, causal: bool, reps: int) -> float:
    """Decode tokens/s of `baseline_generate` (tokens after the first / time after the first: the run with one
    token, prefill and first token only, is subtracted), median of `reps` after a warm-up."""
    with torch.inference_mode():
        x = thinker.tok_emb(torch.tensor(prompt))[None]
    rates = []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        baseline_generate(thinker, x, 1, causal)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        baseline_generate(thinker, x, n_new, causal)
        if r:
            rates.append((n_new - 1) / (time.perf_counter() - t0 - t_first))
    return statistics.median(rates)


def decode_bytes(thinker: ThinkerLM, batch: int, context: float) -> float:
    """Bytes one greedy decode step reads per generated token: every block tensor (weights as stored: float,
    int8 or packed int4, plus scales) and the final norm, the vocabulary projection (its int8 screen and the
    screen's per-row float32 scales where greedy float decoding uses one, not the few candidate rows it
    rescores; else the head's own tensors, scales included), the embedding row, and each row's K and V cache
    up to `context` positions (all layers, the KV heads, in the embedding's dtype, as KVCache stores them). The
    weights are read once per step, so they are shared by the `batch` rows. MoE experts are all counted (an
    upper bound)."""
    blocks = sum(t.numel() * t.element_size() for t in (*thinker.blocks.parameters(), *thinker.blocks.buffers()))
    blocks += sum(t.numel() * t.element_size() for t in thinker.norm.parameters())
    head = thinker.lm_head
    if type(head) is torch.nn.Linear and thinker.cfg.vocab_size >= SCREEN_MIN_VOCAB:
        head_bytes = head.weight.numel() + head.weight.shape[0] * 4  # GreedyHead's int8 copy and its scales
    else:
        head_bytes = sum(t.numel() * t.element_size() for t in (*head.parameters(), *head.buffers()))
    emb = thinker.tok_emb.weight
    attn = thinker.blocks[0].attn
    kv = 2 * len(thinker.blocks) * attn.n_kv_heads * attn.head_dim * context * emb.element_size()
    return (blocks + head_bytes) / batch + kv + emb.shape[1] * emb.element_size()


def teacher_forced_agreement(reference: ThinkerLM, candidate: ThinkerLM, prompt: list[int], steps: int) -> float:
    """Top-1 agreement of `candidate` with `reference` over `steps` KV-cached decode steps fed the
    reference's greedy continuation of `prompt` (teacher forcing: one early difference does not spread)."""
    opts = SamplingOptions(max_new_tokens=steps, ignore_eos=True)

    def embed(model: ThinkerLM) -> torch.Tensor:
        with torch.inference_mode():
            return model.tok_emb(torch.tensor(prompt))[None]

    cont = list(generate(reference, embed(reference), opts))

    def top1(model: ThinkerLM) -> torch.Tensor:
        return forced_logits(model, embed(model)[0], cont[:-1], opts).float().argmax(-1)

    return float((top1(reference) == top1(candidate)).float().mean())
