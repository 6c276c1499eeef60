#!/usr/bin/env python3
"""Measure the demo model (checkpoints/demo) on held-out inputs generated fresh, through the project's API.

    python tools/eval_demo.py [--ckpt_dir checkpoints/demo] [--n 50] [--seed 12345] [--json]
    python tools/eval_demo.py --ocr [--n 1000]      # the OCR score alone, on --n text images

image     shape pictures (new seeds, sizes 64-512 px, positions, backgrounds); right when the answer
          contains "<colour> <shape>"
sums      "What is A plus B?" for random digits; right when the last number in the answer is A+B
speech    phrases spoken by espeak-ng (voices en / en-us, 140-200 wpm, random pitch): transcript exact
          match (--transcribe) and "What did you hear?" answers containing the phrase. Needs espeak-ng;
          skipped without it.
ocr       text images drawn fresh by tools/ocr_demo.py (new seeds; the same words, numbers, fonts, sizes and
          colours as training): exact-string match of the OCR model's text (when the model has one), on 4 x --n
          images (--ocr: on --n images, the other tasks skipped)
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools import ocr_demo, synth  # noqa: E402

DEFAULT_DIR = REPO / "checkpoints" / "demo"


def image_accuracy(model, n: int, seed: int) -> tuple[float, list[str]]:
    rng = random.Random(seed)
    hits, misses = 0, []
    for i in range(n):
        img, colour, shape = synth.shape_image(rng)
        question = None if i % 2 else rng.choice(("What do you see?", "What is in the picture?"))
        answer = model.chat(question, image=img)
        if f"{colour} {shape}" in answer.lower():
            hits += 1
        else:
            misses.append(f"{colour} {shape} ({img.width}px) -> {answer!r}")
    return hits / n, misses


def last_number(text: str) -> int | None:
    found = re.findall(r"-?\d+", text)
    return int(found[-1]) if found else None


def sum_accuracy(model, n: int, seed: int) -> tuple[float, list[str]]:
    rng = random.Random(seed)
    hits, misses = 0, []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        answer = model.chat(synth.sum_question(a, b))
        if last_number(answer) == a + b:
            hits += 1
        else:
            misses.append(f"{a} plus {b} -> {answer!r}")
    return hits / n, misses


def speech_accuracy(model, n: int, seed: int) -> tuple[float, float, list[str]]:
    """(transcript exact match, spoken-question answer accuracy, misses) on phrases in the plain voices."""
    rng = random.Random(seed)
    exact = heard = 0
    misses = []
    for _ in range(n):
        wave, text, settings = synth.spoken_phrase(rng, variants=False)
        transcript = model.transcribe(wave).text
        answer = model.chat("What did you hear?", audio=wave)
        exact += transcript == text
        heard += text.split(" ", 1)[1] in answer.lower()
        if transcript != text or text.split(" ", 1)[1] not in answer.lower():
            misses.append(f"{text!r} {settings} -> transcript {transcript!r}, answer {answer!r}")
    return exact / n, heard / n, misses


def evaluate(ckpt_dir: str | Path = DEFAULT_DIR, n: int = 50, seed: int = 12345, show_misses: bool = True,
             ocr_only: bool = False) -> dict:
    from omni import OmniError, load_model

    t0 = time.perf_counter()
    model = load_model(ckpt_dir, device="cpu")
    results: dict = {"n": n, "seed": seed}
    if ocr_only:
        if "ocr" not in model.components:
            raise OmniError(f"--ocr: {ckpt_dir} has no OCR model")
        results["ocr_exact_match"], misses = ocr_demo.accuracy(model, n, seed + 3)
        results["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"ocr_exact_match: {results['ocr_exact_match']:.3f} on {n} images ({results['seconds']} s)",
              file=sys.stderr)
        for want, got in misses[:20] if show_misses else []:
            print(f"  miss: ocr {want!r} -> {got!r}", file=sys.stderr)
        return results
    results["image_accuracy"], img_miss = image_accuracy(model, n, seed)
    results["sum_accuracy"], sum_miss = sum_accuracy(model, n, seed + 1)
    speech_miss: list[str] = []
    if synth.have_espeak():
        results["transcript_exact_match"], results["spoken_question_accuracy"], speech_miss = \
            speech_accuracy(model, n, seed + 2)
    else:
        results["speech"] = "skipped: espeak-ng is not installed"
    ocr_miss: list[str] = []
    if "ocr" in model.components:
        results["ocr_exact_match"], misses = ocr_demo.accuracy(model, 4 * n, seed + 3)
        ocr_miss = [f"ocr {want!r} -> {got!r}" for want, got in misses]
    results["seconds"] = round(time.perf_counter() - t0, 1)
    for k, v in results.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) and k != "seconds" else f"{k}: {v}", file=sys.stderr)
    if show_misses:
        for m in (img_miss + sum_miss + speech_miss + ocr_miss)[:20]:
            print(f"  miss: {m}", file=sys.stderr)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", default=str(DEFAULT_DIR))
    ap.add_argument("--n", type=int, default=50, help="samples per task")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    ap.add_argument("--ocr", action="store_true", help="only the OCR model's exact-string accuracy, on --n images")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    from omni import OmniError
    try:
        res = evaluate(args.ckpt_dir, args.n, args.seed, ocr_only=args.ocr)
    except OmniError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
