#!/usr/bin/env python3
"""Real-time factor of transcription on the demo encoder: long audio built from examples/phrases.wav.

    python tools/transcribe_speed.py [--minutes 10] [--threads 1] [--repeats 3]

The committed example (four phrases between silences) is cut in the middle of its silences and the pieces
are laid end to end, streamed into a temporary 16-bit WAV, until the requested length. The file is then
transcribed through the public API (omni.load_model(...).transcribe), with and without voice activity
splitting; the best of --repeats runs is reported as seconds of compute per second of audio.
tests/test_transcribe.py builds its long files with the same functions.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from utils.media.audio import HOP_LENGTH, SAMPLE_RATE  # noqa: E402

EXAMPLE = REPO / "examples" / "phrases.wav"
TRUTH = REPO / "examples" / "phrases.json"


def example_pieces() -> list[np.ndarray]:
    """examples/phrases.wav cut in the middle of each silence, at 10 ms boundaries (the voice activity
    detector's frame), so pieces laid end to end are judged frame for frame as they are alone."""
    wave = sf.read(str(EXAMPLE), dtype="float32")[0]
    truth = json.loads(TRUTH.read_text())["phrases"]
    cuts = [0] + [round((a["end"] + b["start"]) / 2 * SAMPLE_RATE / HOP_LENGTH) * HOP_LENGTH
                  for a, b in zip(truth, truth[1:])] + [len(wave)]
    return [wave[a:b] for a, b in zip(cuts, cuts[1:])]


def write_repeated(path: Path, pieces: list[np.ndarray], seconds: float) -> list[int]:
    """Pieces in turn until `seconds`, written block by block (the file is never in memory). Returns which
    piece came at each place."""
    order, at = [], 0
    with sf.SoundFile(str(path), "w", SAMPLE_RATE, 1, subtype="PCM_16") as f:
        while at < seconds * SAMPLE_RATE:
            k = len(order) % len(pieces)
            f.write(pieces[k])
            order.append(k)
            at += len(pieces[k])
    return order


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", default=str(REPO / "checkpoints" / "demo" / "audio_enc_tiny"))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from omni import load_model
    torch.set_num_threads(args.threads)
    model = load_model(args.ckpt_dir, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.wav"
        write_repeated(path, example_pieces(), args.minutes * 60)
        seconds = sf.info(str(path)).duration
        for vad in (True, False):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = model.transcribe(str(path), vad=vad)
                best = min(best, time.perf_counter() - start)
            print(f"{'vad' if vad else 'no_vad'}: {seconds:.0f} s of audio in {best:.2f} s, real-time factor "
                  f"{best / seconds:.4f} ({seconds / best:.0f}x real time), {len(result['segments'])} segments, "
                  f"{args.threads} thread(s)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
