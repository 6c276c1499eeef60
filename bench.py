#!/usr/bin/env python3
"""Speed benchmark of μOmni inference through the library's public functions (omni.load_model, utils.engine.generation).

    python bench.py                      # both models, float32 / bfloat16 / int8 / int4; several minutes
    python bench.py --quick              # a smoke run (short prompts, few tokens, few repeats)
    python bench.py --models demo --dtypes float32,int8 --json_out bench.json

Models: "tiny" = the real μOmni tiny configuration (Thinker: 4 layers, d 256, 4 heads, 2 KV heads, SwiGLU 1024,
vocab 32000, ctx 512; ViT d 128 x4; audio encoder d 192 x4; Talker d 192 x4 + RVQ + HiFi-GAN) with random
weights, written once as a trainers' checkpoint tree and loaded with omni.load_model; "demo" = the trained demo
model in checkpoints/demo (Thinker d 128, 4 layers, vocab 512). Each (model, dtype) runs in its own process.

Headline: greedy decoding with causal attention (the default), batch 1 and batch 8 (ragged prompts, left
padded), decode rate = tokens after the first / time after the first; prefill tokens/s and time to first
token; the bytes a decode step reads per token (weights, the int8 vocabulary screen or the head, the KV cache
at the mean position), the bandwidth bound that implies for the single-thread read bandwidth measured in the
same process, and the fraction of it reached. Reference-mode decode (the μOmni defect kept for comparison)
is a secondary row. Rates are also given per CPU-second of the process (one thread: robust against other
processes sharing the cores, which stretch wall time but not our CPU time). Quantized columns report top-1
agreement with float32 on teacher-forced decode steps. The table goes to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from utils.base.version import version_text

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

DTYPES = ("float32", "bfloat16", "int8", "int4")
MODELS = ("tiny", "demo")
DEMO = REPO / "checkpoints" / "demo"
SEED = 0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the random tiny tree (trainers' layout)

def write_tree(root: Path) -> None:
    """Random weights for every component of the μOmni tiny configuration, saved the way the trainers save
    them (component directories, configs/*.json); the demo's tokenizer stands in (its 512 pieces fit)."""
    import torch

    from models.audio import AudioEncoderConfig, AudioEncoderTiny
    from models.layers import BlockConfig
    from models.talker import RVQ, TalkerConfig, TalkerTiny
    from models.thinker import ThinkerConfig, ThinkerLM
    from models.vision import ViTConfig, ViTTiny
    from models.vocoder import HiFiGANConfig, HiFiGANGenerator

    torch.manual_seed(SEED)
    thinker = ThinkerLM(ThinkerConfig(vocab_size=32000, n_layers=4, ctx_len=512,
                                      block=BlockConfig(d_model=256, n_heads=4, n_kv_heads=2, d_ff=1024)))
    vision = ViTTiny(ViTConfig(d_model=128, n_layers=4, n_heads=2, d_ff=512, img_size=224))
    audio = AudioEncoderTiny(AudioEncoderConfig(d_model=192, n_layers=4, n_heads=3, d_ff=768, downsample=8))
    talker = TalkerTiny(TalkerConfig(codebook_size=128, n_layers=4,
                                     block=BlockConfig(d_model=192, n_heads=3, n_kv_heads=1, d_ff=768)))
    with torch.no_grad():  # a non-zero start slot, as a trained talker has
        talker.start.normal_(0, 0.02)
    vocoder = HiFiGANGenerator(HiFiGANConfig(upsample_initial_channel=128))
    proj_a, proj_v = torch.nn.Linear(192, 256), torch.nn.Linear(128, 256)

    def save(obj: dict, rel: str) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, root / rel)

    def config(name: str, cfg: dict) -> None:
        (root / "configs").mkdir(parents=True, exist_ok=True)
        (root / "configs" / f"{name}.json").write_text(json.dumps({**cfg, "save_dir": f"checkpoints/{name}"}))

    thinker_cfg = {"vocab_size": 32000, "d_model": 256, "n_layers": 4, "n_heads": 4, "kv_groups": 2, "d_ff": 1024,
                   "use_gqa": True, "use_swiglu": True, "rope_theta": 10000.0, "ctx_len": 512}
    save({"model": thinker.state_dict()}, "thinker_tiny/thinker.pt")
    shutil.copy(DEMO / "thinker_tiny" / "tokenizer.model", root / "thinker_tiny" / "tokenizer.model")
    config("thinker_tiny", thinker_cfg)
    save({"vit": vision.state_dict()}, "vision_tiny/vision.pt")
    config("vision_tiny", {"img_size": 224, "patch": 16, "d_model": 128, "n_layers": 4, "n_heads": 2, "d_ff": 512})
    save({"enc": audio.state_dict()}, "audio_enc_tiny/audio_enc.pt")
    config("audio_enc_tiny", {"d_model": 192, "n_layers": 4, "n_heads": 3, "d_ff": 768, "downsample_time": 8})
    save({"talker": talker.state_dict(), "rvq": RVQ().state_dict()}, "talker_tiny/talker.pt")
    config("talker_tiny", {"d_model": 192, "n_layers": 4, "n_heads": 3, "d_ff": 768, "rope_theta": 10000.0})
    save({"generator": vocoder.state_dict()}, "vocoder_tiny/vocoder.pt")
    config("vocoder_tiny", {"upsample_initial_channel": 128})
    save({"thinker": thinker.state_dict(), "proj_a": proj_a.state_dict(), "proj_v": proj_v.state_dict()},
         "omni_sft_tiny/omni.pt")
    config("omni_sft_tiny", {"thinker_ckpt": "checkpoints/thinker_tiny", "audio_ckpt": "checkpoints/audio_enc_tiny",
                             "vision_ckpt": "checkpoints/vision_tiny", "talker_ckpt": "checkpoints/talker_tiny",
                             "ctx_len": 512, "thinker": thinker_cfg})


# ---------------------------------------------------------------- the reference-style baseline

def baseline_generate(model, embeds, n_new: int, causal: bool = False) -> list[int]:
    """Greedy decode written the way the μOmni reference wrote it, on the project's modules: the KV cache
    grows by torch.cat every step, every tensor is checked for NaN/Inf with .any() (a host sync each), the
    causal / incremental masks are rebuilt every step, and K/V are repeat_interleave'd to the query heads.
    Reference decode semantics (each new token sees the first position only: mask ones(1, S).tril()), or
    with `causal` every earlier position (mask ones(1, S))."""
    import torch
    import torch.nn.functional as F

    from models.layers import apply_rotary

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


# ---------------------------------------------------------------- measurements

class Clock:
    """Wall and process-CPU time together."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def since(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def timed(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn` over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(nbytes: float, reps: int = 5) -> float:
    """Bytes per CPU-second one thread reads (a sum) from a buffer of `nbytes`, the size of what a decode step
    reads, so the caches help it as much as they help the step; the median of `reps` (CPU time, like the rates
    it bounds)."""
    import torch

    buf = torch.ones(max(1 << 16, int(nbytes) // 4))
    buf.sum()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        buf.sum()
        times.append(time.process_time() - t0)
    return buf.numel() * 4 / statistics.median(times)


def decode_rates_b1(thinker, embeds, opts, reps: int) -> dict[str, float]:
    """Batch-1 `generate`: decode tokens/s (wall and per CPU-second), time to first token; medians."""
    from utils.engine.generation import generate

    wall, cpu, ttft = [], [], []
    info: dict[str, Any] = {}
    for r in range(reps + 1):
        start = Clock()
        first = None
        n = 0
        for _ in generate(thinker, embeds, opts, None, info):
            n += 1
            if first is None:
                first = Clock()
                ttft.append(first.wall - start.wall)
        w, c = first.since()
        if r:  # the first run is a warm-up
            wall.append((n - 1) / w)
            cpu.append((n - 1) / c)
    return {"tok_s": statistics.median(wall), "tok_cpu_s": statistics.median(cpu),
            "ttft_ms": statistics.median(ttft[1:]) * 1e3, "kernel": info["decode_kernel"]}


def decode_rates_batch(thinker, embeds_list, opts, reps: int) -> dict[str, float]:
    """`generate_batch` decode rate over all rows after the first token (wall and per CPU-second), medians."""
    from utils.engine.generation import generate_batch

    class Stamps(list):  # generate_batch appends time.perf_counter(); keep the CPU clock beside it
        def append(self, t: float) -> None:
            super().append((t, time.process_time()))

    wall, cpu = [], []
    for r in range(reps + 1):
        stamps = Stamps()
        out = generate_batch(thinker, embeds_list, None, opts, step_times=stamps)
        tokens = sum(len(o) for o in out) - len(out)
        if r:
            wall.append(tokens / (stamps[-1][0] - stamps[0][0]))
            cpu.append(tokens / (stamps[-1][1] - stamps[0][1]))
    return {"tok_s": statistics.median(wall), "tok_cpu_s": statistics.median(cpu)}


def decode_bytes(thinker, batch: int, context: float, screened: bool) -> float:
    """Bytes one decode step reads per generated token: every block tensor (weights as stored: float, int8
    or packed int4, plus scales), the vocabulary projection (its int8 screen when greedy float decoding uses
    one, else the head's own tensors), the embedding row, and each row's KV cache up to `context`
    positions. MoE experts are all counted (an upper bound)."""
    blocks = sum(t.numel() * t.element_size() for t in (*thinker.blocks.parameters(), *thinker.blocks.buffers()))
    blocks += sum(t.numel() * t.element_size() for t in thinker.norm.parameters())
    head = thinker.lm_head
    if screened:
        head_bytes = head.weight.numel()  # int8 copy (+ a few candidate rows)
    else:
        head_bytes = sum(t.numel() * t.element_size() for t in (*head.parameters(), *head.buffers()))
    emb = thinker.tok_emb.weight
    attn = thinker.blocks[0].attn
    kv = 2 * len(thinker.blocks) * attn.n_kv_heads * attn.head_dim * context * emb.element_size()
    return (blocks + head_bytes) / batch + kv + emb.shape[1] * emb.element_size()


def teacher_forced_agreement(reference, candidate, prompt: list[int], steps: int) -> float:
    """Top-1 agreement of `candidate` with `reference` over `steps` KV-cached decode steps fed the
    reference's greedy continuation of `prompt` (teacher forcing: one early difference does not spread)."""
    import torch

    from utils.engine.generation import Decoder, SamplingOptions, generate

    opts = SamplingOptions(max_new_tokens=steps, ignore_eos=True)

    def embed(model):
        with torch.inference_mode():
            return model.tok_emb(torch.tensor(prompt))[None]

    cont = list(generate(reference, embed(reference), opts))

    def top1(model) -> torch.Tensor:
        with torch.inference_mode():
            dec = Decoder(model, embed(model), None, opts)
            out = [dec.prefill()]
            out += [dec.step(torch.tensor([t])) for t in cont[:-1]]
        return torch.cat(out).float().argmax(-1)

    return float((top1(reference) == top1(candidate)).float().mean())


def load(model_name: str, dtype: str, tree: Path, threads: int):
    from omni import load_model

    path = tree if model_name == "tiny" else DEMO
    return load_model(path, device="cpu", dtype="bfloat16" if dtype == "bfloat16" else None,
                      quantize=dtype if dtype in ("int8", "int4") else None, threads=threads)


def thinker_of(model):
    return model.parts.thinker


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from utils.engine.generation import SCREEN_MIN_VOCAB, Decoder, SamplingOptions

    model_name, dtype = args.worker.split(":")
    tree = Path(args.tree)
    q = args.quick
    P, N = (24, 32) if q else (128, 64)
    reps = 2 if q else 5
    res: dict[str, Any] = {"model": model_name, "dtype": dtype}
    log(f"{model_name} {dtype}: loading")
    t0 = time.perf_counter()
    model = load(model_name, dtype, tree, args.threads)
    res["load_s"] = time.perf_counter() - t0
    res["threads"] = torch.get_num_threads()
    thinker = thinker_of(model)
    vocab = thinker.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = [1] + torch.randint(3, vocab, (P - 1,), generator=g).tolist()
    emb_dtype = thinker.tok_emb.weight.dtype

    def embed(ids):
        with torch.inference_mode():
            return thinker.tok_emb(torch.tensor(ids)).to(emb_dtype)

    x = embed(prompt)[None]
    log(f"{model_name} {dtype}: prefill")

    def prefill():
        with torch.inference_mode():
            Decoder(thinker, x, None, SamplingOptions(max_new_tokens=1)).prefill()
    res["prefill_tok_s"] = P / timed(prefill, reps)

    log(f"{model_name} {dtype}: decode")
    lens = [P - 3 * i for i in range(8)]  # ragged: left padding exercised
    batch = [embed(prompt[:n]) for n in lens]
    for mode in ("causal", "reference"):
        opts = SamplingOptions(max_new_tokens=N, ignore_eos=True, decode_attention=mode)
        b1 = decode_rates_b1(thinker, x, opts, reps)
        b8 = decode_rates_batch(thinker, batch, opts, max(2, reps // 2))
        res[f"b1_{mode}_tok_s"], res[f"b1_{mode}_tok_cpu_s"] = b1["tok_s"], b1["tok_cpu_s"]
        res[f"b8_{mode}_tok_s"], res[f"b8_{mode}_tok_cpu_s"] = b8["tok_s"], b8["tok_cpu_s"]
        if mode == "causal":
            res["ttft_ms"] = b1["ttft_ms"]
            res["decode_kernel_full"] = b1["kernel"]
            res["decode_kernel"] = b1["kernel"].split(" (")[0]
    res["b8_over_b1"] = res["b8_causal_tok_s"] / res["b1_causal_tok_s"]
    if res["decode_kernel"] == "c":  # the torch step on the same weights, for comparison
        opts = SamplingOptions(max_new_tokens=N, ignore_eos=True, decode_kernel="torch")
        res["b1_torch_tok_s"] = decode_rates_b1(thinker, x, opts, reps)["tok_s"]
        res["b8_torch_tok_s"] = decode_rates_batch(thinker, batch, opts, max(2, reps // 2))["tok_s"]
        res["c_over_torch_b1"] = res["b1_causal_tok_s"] / res["b1_torch_tok_s"]
        res["c_over_torch_b8"] = res["b8_causal_tok_s"] / res["b8_torch_tok_s"]

    screened = type(thinker.lm_head) is torch.nn.Linear and vocab >= SCREEN_MIN_VOCAB
    for b, key in ((1, "b1"), (8, "b8")):
        per_token = decode_bytes(thinker, b, P + N / 2, screened)
        bw = read_bandwidth(per_token * b)
        res[f"{key}_read_gb_s"] = bw / 1e9
        res[f"{key}_mb_per_token"] = per_token / 1e6
        res[f"{key}_bound_tok_s"] = bw / per_token
        res[f"{key}_bound_fraction"] = res[f"{key}_causal_tok_cpu_s"] / res[f"{key}_bound_tok_s"]

    if dtype != "float32":
        log(f"{model_name} {dtype}: agreement with float32")
        reference = thinker_of(load(model_name, "float32", tree, args.threads))
        res["top1_agreement"] = teacher_forced_agreement(reference, thinker, prompt, N)
        del reference
    else:
        res["top1_agreement"] = 1.0

    if model_name == "tiny":
        if dtype == "float32":
            log(f"{model_name} {dtype}: reference-style baseline decode")
            for mode, causal in (("reference", False), ("causal", True)):
                rates = []
                for r in range(max(2, reps // 2) + 1):
                    t1 = time.perf_counter()
                    baseline_generate(thinker, x, 1, causal)  # prefill + first token only: subtracted below
                    t_pre = time.perf_counter() - t1
                    t1 = time.perf_counter()
                    baseline_generate(thinker, x, N, causal)
                    if r:
                        rates.append((N - 1) / (time.perf_counter() - t1 - t_pre))
                res[f"baseline_b1_{mode}_tok_s"] = statistics.median(rates)
                res[f"speedup_vs_baseline_{mode}"] = res[f"b1_{mode}_tok_s"] / res[f"baseline_b1_{mode}_tok_s"]
        log(f"{model_name} {dtype}: encoders and speech")
        img = torch.rand(3, 224, 224, generator=g)
        res["image_encode_ms"] = timed(lambda: model.encode_images([img]), reps) * 1e3
        seconds = 2.0 if q else 10.0
        wave = (np.random.default_rng(0).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
        res["audio_rtf"] = timed(lambda: model.encode_audio(wave), max(2, reps // 2)) / seconds
        res["audio_seconds"] = seconds
        frames = 13 if q else 63  # ~1 s / ~5 s of speech at 80 ms per frame
        res["speech_seconds"] = frames * 0.08
        res["speech_rtf"] = timed(lambda: model.speak(frames=frames, vocoder="hifigan"),
                                  1 if q else 2) / res["speech_seconds"]
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


# ---------------------------------------------------------------- the report

ROWS = [
    ("decode step (`--decode_kernel auto`)", "decode_kernel", "{}"),
    ("**decode batch 1, causal (tokens/s)**", "b1_causal_tok_s", "{:,.0f}"),
    ("decode batch 1, causal (tokens per CPU-second)", "b1_causal_tok_cpu_s", "{:,.0f}"),
    ("**decode batch 8, causal (tokens/s, all rows)**", "b8_causal_tok_s", "{:,.0f}"),
    ("decode batch 8, causal (tokens per CPU-second)", "b8_causal_tok_cpu_s", "{:,.0f}"),
    ("batch 8 / batch 1 (causal, wall)", "b8_over_b1", "{:.2f}x"),
    ("decode batch 1, causal, torch step (tokens/s)", "b1_torch_tok_s", "{:,.0f}"),
    ("decode batch 8, causal, torch step (tokens/s, all rows)", "b8_torch_tok_s", "{:,.0f}"),
    ("C step / torch step, batch 1", "c_over_torch_b1", "{:.2f}x"),
    ("C step / torch step, batch 8", "c_over_torch_b8", "{:.2f}x"),
    ("prefill (tokens/s, {P} tokens)", "prefill_tok_s", "{:,.0f}"),
    ("time to first token (ms, {P}-token prompt)", "ttft_ms", "{:.1f}"),
    ("bytes read per token, batch 1 (MB)", "b1_mb_per_token", "{:.2f}"),
    ("read bandwidth for that many bytes (GB per CPU-second)", "b1_read_gb_s", "{:.1f}"),
    ("bandwidth bound, batch 1 (tokens per CPU-second)", "b1_bound_tok_s", "{:,.0f}"),
    ("fraction of the bound reached, batch 1", "b1_bound_fraction", "{:.0%}"),
    ("bytes read per token, batch 8 (MB)", "b8_mb_per_token", "{:.2f}"),
    ("bandwidth bound, batch 8 (tokens per CPU-second)", "b8_bound_tok_s", "{:,.0f}"),
    ("fraction of the bound reached, batch 8", "b8_bound_fraction", "{:.0%}"),
    ("top-1 agreement with float32 (teacher-forced decode steps)", "top1_agreement", "{:.1%}"),
    ("decode batch 1, reference mode (tokens/s)", "b1_reference_tok_s", "{:,.0f}"),
    ("decode batch 8, reference mode (tokens/s, all rows)", "b8_reference_tok_s", "{:,.0f}"),
    ("baseline: the reference's decode loop, causal (tokens/s)", "baseline_b1_causal_tok_s", "{:,.0f}"),
    ("speed-up over that baseline, causal", "speedup_vs_baseline_causal", "{:.2f}x"),
    ("baseline: the reference's decode loop, reference mode (tokens/s)", "baseline_b1_reference_tok_s", "{:,.0f}"),
    ("speed-up over that baseline, reference mode", "speedup_vs_baseline_reference", "{:.2f}x"),
    ("image encode (ms, 1 image)", "image_encode_ms", "{:.1f}"),
    ("audio encoder RTF ({A:g} s, mel incl.)", "audio_rtf", "{:.4f}"),
    ("speech out RTF ({S:.2f} s: talker + RVQ + HiFi-GAN)", "speech_rtf", "{:.3f}"),
    ("load time (s)", "load_s", "{:.2f}"),
    ("peak RSS (MB)", "peak_rss_mb", "{:,.0f}"),
]

TITLES = {"tiny": "μOmni tiny configuration (random weights; Thinker d 256, 4 layers, vocab 32000)",
          "demo": "demo thinker (checkpoints/demo; d 128, 4 layers, vocab 512)"}

NOTES = """
Greedy decoding of a {prompt_tokens}-token prompt, {new_tokens} new tokens, EOS ignored; batch 8 = 8 ragged prompts
(left-padded). Decode rate = tokens after the first / time after the first; "per CPU-second" divides by the
process's CPU time instead of wall time (one thread: other processes on the same cores do not count). Causal
is the default decode; "reference mode" reproduces the μOmni reference's defect (each new token attends to the
first position only). Decode step: "c" = the C step (utils/engine/native/step.c: float32 and int8 weights, causal),
"torch" = the torch step (bfloat16, int4, and the reference mode always take it); the torch rows time the torch
step on the same weights in the same process. float32 / bfloat16 greedy steps read the vocabulary projection
through the exact int8-screened argmax (utils.weights.quant.GreedyHead). int8 = Int8Linear (int8 weights per output
channel; the C step quantizes activations per row to int8, the torch step multiplies bfloat16 activations),
int4 = Int4Linear (4-bit weights in groups of 32; shapes the kernel cannot take stay float). Bytes per token:
every block tensor as stored, the vocabulary projection as read (int8 screen or the head itself), the embedding
row and the KV cache at the mean position; the bound is the single-thread read bandwidth measured over a buffer
of that size, divided by it.
The baseline is the reference's decode loop on the same weights (cache grown by torch.cat, NaN/Inf .any()
checks on every tensor, masks rebuilt and K/V repeat_interleave'd each step)."""


def render(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    cols = [d for d in DTYPES if d in results]
    any_res = next(iter(results.values()))
    fmt_args = {"P": meta["prompt_tokens"], "A": any_res.get("audio_seconds", 10),
                "S": any_res.get("speech_seconds", 0)}
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, key, fmt in ROWS:
        cells = ["–" if results[d].get(key) is None else fmt.format(results[d][key]) for d in cols]
        if any(c != "–" for c in cells):
            lines.append(f"| {label.format(**fmt_args)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short prompts, few tokens, few repeats: a smoke run")
    ap.add_argument("--json_out", help="also write the results as JSON here")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of " + ",".join(DTYPES))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (as --threads of the CLIs; default 1, or OMP_NUM_THREADS when set)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--version", action="version", version=version_text("bench.py"),
                    help="print the suite's, torch's and Python's versions and exit")
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if [m for m in models if m not in MODELS] or not models:
        ap.error(f"--models: use a subset of {', '.join(MODELS)}")
    if [d for d in dtypes if d not in DTYPES] or not dtypes:
        ap.error(f"--dtypes: use a subset of {', '.join(DTYPES)}")
    t_start = time.perf_counter()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="muomni_bench_") as tmp:
        if "tiny" in models:
            log("writing the random tiny checkpoint tree")
            write_tree(Path(tmp))
        for m in models:
            for d in dtypes:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{m}:{d}", "--tree", tmp]
                if args.quick:
                    cmd.append("--quick")
                if args.threads is not None:
                    cmd += ["--threads", str(args.threads)]
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
                if proc.returncode != 0:
                    log(f"{m} {d}: worker failed (exit {proc.returncode})")
                    return 1
                results.setdefault(m, {})[d] = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch
    first = next(iter(next(iter(results.values())).values()))
    meta = {"prompt_tokens": 24 if args.quick else 128, "new_tokens": 32 if args.quick else 64,
            "quick": args.quick, "threads": first["threads"], "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "wall_s": round(time.perf_counter() - t_start, 1)}
    print(f"μOmni benchmark (torch {meta['torch']}, {meta['threads']} thread(s), {meta['cpu_count']} CPUs"
          f"{', quick' if args.quick else ''}; medians)")
    for m, res in results.items():
        print(f"\n### {TITLES[m]}\n")
        print(render(res, meta))
    print(NOTES.format(**meta))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    log(f"done in {meta['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
