#!/usr/bin/env python3
"""Speed benchmark of the real tiny μOmni configuration, with random weights, through the project's own code.

    python bench.py                      # float32, bfloat16 and int8; a few minutes on 2 CPU cores
    python bench.py --quick              # a smoke run (seconds)
    python bench.py --json_out bench.json --threads 0   # torch's default thread count (default here: 1)

Components (the trainers' tiny configs): ThinkerLM (4 layers, d 256, 4 heads, 2 KV heads, SwiGLU 1024,
vocab 32000, ctx 512), ViTTiny (d 128, 4 layers, 2 heads, ff 512, 224 px), AudioEncoderTiny (d 192, 4 layers,
3 heads, ff 768, downsample 8), TalkerTiny (d 192, 4 layers, 3 heads, ff 768) + RVQ + HiFi-GAN (initial
channels 128). Random weights are written once as trainers' checkpoint files and every dtype loads them
with utils.loading, each dtype in its own process (so peak RSS is per dtype).

Reported per dtype (float32, bfloat16, int8 = dynamic int8 quantization of the nn.Linear layers):
load time, prefill tokens/s, time to first token, batch-1 and batch-8 greedy decode tokens/s (decode
rate = tokens after the first / time after the first), image encode ms, audio encoder real-time factor
(10 s of audio, mel included), speech-out real-time factor (talker codes + RVQ + HiFi-GAN, 80 ms per frame),
peak RSS, top-1 agreement with float32; and a baseline decode loop written the way the μOmni reference
wrote it (KV cache grown by torch.cat, a NaN/Inf check on every tensor, masks rebuilt and K/V
repeat_interleave'd every step) on the same weights, with the speed-up over it.
The table goes to stdout, progress to stderr. Timings are medians over repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

DTYPES = ("float32", "bfloat16", "int8")
SEED = 0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- building the tiny components

def write_checkpoints(root: Path) -> None:
    """Random weights for every component, saved the way the trainers save them."""
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
    rvq = RVQ()
    vocoder = HiFiGANGenerator(HiFiGANConfig(upsample_initial_channel=128))
    root.mkdir(parents=True, exist_ok=True)
    torch.save({"model": thinker.state_dict()}, root / "thinker.pt")
    torch.save({"vit": vision.state_dict()}, root / "vision.pt")
    torch.save({"enc": audio.state_dict()}, root / "audio_enc.pt")
    torch.save({"talker": talker.state_dict(), "rvq": rvq.state_dict()}, root / "talker.pt")
    torch.save({"generator": vocoder.state_dict()}, root / "vocoder.pt")


def load_components(root: Path) -> dict[str, Any]:
    """Read the checkpoint files and build the networks with utils.loading's builders (strict loading)."""
    from utils import loading
    from utils.checkpoint import read_torch_file

    def sd(name: str, key: str) -> dict:
        return read_torch_file(root / name)[key]

    talker_file = read_torch_file(root / "talker.pt")
    return {
        "thinker": loading.build_thinker(sd("thinker.pt", "model"), {"n_heads": 4}, "thinker.pt"),
        "vision": loading.build_vision(sd("vision.pt", "vit"), {"n_heads": 2}, "vision.pt"),
        "audio": loading.build_audio(sd("audio_enc.pt", "enc"), {"n_heads": 3}, "audio_enc.pt"),
        "talker": loading.build_talker(talker_file["talker"], {"n_heads": 3}, "talker.pt"),
        "rvq": loading.build_rvq(talker_file["rvq"], "talker.pt"),
        "vocoder": loading.build_vocoder(sd("vocoder.pt", "generator"), {}, "vocoder.pt"),
    }


def convert(comps: dict[str, Any], dtype: str) -> dict[str, Any]:
    """float32 as loaded; bfloat16: every module cast; int8: nn.Linear layers dynamically quantized."""
    import torch

    from utils.quant import quantize_linears

    for m in comps.values():
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        if dtype == "bfloat16":
            m.to(torch.bfloat16)
        elif dtype == "int8":
            quantize_linears(m, "int8")
    return comps


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


def decode_rate_b1(model, embeds, opts, reps: int) -> tuple[float, float, list[int]]:
    """(decode tokens/s, time to first token s, ids) for `generate`, medians over reps."""
    from utils.generation import generate

    rates, ttfts, ids = [], [], []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        first = last = None
        ids = []
        for tid in generate(model, embeds, opts):
            last = time.perf_counter()
            first = first or last
            ids.append(tid)
        if r:  # the first run is a warm-up
            ttfts.append(first - t0)
            rates.append((len(ids) - 1) / (last - first))
    return statistics.median(rates), statistics.median(ttfts), ids


