"""The demo's OCR model: text images rendered here, its training (tools/train_demo.py --ocr_only) and its held-out
accuracy (tools/eval_demo.py --ocr).

Texts: a common short lowercase word or a number 10-999 (half each). Fonts: Pillow's built-in font and the DejaVu
and Liberation TrueType families (Debian: fonts-dejavu-core, fonts-dejavu-extra, fonts-liberation), 16-40 px,
dark on a light background, each in a colour of its own, anywhere in an image of 120-400 x 40-160 px. The font size
is drawn among those at which the text fits and spans at least MIN_SPAN of the image's width (the OCR model sees
the image squeezed to img_size x img_size, as μOmni's OCR does: a tiny word in a wide image would be a few pixels).
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from models.ocr import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, OCRConfig, OCRModel
from models.vision import ViTConfig, sincos_positions

WORDS = ("the and for are but not you all any can had her was one our out day get has him his how man new now old "
         "see two way who boy did its let put say she too use cat dog sun red big box cup hat pen run sit top yes "
         "bus car map key egg bed fox toy ice art open stop exit shop sale book milk home door park road rain snow "
         "time blue green black white water fire lamp tree bird fish cake baby city food gold help hill king lake "
         "left love menu name note page room ship star town west east north south cold warm fast slow good best "
         "free high hot low tea bag pay box").split()
CHARS = list(SPECIAL_TOKENS) + list(" 0123456789abcdefghijklmnopqrstuvwxyz")  # the vocabulary, ids in order
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
MIN_SPAN = 0.3  # the text spans at least this share of the image's width


@dataclass
class OCRRecipe:
    img_size: int = 64
    patch: int = 8
    vision_d: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    decoder_d: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 2
    steps: int = 1500
    batch: int = 32
    lr: float = 1.5e-3
    max_text_length: int = 8  # [<BOS>] + at most 6 characters + [<EOS>]
    curriculum_steps: int = 600  # the text's least span of the width falls from 0.8 to MIN_SPAN over these steps
    # Training sees ink as large positive values: x -> in_scale * (in_shift - x) (dark ink on light ground; the
    # preprocessing has no normalisation), folded into the patch projection when saved (`fold_input`). Without it
    # the text barely moves the patch embeddings and the decoder never learns to look at the image.
    in_scale: float = 4.0
    in_shift: float = 0.85
    pos_scale: float = 0.2  # the 2-D sine/cosine position table's initial size, below the patches' signal

    def quick(self) -> "OCRRecipe":
        """A smoke run (an untrained-looking model)."""
        self.steps = 60
        return self


@lru_cache(maxsize=None)
def font_files() -> tuple[Path, ...]:
    """The DejaVu and Liberation fonts installed here (sorted, so a seed draws the same fonts)."""
    return tuple(sorted(p for d in FONT_DIRS if d.is_dir() for p in d.glob("*.ttf")))


@lru_cache(maxsize=4096)
def font(path: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size) if path == "builtin" else ImageFont.truetype(path, size)


def draw_text(rng: random.Random, min_span: float = MIN_SPAN) -> tuple[Image.Image, str]:
    """One text image and its text (see the module docstring for the distribution; training starts with a larger
    `min_span`: its images are a part of the same distribution)."""
    text = rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(10, 999))
    fonts = ["builtin", *map(str, font_files())]
    while True:  # a font and size whose text fits some image size it spans enough of
        face = font(rng.choice(fonts), rng.randint(16, 40))
        left, top, right, bottom = face.getbbox(text)
        tw, th = right - left, bottom - top
        narrowest, widest = max(120, tw + 4), min(400, int(tw / MIN_SPAN))
        if narrowest <= widest and th + 4 <= 160:
            break
    w = rng.randint(narrowest, max(narrowest, min(widest, int(tw / min_span))))
    h = rng.randint(max(40, th + 4), 160)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (w, h), background)
    x, y = rng.randint(2, w - tw - 2) - left, rng.randint(2, h - th - 2) - top
    ImageDraw.Draw(img).text((x, y), text, font=face, fill=ink)
    return img, text


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """MUOMNI_OCR §4's preprocessing: RGB, bilinear size x size, [0, 1], CHW."""
    arr = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def encode(text: str, length: int) -> list[int]:
    """[<BOS>] + character ids + [<EOS>], right-padded with <PAD> to `length`."""
    ids = [BOS_ID] + [CHARS.index(c) for c in text] + [EOS_ID]
    return ids + [PAD_ID] * (length - len(ids))


def batch(rng: random.Random, n: int, recipe: OCRRecipe, min_span: float = MIN_SPAN
          ) -> tuple[torch.Tensor, torch.Tensor]:
    images, seqs = [], []
    for _ in range(n):
        img, text = draw_text(rng, min_span)
        images.append(to_tensor(img, recipe.img_size))
        seqs.append(encode(text, recipe.max_text_length))
    return torch.stack(images), torch.tensor(seqs)


