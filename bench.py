#!/usr/bin/env python3
"""Speed benchmark of μOmni inference through the public API (omni.load_model, OmniModel.answer / answer_batch).

    python bench.py                      # every model, float32 / bfloat16 / int8 / int4; long (large is slow)
    python bench.py --quick              # a smoke run (tiny and demo; short prompts, few tokens, few repeats)
    python bench.py --models demo --dtypes float32,int8 --json_out bench.json
    python bench.py --models base --threads 1,2   # each dtype at 1 and at 2 threads, side by side

Models: "tiny" = the real μOmni tiny configuration (Thinker: 4 layers, d 256, 4 heads, 2 KV heads, SwiGLU 1024,
vocab 32000, ctx 512; ViT d 128 x4; audio encoder d 192 x4; Talker d 192 x4 + RVQ + HiFi-GAN) with random
weights, written once as a trainers' checkpoint tree (tools/bench_models.py) and loaded with omni.load_model;
"demo" = the trained demo model in checkpoints/demo (Thinker d 128, 4 layers, vocab 512); "base" (Thinker d 512,
8 layers, 8 heads, 4 KV heads, SwiGLU 2048) and "large" (d 1024, 12 layers, 16 heads, 8 KV heads, SwiGLU 4096),
both vocab 32000, random thinkers alone, for how decoding scales past μOmni's sizes (headline rows only). Each
(model, dtype, thread count) runs in its own process. What cannot be seen through the API (the reference's
decode loop, the bytes a step reads, teacher-forced agreement) is measured by tools/bench_reference.py.

Headline: greedy decoding with causal attention (the default), batch 1 (`answer`) and batch 8 (`answer_batch`,
ragged prompts), decode rate = tokens after the first / time after the first; prefill tokens/s and time to first
token; the bytes a decode step reads per token (weights, the int8 vocabulary screen or the head, the KV cache
at the mean position), the bandwidth bound that implies for the read bandwidth measured in the same process
(one thread: per CPU-second; several: per wall second on that many threads), and the fraction of it reached.
Reference-mode decode (the μOmni defect kept for comparison) is a secondary row; constrained decoding (a JSON
schema, the same prompts and lengths) sits beside the free rate. Rates are also given per CPU-second of the
process (one thread: robust against other processes sharing the cores, which stretch wall time but not our CPU
time). Quantized columns report top-1 agreement with float32 on teacher-forced decode steps. The table goes to
stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import random
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

from utils.base.version import version_text  # noqa: E402

DTYPES = ("float32", "bfloat16", "int8", "int4")
MODELS = ("tiny", "demo", "base", "large")
QUICK_MODELS = ("tiny", "demo")
THINKER_ONLY = ("base", "large")  # random thinkers without the other components: the headline rows only
DEMO = REPO / "checkpoints" / "demo"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


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


def read_bandwidth(nbytes: float, threads: int, reps: int = 5) -> float:
    """The streaming read bandwidth that bounds a decode step: bytes per second torch's sum reads from a float32
    buffer of `nbytes` (the size of what a step reads, so the caches help it as much as they help the step) on
    `threads` threads, the median of `reps`. One thread: per CPU-second (like the per-CPU-second rate it
    bounds: robust against other processes on the cores); more: per wall second (CPU time counts every thread)."""
    import torch

    buf = torch.ones(max(1 << 16, int(nbytes) // 4))
    clock = time.process_time if threads == 1 else time.perf_counter
    buf.sum()
    times = []
    for _ in range(reps):
        t0 = clock()
        buf.sum()
        times.append(clock() - t0)
    return buf.numel() * 4 / statistics.median(times)


WORDS = ("the a of and to in is what how many plus minus one two three four five six seven eight nine ten you do "
         "see it are this that color sound picture").split()


def prompt_text(tokens: int, seed: int, count: Callable[[str], int]) -> str:
    """A reproducible text of random common words, the longest whose prompt (`count`: text -> prompt tokens)
    has at most `tokens` tokens."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(tokens)]
    n = len(words)
    while n > 1 and count(" ".join(words[:n])) > tokens:
        n -= 1
    return " ".join(words[:n])