def decode_rate_batch(model, embeds_list, opts, reps: int) -> float:
    """Decode tokens/s of generate_batch's loop (all rows, after the first token), median over reps."""
    import torch

    from utils.generation import Decoder, Picker, left_pad

    rates = []
    for r in range(reps + 1):
        with torch.inference_mode():
            x, pads = left_pad(embeds_list)
            dec = Decoder(model, x, pads, opts)
            picker = Picker(model, dec, opts, [[] for _ in embeds_list], x.device)
            tokens = picker.first()
            tokens.tolist()
            t0 = time.perf_counter()
            for _ in range(opts.max_new_tokens - 1):
                tokens = picker.next(tokens)
                tokens.tolist()
            dt = time.perf_counter() - t0
        if r:
            rates.append(len(embeds_list) * (opts.max_new_tokens - 1) / dt)
    return statistics.median(rates)


def agreement(model, ref: dict, embeds_fn) -> dict[str, float]:
    """Top-1 agreement with float32: teacher-forced over the float32 greedy sequence, and the greedy ids."""
    import torch

    with torch.inference_mode():
        logits = model(embeds_fn(ref["sequence"]), 0, None)[0]
    top1 = logits.float().argmax(-1).tolist()
    agree = sum(a == b for a, b in zip(top1, ref["top1"])) / len(top1)
    same = 0
    for a, b in zip(ref["greedy_test"], ref["greedy_ids"]):
        if a != b:
            break
        same += 1
    return {"top1_agreement": agree, "greedy_same_prefix": same}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.worker
    root = Path(args.ckpt_root)
    res: dict[str, Any] = {"dtype": dtype, "threads": torch.get_num_threads()}
    q = args.quick
    P, N = (24, 32) if q else (128, 64)
    reps = 2 if q else 5

    from utils.generation import SamplingOptions, generate

    # float32 references for the agreement numbers, on the same weights
    g = torch.Generator().manual_seed(1)
    prompt = [1] + torch.randint(3, 32000, (P - 1,), generator=g).tolist()
    ref: dict[str, Any] = {}
    if dtype != "float32":
        f32 = load_components(root)["thinker"].eval()
        with torch.inference_mode():
            e = f32.tok_emb(torch.tensor(prompt))[None]
            ref["greedy_ids"] = list(generate(f32, e, SamplingOptions(max_new_tokens=N, ignore_eos=True)))
            ref["sequence"] = prompt + ref["greedy_ids"]
            ref["top1"] = f32(f32.tok_emb(torch.tensor(ref["sequence"]))[None], 0, None)[0].argmax(-1).tolist()
        del f32

    log(f"{dtype}: loading")
    t0 = time.perf_counter()
    comps = convert(load_components(root), dtype)
    res["load_s"] = time.perf_counter() - t0
    thinker = comps["thinker"]
    emb_dtype = thinker.tok_emb.weight.dtype

    def embed(ids):
        with torch.inference_mode():
            return thinker.tok_emb(torch.tensor(ids))[None].to(emb_dtype)

    # ---- thinker
    log(f"{dtype}: prefill / time to first token")
    x = embed(prompt)
    from utils.generation import Decoder

    def prefill():
        with torch.inference_mode():
            Decoder(thinker, x, None, SamplingOptions(max_new_tokens=1)).prefill()
    res["prefill_tok_s"] = P / timed(prefill, reps)

    log(f"{dtype}: batch-1 decode")
    for mode in ("reference", "causal"):
        opts = SamplingOptions(max_new_tokens=N, ignore_eos=True, decode_attention=mode)
        rate, ttft, ids = decode_rate_b1(thinker, x, opts, reps)
        res[f"decode_b1_{mode}_tok_s"] = rate
        if mode == "reference":
            res["ttft_ms"] = ttft * 1e3
            ref_ids = ids
    if dtype == "float32":
        opts = SamplingOptions(max_new_tokens=N, ignore_eos=True, fast_greedy=False)
        res["decode_b1_reference_full_head_tok_s"] = decode_rate_b1(thinker, x, opts, reps)[0]
    res["greedy_ids_head"] = ref_ids[:8]

    log(f"{dtype}: batch-8 decode")
    lens = [P - 3 * i for i in range(8)]  # ragged: left padding exercised
    batch = [embed(prompt[:n])[0] for n in lens]
    for mode in ("reference", "causal"):
        opts = SamplingOptions(max_new_tokens=N, ignore_eos=True, decode_attention=mode)
        res[f"decode_b8_{mode}_tok_s"] = decode_rate_batch(thinker, batch, opts, max(2, reps // 2))

    log(f"{dtype}: reference-style baseline decode")
    for mode, causal in (("reference", False), ("causal", True)):
        base_rates = []
        for r in range(max(2, reps // 2) + 1):
            t0 = time.perf_counter()
            baseline_generate(thinker, x, 1, causal)  # prefill + first token only: subtracted below
            t_pre = time.perf_counter() - t0
            t0 = time.perf_counter()
            base_ids = baseline_generate(thinker, x, N, causal)
            dt = time.perf_counter() - t0 - t_pre
            if r:
                base_rates.append((N - 1) / dt)
        res[f"baseline_decode_b1_{mode}_tok_s"] = statistics.median(base_rates)
        res[f"speedup_vs_baseline_{mode}"] = res[f"decode_b1_{mode}_tok_s"] / res[f"baseline_decode_b1_{mode}_tok_s"]
        if mode == "reference":
            res["baseline_ids_match"] = base_ids == ref_ids

    if dtype != "float32":
        res.update(agreement(thinker, {**ref, "greedy_test": ref_ids}, embed))
    else:
        res.update({"top1_agreement": 1.0, "greedy_same_prefix": N})

    # ---- encoders
    log(f"{dtype}: image encode")
    vit = comps["vision"]
    img = torch.rand(1, 3, 224, 224, generator=g).to(emb_dtype)

    def encode_image():
        with torch.inference_mode():
            vit(img)
    res["image_encode_ms"] = timed(encode_image, reps) * 1e3

    log(f"{dtype}: audio encoder")
    from utils.audio import SAMPLE_RATE, power_mel
    seconds = 2.0 if q else 10.0
    wave = (np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)) * 0.1).astype(np.float32)
    enc = comps["audio"]

    def encode_audio():
        with torch.inference_mode():
            enc(power_mel(wave).to(emb_dtype)[None])
    res["audio_rtf"] = timed(encode_audio, max(2, reps // 2)) / seconds
    res["audio_seconds"] = seconds

    log(f"{dtype}: speech out")
    frames = 13 if q else 63  # ~1 s / ~5 s of speech at 80 ms per frame
    res["speech_seconds"] = frames * 0.08
    res["speech_rtf"] = timed(lambda: speak(comps, frames), max(1, reps // 3) if q else 2) / res["speech_seconds"]

    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def speak(comps: dict[str, Any], frames: int) -> None:
    """Talker codes -> RVQ mel -> HiFi-GAN waveform, through the CLI's own speech path."""
    from utils.speech import synthesize

    synthesize(comps["talker"], comps["rvq"], comps["vocoder"], frames, which="hifigan")


# ---------------------------------------------------------------- the report

ROWS = [
    ("load time (s)", "load_s", "{:.2f}"),
    ("prefill (tokens/s, {P} tokens)", "prefill_tok_s", "{:,.0f}"),
    ("time to first token (ms)", "ttft_ms", "{:.1f}"),
    ("decode batch 1, reference (tokens/s)", "decode_b1_reference_tok_s", "{:,.0f}"),
    ("decode batch 1, causal (tokens/s)", "decode_b1_causal_tok_s", "{:,.0f}"),
    ("decode batch 1, reference, full lm_head argmax (tokens/s)", "decode_b1_reference_full_head_tok_s", "{:,.0f}"),
    ("decode batch 8, reference (tokens/s, all rows)", "decode_b8_reference_tok_s", "{:,.0f}"),
    ("decode batch 8, causal (tokens/s, all rows)", "decode_b8_causal_tok_s", "{:,.0f}"),
    ("batch 8 / batch 1 (reference)", "b8_over_b1_reference", "{:.2f}x"),
    ("batch 8 / batch 1 (causal)", "b8_over_b1_causal", "{:.2f}x"),
    ("baseline decode batch 1, reference-style loop, reference (tokens/s)", "baseline_decode_b1_reference_tok_s",
     "{:,.0f}"),
    ("baseline decode batch 1, reference-style loop, causal (tokens/s)", "baseline_decode_b1_causal_tok_s",
     "{:,.0f}"),
    ("speed-up over the baseline, reference (same dtype)", "speedup_vs_baseline_reference", "{:.2f}x"),
    ("speed-up over the baseline, causal (same dtype)", "speedup_vs_baseline_causal", "{:.2f}x"),
    ("speed-up over the float32 baseline, reference", "speedup_vs_f32_baseline", "{:.2f}x"),
    ("baseline ids == fast ids (reference)", "baseline_ids_match", "{}"),
    ("top-1 agreement with float32 (teacher-forced)", "top1_agreement", "{:.1%}"),
    ("greedy ids identical to float32 (first N)", "greedy_same_prefix", "{} / {N}"),
    ("image encode (ms, 1 image)", "image_encode_ms", "{:.1f}"),
    ("audio encoder RTF ({A:g} s, mel incl.)", "audio_rtf", "{:.4f}"),
    ("speech out RTF ({S:.2f} s: talker + RVQ + HiFi-GAN)", "speech_rtf", "{:.3f}"),
    ("peak RSS (MB)", "peak_rss_mb", "{:,.0f}"),
]


NOTES = """
Greedy decoding of a {prompt_tokens}-token prompt, {new_tokens} new tokens, EOS ignored. Decode rate = tokens after the
first / time after the first. "reference" = the μOmni reference decode (each new token attends to the first
position only; the fixtures' semantics), "causal" = attention over every earlier position. float32/bfloat16
greedy steps use the exact int8-screened argmax over the vocabulary (utils.quant.GreedyHead); the "full
lm_head argmax" row turns it off. int8 = dynamic int8 nn.Linear layers (thinker, audio encoder, talker,
RVQ); torch's TransformerEncoderLayer (ViT) and the convolutions stay float, so int8 image encode and vocoder
time are float32's. Baseline = the reference's decode loop on the same weights and dtype (cache grown by
torch.cat, NaN/Inf .any() checks on every tensor, masks rebuilt and K/V repeat_interleave'd each step, plain
nn.Linear calls; the fast path's float32 matmuls go through oneDNN, see models.layers.linear)."""


def render(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    cols = [d for d in DTYPES if d in results]
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    any_res = next(iter(results.values()))
    fmt_args = {"P": meta["prompt_tokens"], "N": meta["new_tokens"], "A": any_res.get("audio_seconds", 10),
                "S": any_res.get("speech_seconds", 0)}
    for label, key, fmt in ROWS:
        cells = []
        for d in cols:
            v = results[d].get(key)
            cells.append("–" if v is None else fmt.format(v, **fmt_args))
        if all(c == "–" for c in cells):
            continue
        lines.append(f"| {label.format(**fmt_args)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short prompts, few tokens, few repeats: a smoke run")
    ap.add_argument("--json_out", help="also write the results as JSON here")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of " + ",".join(DTYPES))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: these tiny models gain little from more, and on a "
                         "shared machine waiting threads make timings erratic; 0 = torch's default)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt_root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"--dtypes: unknown {bad} (use {', '.join(DTYPES)})")
    t_start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="muomni_bench_") as tmp:
        log("writing random tiny checkpoints")
        write_checkpoints(Path(tmp))
        for d in dtypes:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", d, "--ckpt_root", tmp]
            if args.quick:
                cmd.append("--quick")
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
            if proc.returncode != 0:
                log(f"{d}: worker failed (exit {proc.returncode})")
                return 1
            results[d] = json.loads(proc.stdout.strip().splitlines()[-1])
    base32 = results.get("float32", {}).get("baseline_decode_b1_reference_tok_s")
    for r in results.values():
        for mode in ("reference", "causal"):
            r[f"b8_over_b1_{mode}"] = r[f"decode_b8_{mode}_tok_s"] / r[f"decode_b1_{mode}_tok_s"]
        if base32:
            r["speedup_vs_f32_baseline"] = r["decode_b1_reference_tok_s"] / base32
    import torch
    meta = {"prompt_tokens": 24 if args.quick else 128, "new_tokens": 32 if args.quick else 64,
            "quick": args.quick, "threads": next(iter(results.values()))["threads"], "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "wall_s": round(time.perf_counter() - t_start, 1)}
    table = render(results, meta)
    print(f"μOmni tiny benchmark (torch {meta['torch']}, {meta['threads']} threads, {meta['cpu_count']} CPUs"
          f"{', quick' if args.quick else ''}; medians)\n")
    print(table)
    print(NOTES.format(**meta))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    log(f"done in {meta['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
