"""The demo's OCR model: text images rendered here, its training (tools/train_demo.py --ocr_only) and its held-out
accuracy (tools/eval_demo.py --ocr).

Texts: a common short lowercase word or a number 10-999 (half each). Fonts: Pillow's built-in font and the DejaVu
and Liberation TrueType families (Debian: fonts-dejavu-core, fonts-dejavu-extra, fonts-liberation), 16-40 px,
dark on a light background, each in a colour of its own, anywhere in an image of 120-400 x 40-160 px. The font size
is drawn among those at which the text fits and spans at least MIN_SPAN of the image's width (the OCR model sees
the image squeezed to img_size x img_size, as μOmni's OCR does: a tiny word in a wide image would be a few pixels).
"""
from __future__ import annotations

import math
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

from models.ocr import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, OCRConfig, OCRModel
from models.vision import ViTConfig, sincos_positions
from utils.media.image import preprocess_image

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
    img_size: int = 128
    patch: int = 16  # an 8 x 8 grid: a patch about a character wide
    vision_d: int = 96
    vision_layers: int = 2
    vision_heads: int = 2
    decoder_d: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 2
    steps: int = 10000
    batch: int = 16
    lr: float = 2.5e-3
    max_text_length: int = 8  # [<BOS>] + at most 6 characters + [<EOS>]
    warmup_steps: int = 150
    attn_weight: float = 1.0  # the cross-attention guidance's share of the loss (training only)
    probe_weight: float = 1.0  # the glimpse probe's share of the loss (training only)
    hide_chars: float = 0.25  # the share of the decoder's input characters replaced by <UNK> in training
    curriculum_steps: int = 4000  # the text's least span of the width falls from 0.8 to MIN_SPAN over these steps
    # Training sees ink as large positive values: x -> in_scale * (in_shift - x) (dark ink on light ground; the
    # preprocessing has no normalisation), folded into the patch projection when saved (`fold_input`). Without it
    # the text barely moves the patch embeddings and the decoder never learns to look at the image.
    in_scale: float = 4.0
    in_shift: float = 0.85
    pos_scale: float = 1.0  # the 2-D sine/cosine position table's initial size

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
    img, text, _ = draw_text_boxes(rng, min_span)
    return img, text


def draw_text_boxes(rng: random.Random, min_span: float = MIN_SPAN
                    ) -> tuple[Image.Image, str, list[tuple[float, float, float, float]]]:
    """`draw_text`, with each character's ink box (x0, y0, x1, y1) in image pixels: training tells the decoder
    where the character it predicts is drawn (`patch_weights`)."""
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
    boxes = []
    for i, ch in enumerate(text):
        pen = x + face.getlength(text[:i])
        c0, _, c1, _ = face.getbbox(ch)
        boxes.append((pen + c0, y + top, pen + max(c1, c0 + 1), y + bottom))
    return img, text, boxes


