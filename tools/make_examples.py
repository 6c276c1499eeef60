#!/usr/bin/env python3
"""Write the sample inputs in examples/: two shape pictures, two text images, a spoken phrase and a short video.

    python tools/make_examples.py [--out examples]

examples/red_circle.png, examples/blue_square.png   256x256 pictures like the demo model's training data
examples/open_sign.png, examples/number_42.png     text images like the OCR model's training data (DejaVu Sans
                                                     Bold "open" on 240x90; Liberation Serif "42" on 130x70)
examples/green_triangle.wav                         "a green triangle" spoken by espeak-ng, 16 kHz mono
examples/shapes.mp4                                  2 s, 12 fps, 160x160 H.264: a red circle, a blue square,
                                                     then a green triangle
examples/phrases.wav, examples/phrases.json          four spoken phrases between silences of known lengths, and
                                                     where each phrase's sound starts and ends (transcription)
The speech needs the espeak-ng program (Debian/Ubuntu: apt-get install -y espeak-ng). Deterministic.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tools import synth  # noqa: E402
from utils.media.audio import SAMPLE_RATE, write_wav  # noqa: E402

VIDEO_SCENES = [("red", "circle"), ("blue", "square"), ("green", "triangle")]
VIDEO_FPS, VIDEO_SIZE, VIDEO_SECONDS = 12, 160, 2
PHRASES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("orange", "circle")]
GAPS = [0.4, 0.7, 0.6, 1.0, 0.4]  # seconds of silence before, between and after the phrases


def write_video(path: Path, frames, fps: int) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height = frames[0].width, frames[0].height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "23", "preset": "medium"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_phrases(out: Path) -> None:
    """PHRASES spoken (espeak-ng's leading and trailing silence cut off) between GAPS of digital silence, and
    the truth: each phrase's text and the seconds where its sound starts and ends."""
    parts, truth, at = [], [], 0
    for i, (colour, shape) in enumerate(PHRASES):
        wave = synth.speak(synth.phrase(colour, shape), "en", 170, 50)
        sound = np.flatnonzero(np.abs(wave) >= 1 / 32768)  # what survives 16-bit PCM
        wave = wave[sound[0]:sound[-1] + 1]
        gap = round(GAPS[i] * SAMPLE_RATE)
        parts += [np.zeros(gap, np.float32), wave]
        at += gap
        truth.append({"text": synth.phrase(colour, shape), "start": at / SAMPLE_RATE,
                      "end": (at + len(wave)) / SAMPLE_RATE})
        at += len(wave)
    parts.append(np.zeros(round(GAPS[-1] * SAMPLE_RATE), np.float32))
    write_wav(out / "phrases.wav", np.concatenate(parts))
    (out / "phrases.json").write_text(json.dumps({"phrases": truth}, indent=1) + "\n")


TEXT_IMAGES = [("open_sign.png", "open", "dejavu/DejaVuSans-Bold.ttf", 34, (240, 90), (250, 236, 200), (120, 20, 20)),
               ("number_42.png", "42", "liberation/LiberationSerif-Regular.ttf", 40, (130, 70), (225, 240, 250),
                (10, 30, 80))]


def write_text_images(out: Path) -> None:
    """TEXT_IMAGES: (file, text, font under /usr/share/fonts/truetype, px, size, background, ink), text centred."""
    from PIL import Image, ImageDraw, ImageFont

    for name, text, font_file, px, size, background, ink in TEXT_IMAGES:
        face = ImageFont.truetype(f"/usr/share/fonts/truetype/{font_file}", px)
        img = Image.new("RGB", size, background)
        left, top, right, bottom = face.getbbox(text)
        xy = ((size[0] - right - left) // 2, (size[1] - bottom - top) // 2)
        ImageDraw.Draw(img).text(xy, text, font=face, fill=ink)
        img.save(out / name, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "examples"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed, (colour, shape) in enumerate([("red", "circle"), ("blue", "square")], start=1):
        img, _, _ = synth.shape_image(random.Random(seed), colour, shape, size=256, noise=False)
        img.save(out / f"{colour}_{shape}.png", optimize=True)
    write_text_images(out)
    if synth.have_espeak():
        write_wav(out / "green_triangle.wav", synth.speak(synth.phrase("green", "triangle"), "en", 160, 50))
        write_phrases(out)
    else:
        print("make_examples: espeak-ng not installed: green_triangle.wav, phrases.wav not written",
              file=sys.stderr)
    per_scene = VIDEO_FPS * VIDEO_SECONDS // len(VIDEO_SCENES)
    write_video(out / "shapes.mp4", synth.shapes_video_frames(random.Random(3), VIDEO_SCENES, per_scene, VIDEO_SIZE),
                VIDEO_FPS)
    for p in sorted(out.iterdir()):
        print(f"{p} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