def make_model(recipe: OCRRecipe) -> OCRModel:
    vision = ViTConfig(d_model=recipe.vision_d, n_layers=recipe.vision_layers, n_heads=recipe.vision_heads,
                       d_ff=4 * recipe.vision_d, patch=recipe.patch, img_size=recipe.img_size)
    cfg = OCRConfig(vision=vision, vocab_size=len(CHARS), d_model=recipe.decoder_d, n_layers=recipe.decoder_layers,
                    n_heads=recipe.decoder_heads, n_kv_heads=recipe.decoder_heads, d_ff=4 * recipe.decoder_d,
                    fused_qkv=True, ffn="swiglu")
    return OCRModel(cfg)


def train(recipe: OCRRecipe, seed: int, log, on_step=None) -> OCRModel:
    """Teacher forcing on freshly drawn batches: cross-entropy over the next character, <PAD> ignored. The
    learning rate is constant after its warm-up, so the first k steps of a run are a k-step run: `on_step(step,
    model)` after every 100th step lets an experiment keep those models."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = make_model(recipe)
    with torch.no_grad():
        model.vision_encoder.pos.copy_(recipe.pos_scale * sincos_positions(recipe.vision_d,
                                                                           recipe.img_size // recipe.patch))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 50))
    t0, seen = time.perf_counter(), 0.0
    for step in range(recipe.steps):
        span = max(MIN_SPAN, 0.8 - (0.8 - MIN_SPAN) * step / recipe.curriculum_steps)
        x, seq = batch(rng, recipe.batch, recipe, span)
        logits = model.run(seq[:, :-1], model.memory(recipe.in_scale * (recipe.in_shift - x)))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1), ignore_index=PAD_ID)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        seen = 0.9 * seen + 0.1 * loss.item() if step else loss.item()
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"ocr step {step}/{recipe.steps}: loss {seen:.3f} ({time.perf_counter() - t0:.0f} s)")
        if on_step is not None and (step + 1) % 100 == 0:
            on_step(step + 1, model)
    return fold_input(model.eval(), recipe)


def fold_input(model: OCRModel, recipe: OCRRecipe) -> OCRModel:
    """Fold the training input map x -> a (c - x) into the patch projection, so that the model takes the plain
    preprocessed image: conv_W,b(a (c - x)) = conv_{-aW, b + a c sum(W)}(x)."""
    proj = model.vision_encoder.proj
    with torch.no_grad():
        proj.bias.add_(recipe.in_scale * recipe.in_shift * proj.weight.sum(dim=(1, 2, 3)))
        proj.weight.mul_(-recipe.in_scale)
    return model


def save(model: OCRModel, recipe: OCRRecipe, out: Path, seed: int) -> None:
    """ocr_tiny/ocr.pt ({"model"}), ocr_tiny/ocr_metadata.json and configs/ocr_tiny.json, as train_ocr.py
    leaves a finished run (the vocabulary in the metadata only)."""
    import json
    d = out / "ocr_tiny"
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}}, d / "ocr.pt")
    meta = {"step": recipe.steps, "epoch": 1, "char_to_idx": {c: i for i, c in enumerate(CHARS)},
            "idx_to_char": {str(i): c for i, c in enumerate(CHARS)}, "vocab_size": len(CHARS),
            "max_text_length": recipe.max_text_length}
    (d / "ocr_metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    cfg = {"save_dir": "checkpoints/ocr_tiny", "img_size": recipe.img_size, "patch": recipe.patch,
           "vision_d_model": recipe.vision_d, "vision_layers": recipe.vision_layers,
           "vision_heads": recipe.vision_heads, "vision_d_ff": 4 * recipe.vision_d,
           "decoder_d_model": recipe.decoder_d, "decoder_layers": recipe.decoder_layers,
           "decoder_heads": recipe.decoder_heads, "decoder_d_ff": 4 * recipe.decoder_d, "use_gqa": False,
           "use_swiglu": True, "dropout": 0.0, "rope_theta": 10000.0, "batch_size": recipe.batch,
           "lr": recipe.lr, "max_steps": recipe.steps, "seed": seed, "recipe": asdict(recipe)}
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "configs" / "ocr_tiny.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def accuracy(model, n: int, seed: int) -> tuple[float, list[tuple[str, str]]]:
    """Exact-string accuracy of `model.ocr` (an omni.OmniModel) on `n` freshly drawn images, and the misses."""
    rng = random.Random(seed)
    misses = []
    for _ in range(n):
        img, text = draw_text(rng)
        got = model.ocr(img).text
        if got != text:
            misses.append((text, got))
    return 1 - len(misses) / n, misses


if __name__ == "__main__":  # an experiment: python -m tools.ocr_demo STEPS OUT (a model every 100 steps: OUT/N)
    import copy
    torch.set_num_threads(1)
    steps, where = int(sys.argv[1]), Path(sys.argv[2])
    r = OCRRecipe(steps=steps)

    def snapshot(step: int, model: OCRModel) -> None:
        """The model after `step` steps, as a `step`-step run saves it (constant learning rate)."""
        saved = fold_input(copy.deepcopy(model).eval(), r)
        save(saved, OCRRecipe(**{**asdict(r), "steps": step}), where / str(step), 10)

    train(r, 10, lambda s: print(time.strftime("%H:%M:%S"), s, file=sys.stderr, flush=True), snapshot)