def decode_rates(model, texts: list[str], gen: dict[str, Any], reps: int) -> dict[str, Any]:
    """Greedy decode rates of `texts` (one: OmniModel.answer; several: answer_batch, decoded together) with the
    generation options `gen` (max_new_tokens among them), medians over `reps` runs after a warm-up:
    tokens/s over all rows after their first token (wall, from the answers' timing), tokens per CPU-second (the
    process's CPU time of the run less that of a one-token run, which is its prefill and first token), time
    to first token and prefill rate (batch 1), and the decode step that ran."""
    def run(max_new: int) -> tuple[list, float]:
        t0 = time.process_time()
        if len(texts) == 1:
            answers = [model.answer(texts[0], **{**gen, "max_new_tokens": max_new})]
        else:
            answers = model.answer_batch([{"text": t} for t in texts], batch_size=len(texts),
                                         **{**gen, "max_new_tokens": max_new})
        return answers, time.process_time() - t0

    wall, cpu, ttft, prefill = [], [], [], []
    kernel = prompt_tokens = None
    for r in range(reps + 1):
        _, cpu_first = run(1)
        answers, cpu_all = run(gen["max_new_tokens"])
        steps = sum(a.timing["decode_steps"] for a in answers)
        if r:  # the first run is a warm-up
            wall.append(steps / max(a.timing["decode_s"] for a in answers))
            cpu.append(steps / (cpu_all - cpu_first))
            ttft.append(answers[0].timing["prefill_s"] * 1e3)
            prefill.append(answers[0].timing["prefill_tokens_per_s"])
        kernel, prompt_tokens = answers[0].timing["decode_kernel"], answers[0].prompt_tokens
    return {"tok_s": statistics.median(wall), "tok_cpu_s": statistics.median(cpu), "ttft_ms": statistics.median(ttft),
            "prefill_tok_s": statistics.median(prefill), "kernel": kernel, "prompt_tokens": prompt_tokens}


