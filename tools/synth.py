"""Synthetic data for the demo model: coloured shapes on light backgrounds, espeak-ng speech, sum questions.

Shared by tools/train_demo.py (training data), tools/make_examples.py (examples/), tools/eval_demo.py and
tests/test_demo.py (held-out inputs drawn with fresh seeds). Speech needs the `espeak-ng` program
(Debian/Ubuntu: `apt-get install -y espeak-ng`).
"""
from __future__ import annotations

import io
import random
import shutil
import subprocess

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from utils.media.audio import SAMPLE_RATE, resample

COLOURS = {  # nominal RGB; every drawing jitters it a little
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 70, 215),
    "yellow": (240, 210, 25),
    "purple": (135, 45, 170),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle")

IMAGE_QUESTIONS = (
    "What do you see?",
    "Describe what you see concisely.",
    "What is in the picture?",
    "What is in this image?",
    "Describe the image.",
    "What is shown here?",
    "What shape do you see?",
    "Tell me what you see.",
    "what do you see",
)
AUDIO_QUESTIONS = (
    "What did you hear?",
    "What was said?",
    "Repeat what you heard.",
    "Transcribe the audio.",
    "What does the speaker say?",
    "what did you hear",
)
SUM_TEMPLATES = (
    "What is {a} plus {b}?",
    "what is {a} plus {b}",
    "What is {a} + {b}?",
    "Compute {a} plus {b}.",
    "How much is {a} plus {b}?",
)

VOICES = ("en", "en-us")
# espeak-ng voice variants used for training only (the held-out tests use the plain voices).
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4")
RATE_RANGE = (140, 200)  # words per minute
PITCH_RANGE = (25, 75)   # espeak-ng -p (default 50)


def phrase(colour: str, shape: str) -> str:
    """'a red circle', 'an orange square': the answer and the spoken sentence for one shape."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


ALL_PHRASES = tuple(phrase(c, s) for c in COLOURS for s in SHAPES)


def sum_question(a: int, b: int, template: str = SUM_TEMPLATES[0]) -> str:
    return template.format(a=a, b=b)


# ---------------------------------------------------------------- images

def shape_points(shape: str, x: float, y: float, extent: float) -> list[tuple[float, float]]:
    """Bounding box (circle, square) or vertices (triangle, pointing up) of a shape at (x, y) of size `extent`."""
    if shape == "triangle":
        return [(x + extent / 2, y), (x + extent, y + extent), (x, y + extent)]
    return [(x, y), (x + extent, y + extent)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, extent: float,
               fill: tuple[int, int, int] | int) -> None:
    pts = shape_points(shape, x, y, extent)
    if shape == "circle":
        draw.ellipse(pts, fill=fill)
    elif shape == "square":
        draw.rectangle(pts, fill=fill)
    else:
        draw.polygon(pts, fill=fill)


def jitter_colour(rng: random.Random, rgb: tuple[int, int, int], amount: int = 18) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb)  # type: ignore[return-value]


def light_background(rng: random.Random) -> tuple[int, int, int]:
    if rng.random() < 0.4:
        return (255, 255, 255)
    base = rng.randint(228, 255)
    return tuple(min(255, base + rng.randint(-10, 10)) for _ in range(3))  # type: ignore[return-value]


def add_noise(img: Image.Image, rng: random.Random, max_sigma: float = 6.0) -> Image.Image:
    sigma = rng.uniform(0.0, max_sigma)
    if sigma < 0.5:
        return img
    arr = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(arr.shape, dtype=np.float32)
    return Image.fromarray(np.clip(arr + sigma * noise, 0, 255).astype(np.uint8), "RGB")


def shape_image(rng: random.Random, colour: str | None = None, shape: str | None = None,
                size: int | None = None, noise: bool = True, with_mask: bool = False) -> tuple:
    """One filled shape, a third to two thirds of the picture wide, anywhere on a light background.

    Returns (image, colour, shape), plus the shape's mask (mode "L", 255 inside) when `with_mask`;
    anything not given is drawn from `rng`."""
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    size = size or rng.randint(64, 512)
    img = Image.new("RGB", (size, size), light_background(rng))
    extent = rng.uniform(1 / 3, 2 / 3) * size
    x = rng.uniform(0, size - extent)
    y = rng.uniform(0, size - extent)
    draw_shape(ImageDraw.Draw(img), shape, x, y, extent, jitter_colour(rng, COLOURS[colour]))
    if noise:
        img = add_noise(img, rng)
    if not with_mask:
        return img, colour, shape
    mask = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(mask), shape, x, y, extent, 255)
    return img, colour, shape, mask


# ---------------------------------------------------------------- speech

def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, voice: str = "en", rate: int = 170, pitch: int = 50,
          sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`text` spoken by espeak-ng, as float32 mono at `sample_rate`."""
    if not have_espeak():
        raise RuntimeError("espeak-ng is not installed (Debian/Ubuntu: apt-get install -y espeak-ng)")
    proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                          capture_output=True, check=True)
    wave, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    if wave.ndim > 1:
        wave = wave[:, 0]
    return resample(wave, sr, sample_rate)


def random_voice(rng: random.Random, variants: bool) -> str:
    voice = rng.choice(VOICES)
    return voice + (rng.choice(VARIANTS) if variants else "")


def spoken_phrase(rng: random.Random, variants: bool = False) -> tuple[np.ndarray, str, dict]:
    """A random colour+shape phrase spoken with a random voice, rate and pitch. Returns (wave, text, settings)."""
    text = rng.choice(ALL_PHRASES)
    settings = {"voice": random_voice(rng, variants), "rate": rng.randint(*RATE_RANGE),
                "pitch": rng.randint(*PITCH_RANGE)}
    return speak(text, **settings), text, settings


# ---------------------------------------------------------------- video

def shapes_video_frames(rng: random.Random, scenes: list[tuple[str, str]], frames_per_scene: int,
                        size: int) -> list[Image.Image]:
    """A clip of still shapes shown one after another (each scene drawn once, held for its frames)."""
    frames = []
    for colour, shape in scenes:
        img, _, _ = shape_image(rng, colour, shape, size=size, noise=False)
        frames.extend([img] * frames_per_scene)
    return frames