def patch_weights(boxes: list[tuple[float, float, float, float]], size: tuple[int, int], grid: int) -> np.ndarray:
    """(len(boxes), grid * grid): the share of each patch that each character box covers once the image is
    resized to the square patch grid."""
    w, h = size
    edges = np.arange(grid, dtype=np.float64)
    out = np.zeros((len(boxes), grid * grid), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        ox = np.clip(np.minimum(x1 * grid / w, edges + 1) - np.maximum(x0 * grid / w, edges), 0, None)
        oy = np.clip(np.minimum(y1 * grid / h, edges + 1) - np.maximum(y0 * grid / h, edges), 0, None)
        out[i] = np.outer(oy, ox).ravel()
    return out


def encode(text: str, length: int) -> list[int]:
    """[<BOS>] + character ids + [<EOS>], right-padded with <PAD> to `length`."""
    ids = [BOS_ID] + [CHARS.index(c) for c in text] + [EOS_ID]
    return ids + [PAD_ID] * (length - len(ids))


def batch(rng: random.Random, n: int, recipe: OCRRecipe, min_span: float = MIN_SPAN
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n images preprocessed as inference does (utils.media.image.preprocess_image at the config's img_size),
    their id sequences (n, max_text_length), and where each target character is drawn: (n, max_text_length - 1,
    grid^2), zero rows for <EOS> and padding."""
    grid = recipe.img_size // recipe.patch
    images, seqs = [], []
    where = torch.zeros(n, recipe.max_text_length - 1, grid * grid)
    for b in range(n):
        img, text, boxes = draw_text_boxes(rng, min_span)
        images.append(preprocess_image(img, recipe.img_size))
        seqs.append(encode(text, recipe.max_text_length))
        where[b, :len(text)] = torch.from_numpy(patch_weights(boxes, img.size, grid))
    return torch.stack(images), torch.tensor(seqs), where


def make_model(recipe: OCRRecipe) -> OCRModel:
    vision = ViTConfig(d_model=recipe.vision_d, n_layers=recipe.vision_layers, n_heads=recipe.vision_heads,
                       d_ff=4 * recipe.vision_d, patch=recipe.patch, img_size=recipe.img_size)
    cfg = OCRConfig(vision=vision, vocab_size=len(CHARS), d_model=recipe.decoder_d, n_layers=recipe.decoder_layers,
                    n_heads=recipe.decoder_heads, n_kv_heads=recipe.decoder_heads, d_ff=4 * recipe.decoder_d,
                    fused_qkv=True, ffn="swiglu")
    return OCRModel(cfg)


def forward_train(model: OCRModel, ids: torch.Tensor, images: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OCRModel.run over `ids` with the image memory (teacher forcing, autograd on), also returning the patch
    grid (B, N, dv) and every decoder layer's cross-attention weights averaged over heads (layers, B, T, N): the
    same maths as the blocks, with the attention weights spelled out."""
    _, grid = model.vision_encoder(images)
    dec = model.decoder
    m = dec.img_proj(grid)
    x = dec.char_embed(ids)
    cos, sin = dec.rotary.tables(0, ids.shape[1], None)
    weights = []
    for i, block in enumerate(dec.blocks):
        x = x + block.self_attn(block.norm1(x), cos, sin, i, None, 0, None)
        ca = block.cross_attn
        keys, values = ca.memory(m)
        h = block.norm2(x)
        B, T, d = h.shape
        q = F.linear(h, ca.in_proj_weight[:d], ca.in_proj_bias[:d]).view(B, T, ca.n_heads, ca.head_dim)
        w = torch.softmax(q.transpose(1, 2) @ keys.transpose(-1, -2) * ca.head_dim ** -0.5, dim=-1)
        x = x + ca.out_proj((w @ values).transpose(1, 2).reshape(B, T, d))
        x = x + block.mlp(block.norm3(x))
        weights.append(w.mean(1))
    return dec.head(dec.norm(x)), grid, torch.stack(weights)


def train(recipe: OCRRecipe, seed: int, log) -> OCRModel:
    """Teacher forcing on freshly drawn batches: cross-entropy over the next character, <PAD> ignored. Two
    training-only signals make a CPU budget enough: each decoder layer's cross-attention (averaged over heads) is
    pulled towards the patches where the character it predicts is drawn, and a linear probe reads each character
    off the patch grid pooled over where it is drawn (the probe is not saved). Warm-up, then cosine
    decay of the learning rate."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = make_model(recipe)
    with torch.no_grad():
        model.vision_encoder.pos.copy_(recipe.pos_scale * sincos_positions(recipe.vision_d,
                                                                           recipe.img_size // recipe.patch))
    probe = torch.nn.Linear(recipe.vision_d, len(CHARS))
    params = [*model.parameters(), *probe.parameters()]
    model.train()
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
    warm = recipe.warmup_steps

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, recipe.steps - warm)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    t0, seen = time.perf_counter(), 0.0
    for step in range(recipe.steps):
        span = max(MIN_SPAN, 0.8 - (0.8 - MIN_SPAN) * step / recipe.curriculum_steps)
        x, seq, where = batch(rng, recipe.batch, recipe, span)
        inputs = seq[:, :-1].clone()  # some earlier characters hidden (<UNK>): the image must be read, not guessed
        inputs[(torch.rand(inputs.shape) < recipe.hide_chars) & (inputs > UNK_ID)] = UNK_ID
        logits, grid, attn = forward_train(model, inputs, recipe.in_scale * (recipe.in_shift - x))
        loss_ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1), ignore_index=PAD_ID)
        mass = where.sum(-1)
        target = where / mass.clamp(min=1e-6)[..., None]
        drawn = mass > 0
        loss_attn = -(target * torch.log(attn + 1e-6)).sum(-1)[:, drawn].mean()
        glimpse = probe(target @ grid)  # (B, T, chars): each character read off its own patches
        loss_probe = F.cross_entropy(glimpse[drawn], seq[:, 1:][drawn])
        loss = loss_ce + recipe.attn_weight * loss_attn + recipe.probe_weight * loss_probe
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        seen = 0.9 * seen + 0.1 * loss_ce.item() if step else loss_ce.item()
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"ocr step {step}/{recipe.steps}: loss {seen:.3f} attn {loss_attn.item():.2f} "
                f"probe {loss_probe.item():.2f} ({time.perf_counter() - t0:.0f} s)")
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


if __name__ == "__main__":  # an experiment: python -m tools.ocr_demo OUT [FIELD=VALUE ...] (recipe overrides)
    torch.set_num_threads(1)
    where, fields = Path(sys.argv[1]), dict(a.split("=", 1) for a in sys.argv[2:])
    r = OCRRecipe(**{k: type(getattr(OCRRecipe, k))(v) for k, v in fields.items()})
    save(train(r, 10, lambda s: print(time.strftime("%H:%M:%S"), s, file=sys.stderr, flush=True)), r, where, 10)