def load(model_name: str, dtype: str, tree: Path, threads: int | None):
    from omni import load_model

    path = DEMO if model_name == "demo" else tree / model_name
    return load_model(path, device="cpu", dtype="bfloat16" if dtype == "bfloat16" else None,
                      quantize=dtype if dtype in ("int8", "int4") else None, threads=threads)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    from utils.base.cpus import passive_openmp
    passive_openmp()  # as omni.py does, before this process loads torch
    import torch

    from tools.bench_reference import decode_bytes, teacher_forced_agreement

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
    thinker = model.parts.thinker
    def count(t: str) -> int:
        return len(model.parts.tokenizer.prompt_ids(t))
    text = prompt_text(P, 1, count)
    batch = [prompt_text(P - 3 * i, 2 + i, count) for i in range(8)]  # ragged: left padding exercised

    log(f"{model_name} {dtype}: decode ({res['threads']} thread(s))")
    headline = model_name in THINKER_ONLY
    for mode in ("causal",) if headline else ("causal", "reference"):
        gen = {"max_new_tokens": N, "ignore_eos": True, "decode_attention": mode}
        b1 = decode_rates(model, [text], gen, reps)
        b8 = decode_rates(model, batch, gen, max(2, reps // 2))
        res[f"b1_{mode}_tok_s"], res[f"b1_{mode}_tok_cpu_s"] = b1["tok_s"], b1["tok_cpu_s"]
        res[f"b8_{mode}_tok_s"], res[f"b8_{mode}_tok_cpu_s"] = b8["tok_s"], b8["tok_cpu_s"]
        if mode == "causal":
            res["ttft_ms"], res["prefill_tok_s"], res["prompt_tokens"] = b1["ttft_ms"], b1["prefill_tok_s"], \
                b1["prompt_tokens"]
            res["decode_kernel_full"] = b1["kernel"]
            res["decode_kernel"] = b1["kernel"].split(" (")[0]
    res["b8_over_b1"] = res["b8_causal_tok_s"] / res["b1_causal_tok_s"]
    if not headline:
        secondary_rates(model, res, text, batch, N, reps)
    for b, key in ((1, "b1"), (8, "b8")):
        per_token = decode_bytes(thinker, b, res["prompt_tokens"] + N / 2)
        bw = read_bandwidth(per_token * b, res["threads"])
        rate = res[f"{key}_causal_tok_cpu_s" if res["threads"] == 1 else f"{key}_causal_tok_s"]
        res[f"{key}_read_gb_s"] = bw / 1e9
        res[f"{key}_mb_per_token"] = per_token / 1e6
        res[f"{key}_bound_tok_s"] = bw / per_token
        res[f"{key}_bound_fraction"] = rate / res[f"{key}_bound_tok_s"]

    prompt_ids = model.parts.tokenizer.prompt_ids(text)
    if dtype != "float32":
        log(f"{model_name} {dtype}: agreement with float32")
        reference = load(model_name, "float32", tree, args.threads).parts.thinker
        res["top1_agreement"] = teacher_forced_agreement(reference, thinker, prompt_ids, N)
        del reference
    else:
        res["top1_agreement"] = 1.0

    if model_name == "tiny":
        tiny_extras(model, res, thinker, prompt_ids, dtype, q, N, reps)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def secondary_rates(model, res: dict[str, Any], text: str, batch: list[str], N: int, reps: int) -> None:
    """The rows beside the headline: constrained decoding, and the torch step on the same weights."""
    log(f"{res['model']} {res['dtype']}: constrained decode")  # JSON that cannot end before N tokens: as long as the free runs
    gen = {"max_new_tokens": N, "response_format": {"type": "json_schema", "json_schema": {"name": "digits", "schema": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": N}}}}
    res["b1_json_tok_s"] = decode_rates(model, [text], gen, reps)["tok_s"]
    res["b8_json_tok_s"] = decode_rates(model, batch, gen, max(2, reps // 2))["tok_s"]
    res["json_over_free_b1"] = res["b1_json_tok_s"] / res["b1_causal_tok_s"]
    res["json_over_free_b8"] = res["b8_json_tok_s"] / res["b8_causal_tok_s"]
    if res["decode_kernel"] == "c":  # the torch step on the same weights, for comparison
        gen = {"max_new_tokens": N, "ignore_eos": True, "decode_kernel": "torch"}
        res["b1_torch_tok_s"] = decode_rates(model, [text], gen, reps)["tok_s"]
        res["b8_torch_tok_s"] = decode_rates(model, batch, gen, max(2, reps // 2))["tok_s"]
        res["c_over_torch_b1"] = res["b1_causal_tok_s"] / res["b1_torch_tok_s"]
        res["c_over_torch_b8"] = res["b8_causal_tok_s"] / res["b8_torch_tok_s"]


def tiny_extras(model, res: dict[str, Any], thinker, prompt_ids: list[int], dtype: str, q: bool, N: int,
                reps: int) -> None:
    """What only the tiny tree has: the reference-style baseline decode (float32), the encoders and speech."""
    import numpy as np
    import torch

    from tools.bench_reference import baseline_rate

    if dtype == "float32":
        log(f"tiny {dtype}: reference-style baseline decode")
        for mode, causal in (("reference", False), ("causal", True)):
            res[f"baseline_b1_{mode}_tok_s"] = baseline_rate(thinker, prompt_ids, N, causal, max(2, reps // 2))
            res[f"speedup_vs_baseline_{mode}"] = res[f"b1_{mode}_tok_s"] / res[f"baseline_b1_{mode}_tok_s"]
    log(f"tiny {dtype}: encoders and speech")
    g = torch.Generator().manual_seed(1)
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


# ---------------------------------------------------------------- the report

ROWS = [
    ("decode step (`--decode_kernel auto`)", "decode_kernel", "{}"),
    ("**decode batch 1, causal (tokens/s)**", "b1_causal_tok_s", "{:,.0f}"),
    ("decode batch 1, causal (tokens per CPU-second)", "b1_causal_tok_cpu_s", "{:,.0f}"),
    ("**decode batch 8, causal (tokens/s, all rows)**", "b8_causal_tok_s", "{:,.0f}"),
    ("decode batch 8, causal (tokens per CPU-second)", "b8_causal_tok_cpu_s", "{:,.0f}"),
    ("batch 8 / batch 1 (causal, wall)", "b8_over_b1", "{:.2f}x"),
    ("decode batch 1, JSON schema (constrained; tokens/s)", "b1_json_tok_s", "{:,.0f}"),
    ("decode batch 8, JSON schema (constrained; tokens/s, all rows)", "b8_json_tok_s", "{:,.0f}"),
    ("constrained / free, batch 1", "json_over_free_b1", "{:.2f}x"),
    ("constrained / free, batch 8", "json_over_free_b8", "{:.2f}x"),
    ("decode batch 1, causal, torch step (tokens/s)", "b1_torch_tok_s", "{:,.0f}"),
    ("decode batch 8, causal, torch step (tokens/s, all rows)", "b8_torch_tok_s", "{:,.0f}"),
    ("C step / torch step, batch 1", "c_over_torch_b1", "{:.2f}x"),
    ("C step / torch step, batch 8", "c_over_torch_b8", "{:.2f}x"),
    ("prefill (tokens/s, {P} tokens)", "prefill_tok_s", "{:,.0f}"),
    ("time to first token (ms, {P}-token prompt)", "ttft_ms", "{:.1f}"),
    ("bytes read per token, batch 1 (MB)", "b1_mb_per_token", "{:.2f}"),
    ("read bandwidth for that many bytes (GB per CPU-second; several threads: GB/s)", "b1_read_gb_s", "{:.1f}"),
    ("bandwidth bound, batch 1 (tokens per CPU-second; several threads: tokens/s)", "b1_bound_tok_s", "{:,.0f}"),
    ("fraction of the bound reached, batch 1", "b1_bound_fraction", "{:.0%}"),
    ("bytes read per token, batch 8 (MB)", "b8_mb_per_token", "{:.2f}"),
    ("bandwidth bound, batch 8 (tokens per CPU-second; several threads: tokens/s)", "b8_bound_tok_s", "{:,.0f}"),
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
          "demo": "demo thinker (checkpoints/demo; d 128, 4 layers, vocab 512)",
          "base": "\"base\" thinker (random weights; d 512, 8 layers, 8 heads, 4 KV heads, SwiGLU 2048, vocab 32000)",
          "large": "\"large\" thinker (random weights; d 1024, 12 layers, 16 heads, 8 KV heads, SwiGLU 4096, "
                   "vocab 32000)"}

NOTES = """
Greedy decoding of a {prompt_tokens}-token prompt, {new_tokens} new tokens, EOS ignored; batch 8 = 8 ragged prompts
(left-padded). Decode rate = tokens after the first / time after the first; "per CPU-second" divides by the
process's CPU time instead of wall time (one thread: other processes on the same cores do not count). Causal
is the default decode; "reference mode" reproduces the μOmni reference's defect (each new token attends to the
first position only). Decode step: "c" = the C step (utils/engine/native/step.c: float32, int8 and int4 weights,
causal), "torch" = the torch step (bfloat16 and the reference mode always take it); the torch rows time the torch
step on the same weights in the same process. float32 / bfloat16 greedy steps read the vocabulary projection
through the exact int8-screened argmax (utils.weights.quant.GreedyHead). int8 = Int8Linear (int8 weights per output
channel; the C step quantizes activations per row to int8, the torch step multiplies bfloat16 activations),
int4 = Int4Linear (4-bit weights in groups of 32 with a bfloat16 scale and zero each, 5 bits a weight; the C step
quantizes activations per group of 32 to int8; shapes the kernel cannot take stay float). Bytes per token:
every block tensor as stored, the vocabulary projection as read (int8 screen or the head itself), the embedding
row and the KV cache at the mean position; the bound is the read bandwidth divided by it, measured in the same
process as torch's sum over a float32 buffer of that size (so the caches help it as they help the step), the
median of 5: at 1 thread per CPU-second (compared with tokens per CPU-second), at several threads per wall
second on that many threads (compared with tokens/s). Columns "(N threads)" ran with --threads N (the C step's
pool and torch's). The base and large thinkers (random, thinker only) get the headline rows only.
Constrained: the same prompts answered as a JSON array of at least {new_tokens} digits (response_format json_schema,
utils/engine/constrain.py: llguidance's mask before every pick, so the rows take the logits path, not the C step's
own argmax or the int8 screen), {new_tokens} tokens each like the free runs; the ratio is the mask's whole cost.
The baseline is the reference's decode loop on the same weights (cache grown by torch.cat, NaN/Inf .any()
checks on every tensor, masks rebuilt and K/V repeat_interleave'd each step)."""


def render(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """One model's markdown table (a column per dtype and thread count, in the order run), then the decode
    step each column ran, in full."""
    cols = list(results)
    any_res = next(iter(results.values()))
    fmt_args = {"P": meta["prompt_tokens"], "A": any_res.get("audio_seconds", 10),
                "S": any_res.get("speech_seconds", 0)}
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, key, fmt in ROWS:
        cells = ["–" if results[d].get(key) is None else fmt.format(results[d][key]) for d in cols]
        if any(c != "–" for c in cells):
            lines.append(f"| {label.format(**fmt_args)} | " + " | ".join(cells) + " |")
    lines.append("\nDecode step that ran: " + "; ".join(f"{c}: {results[c]['decode_kernel_full']}" for c in cols) + ".")
    return "\n".join(lines)


def thread_counts(text: str | None) -> list[int | None]:
    """--threads as a list of counts: comma-separated positive integers or "all" (the physical cores, as serve.py
    defaults to); None: one run at the CLIs' default. Raises ValueError naming what is wrong."""
    if text is None:
        return [None]
    from utils.base.cpus import physical_cores

    counts: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        n = physical_cores() if part == "all" else int(part) if part.isdigit() else 0
        if n < 1:
            raise ValueError(f"{part!r} is not a positive integer or 'all'")
        if n in counts:
            raise ValueError(f"{n} given twice")
        counts.append(n)
    return counts


def column(dtype: str, threads: int | None, several: bool) -> str:
    """The table column (and JSON key) of a run: the dtype, with its thread count when several are compared."""
    return f"{dtype} ({threads} thread{'s' if threads != 1 else ''})" if several else dtype


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short prompts, few tokens, few repeats: a smoke run")
    ap.add_argument("--json_out", help="also write the results as JSON here")
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default: all; with --quick: "
                                     f"{','.join(QUICK_MODELS)})")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of " + ",".join(DTYPES))
    ap.add_argument("--threads", default=None,
                    help="torch and C-step threads (as --threads of the CLIs; default 1, or OMP_NUM_THREADS when set); "
                         "a comma-separated list (e.g. 1,2 or 1,all: all = the physical cores) runs each count")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--version", action="version", version=version_text("bench.py"),
                    help="print the suite's, torch's and Python's versions and exit")
    args = ap.parse_args(argv)

    try:
        threads = thread_counts(args.threads)
    except ValueError as e:
        ap.error(f"--threads: {e}")
    if args.worker:
        args.threads = threads[0]
        print(json.dumps(worker(args)))
        return 0

    models = [m.strip() for m in (args.models or ",".join(QUICK_MODELS if args.quick else MODELS)).split(",")
              if m.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if [m for m in models if m not in MODELS] or not models:
        ap.error(f"--models: use a subset of {', '.join(MODELS)}")
    if [d for d in dtypes if d not in DTYPES] or not dtypes:
        ap.error(f"--dtypes: use a subset of {', '.join(DTYPES)}")
    from tools.bench_models import write_thinker_tree, write_tree

    t_start = time.perf_counter()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="muomni_bench_") as tmp:
        for m in models:
            if m == "tiny":
                log("writing the random tiny checkpoint tree")
                write_tree(Path(tmp) / m)  # tools.bench_models
            elif m in THINKER_ONLY:
                log(f"writing the random {m} thinker")
                write_thinker_tree(Path(tmp) / m, m)
        for m in models:
            for d in dtypes:
                for t in threads:
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{m}:{d}", "--tree", tmp]
                    if args.quick:
                        cmd.append("--quick")
                    if t is not None:
                        cmd += ["--threads", str(t)]
                    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
                    if proc.returncode != 0:
                        log(f"{m} {d}: worker failed (exit {proc.returncode})")
                        return 1
                    col = column(d, t, len(threads) > 1)
                    results.setdefault(m, {})[col] = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch
    first = next(iter(next(iter(results.values())).values()))
    counts = sorted({r["threads"] for res in results.values() for r in res.values()})
    meta = {"prompt_tokens": first["prompt_tokens"], "new_tokens": 32 if args.quick else 64,
            "quick": args.quick, "threads": counts[0] if len(counts) == 1 else counts, "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "wall_s": round(time.perf_counter() - t_start, 1)}
    print(f"μOmni benchmark (torch {meta['torch']}, {' and '.join(map(str, counts))} thread(s), "
          f"{meta['cpu_count']} CPUs"
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
