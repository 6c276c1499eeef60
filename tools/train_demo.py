#!/usr/bin/env python3
"""Train the μOmni demo model on synthetic data and write it in the trainers' layout.

    python tools/train_demo.py [--out checkpoints/demo] [--seed 0] [--quick]
    python tools/train_demo.py --ocr_only [--out checkpoints/demo]   # (re)train only the OCR model


Writes, under --out: thinker_tiny/ (thinker.pt, tokenizer.model), omni_sft_tiny/omni.pt, vision_tiny/vision.pt,
audio_enc_tiny/ (audio_enc.pt, audio_enc_metadata.json), talker_tiny/talker.pt, configs/*.json and
generation_config.json (--ocr_only: ocr_tiny/ and configs/ocr_tiny.json alone, see tools/ocr_demo.py; its recipe
reads about 37% of held-out text images exactly, so the shipped demo has no OCR model yet). The model answers three
kinds of questions:

  image   one filled red/green/blue/yellow/purple/orange circle, square or triangle on a light background
          -> "a red circle" (video: the shapes in order, "a red circle, a blue square and a green triangle")
  speech  the same phrases spoken by espeak-ng -> "--transcribe" (CTC head) and "What did you hear?"
  text    "What is A plus B?" for digits A and B -> the sum in digits

Training needs the espeak-ng program for the speech data (Debian/Ubuntu: apt-get install -y espeak-ng);
inference does not. Runs on CPU: about 4 minutes on 2 idle cores (several times longer when other jobs
share them). Seeded: the same seed, thread count and library versions give the same weights.

Stages: tokenizer (SentencePiece BPE) -> vision encoder (ViT, class + dense geometry + attention targets)
-> speech synthesis -> audio encoder (CTC) -> thinker text pretraining -> omni SFT (thinker + projectors on
frozen encoder outputs) -> RVQ codec + talker on 12.5 Hz mel frames of the speech.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.audio import AudioEncoderConfig, AudioEncoderTiny  # noqa: E402
from models.layers import BlockConfig  # noqa: E402
from models.talker import RVQ, TalkerConfig, TalkerTiny  # noqa: E402
from models.thinker import ThinkerConfig, ThinkerLM  # noqa: E402
from models.vision import ViTConfig, ViTTiny, sincos_positions  # noqa: E402
from tools import ocr_demo, synth  # noqa: E402
from tools.ocr_demo import OCRRecipe  # noqa: E402
from utils.media.audio import power_mel  # noqa: E402
from utils.media.image import preprocess_image  # noqa: E402

BOS, EOS = 1, 2
CTC_CHARS = ["<BLANK>", "<UNK>", " "] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
TALKER_MEL = {"n_fft": 1024, "hop_length": 1280, "win_length": 1024}  # 12.5 Hz frames (80 ms)
COLOURS = list(synth.COLOURS)


@dataclass
class Recipe:
    # sizes
    vocab_size: int = 512           # upper bound: SentencePiece stops earlier on this small corpus
    thinker_d: int = 128
    thinker_layers: int = 4
    thinker_heads: int = 4
    thinker_ff: int = 384
    ctx_len: int = 512
    vit_d: int = 64
    vit_layers: int = 2
    vit_heads: int = 2
    audio_d: int = 96
    audio_layers: int = 3
    audio_heads: int = 3
    audio_downsample: int = 4       # 25 Hz frames: fast speech has more characters than 12.5 Hz frames
    talker_d: int = 96
    talker_layers: int = 2
    talker_heads: int = 3
    # data
    n_images: int = 2000
    n_utterances: int = 1800
    # steps (batch sizes below)
    vit_steps: int = 400
    vit_batch: int = 32
    audio_steps: int = 500
    audio_batch: int = 24
    text_steps: int = 150
    sft_steps: int = 900
    sft_batch: int = 32
    rvq_steps: int = 300
    talker_steps: int = 300
    # input scales folded into the first layers when saving (power mel is not log-compressed)
    audio_in_scale: float = 0.05
    rvq_in_scale: float = 0.01

    def quick(self) -> "Recipe":
        """A few-minute smoke run (much weaker model)."""
        for name in ("n_images", "n_utterances"):
            setattr(self, name, getattr(self, name) // 4)
        for name in ("vit_steps", "audio_steps", "text_steps", "sft_steps", "rvq_steps", "talker_steps"):
            setattr(self, name, max(20, getattr(self, name) // 6))
        return self


def log(msg: str) -> None:
    print(f"[train_demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def progress(n: int, desc: str) -> tqdm:
    tty = sys.stderr.isatty()
    return tqdm(range(n), desc=desc, file=sys.stderr, mininterval=0.5 if tty else 30, dynamic_ncols=True,
                leave=tty)


def lr_at(step: int, total: int, peak: float, warmup: int = 30) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float().contiguous() for k, v in module.state_dict().items()}


# ====================================================================== tokenizer

def tokenizer_corpus(rng: random.Random) -> list[str]:
    lines = []
    for _ in range(3):
        for q in synth.IMAGE_QUESTIONS + synth.AUDIO_QUESTIONS:
            lines.append(q)
        for p in synth.ALL_PHRASES:
            lines.append(p)
            lines.append(f"{p}, {rng.choice(synth.ALL_PHRASES)} and {rng.choice(synth.ALL_PHRASES)}")
    for a in range(10):
        for b in range(10):
            lines.append(synth.sum_question(a, b, rng.choice(synth.SUM_TEMPLATES)) + f" {a + b}")
    lines.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-+*/=")
    lines.append("You are an omni assistant.")
    return lines


def train_tokenizer(path: Path, recipe: Recipe, rng: random.Random):
    import sentencepiece as spm

    from utils.media.tokenizer import Tokenizer

    model = io.BytesIO()  # trained from memory: no file paths end up in the model's trainer spec
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(tokenizer_corpus(rng)), model_writer=model, vocab_size=recipe.vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, byte_fallback=True,
        split_digits=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return Tokenizer(path)


# ====================================================================== vision

N_BINS = 8  # boundary-normal orientation bins of the dense geometry targets


def image_pool(n: int, rng: random.Random, desc: str) -> dict[str, torch.Tensor]:
    """n shape pictures preprocessed exactly as at inference (uint8 of the [0,1] tensor), masks, labels."""
    from PIL import Image

    xs = torch.zeros(n, 3, 224, 224, dtype=torch.uint8)
    masks = torch.zeros(n, 224, 224, dtype=torch.uint8)
    colour = torch.zeros(n, dtype=torch.long)
    shape = torch.zeros(n, dtype=torch.long)
    for i in progress(n, desc):
        img, c, s, mask = synth.shape_image(rng, with_mask=True)
        xs[i] = (preprocess_image(img) * 255).round().to(torch.uint8)
        masks[i] = torch.from_numpy(np.array(mask.resize((224, 224), Image.BILINEAR)))
        colour[i], shape[i] = COLOURS.index(c), synth.SHAPES.index(s)
    return {"x": xs, "mask": masks, "colour": colour, "shape": shape}


def geometry_targets(mask: torch.Tensor) -> torch.Tensor:
    """Per 16x16 patch: [coverage, orientation histogram of the boundary normal (N_BINS)], shape (B, 196, 9)."""
    u = (torch.arange(16).float() - 7.5) / 8
    p = mask.unfold(1, 16, 16).unfold(2, 16, 16)
    cover = p.mean((-1, -2))
    gx, gy = (p * u[None, :]).mean((-1, -2)), (p * u[:, None]).mean((-1, -2))
    strength = (gx ** 2 + gy ** 2).sqrt() / 0.25
    theta = torch.arange(N_BINS).float() * 2 * math.pi / N_BINS
    hist = strength[..., None] * torch.cos(torch.atan2(gy, gx)[..., None] - theta).clamp(min=0) ** 4
    return torch.cat([cover[..., None], hist], -1).flatten(1, 2)


def vit_forward_train(vit: ViTTiny, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ViTTiny.forward, also returning block 0's patch tokens and block 1's CLS attention over the patches."""
    z = vit.proj(x).flatten(2).transpose(1, 2)
    z = torch.cat([vit.cls.expand(z.shape[0], -1, -1), z], dim=1) + vit.pos
    hidden = attn = None
    for i, block in enumerate(vit.blocks):
        if i == 1:
            h = block.norm1(z)
            a, w = block.self_attn(h, h, h, need_weights=True, average_attn_weights=True)
            z = z + a
            z = z + block.linear2(F.gelu(block.linear1(block.norm2(z))))
            attn = w[:, 0, 1:]
        else:
            z = block(z)
        if i == 0:
            hidden = z[:, 1:]
    return vit.norm(z)[:, 0], hidden, attn


def train_vision(recipe: Recipe, pool: dict[str, torch.Tensor], val: dict[str, torch.Tensor], seed: int) -> ViTTiny:
    """Class targets on CLS, plus (to make a few hundred CPU steps enough) dense per-patch geometry targets on
    block 0, the pooled geometry on CLS, and block 1's CLS attention steered to the shape's boundary."""
    torch.manual_seed(seed)
    cfg = ViTConfig(d_model=recipe.vit_d, n_layers=recipe.vit_layers, n_heads=recipe.vit_heads,
                    d_ff=4 * recipe.vit_d)
    vit = ViTTiny(cfg)
    with torch.no_grad():
        vit.pos.copy_(sincos_positions(cfg.d_model, cfg.img_size // cfg.patch) * 0.5)
        nn.init.trunc_normal_(vit.cls, std=0.02)
    d = cfg.d_model
    head = nn.Linear(d, len(COLOURS) * len(synth.SHAPES))
    patch_aux, global_aux = nn.Linear(d, 1 + N_BINS), nn.Linear(d, 1 + N_BINS)
    params = [*vit.parameters(), *head.parameters(), *patch_aux.parameters(), *global_aux.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.05)
    label = pool["colour"] * len(synth.SHAPES) + pool["shape"]

    def pooled(t: torch.Tensor) -> torch.Tensor:
        g = t.mean(1)
        return g / g[:, 1:].sum(1, keepdim=True).clamp(min=1e-3)

    ref = pooled(torch.cat([geometry_targets(pool["mask"][i:i + 256].float() / 255) for i in range(0, 1024, 256)]))
    g_mean, g_std = ref.mean(0), ref.std(0) + 1e-6
    gen = torch.Generator().manual_seed(seed)
    bar = progress(recipe.vit_steps, "vision")
    for step in bar:
        set_lr(opt, lr_at(step, recipe.vit_steps, 3e-3))
        idx = torch.randint(0, len(label), (recipe.vit_batch,), generator=gen)
        x, mask = pool["x"][idx].float() / 255, pool["mask"][idx].float() / 255
        flip = torch.rand(len(idx), generator=gen) < 0.5  # mirror images left-right (labels unchanged)
        x[flip], mask[flip] = x[flip].flip(-1), mask[flip].flip(-1)
        cls, hidden, attn = vit_forward_train(vit, x)
        geo = geometry_targets(mask)
        edge = geo[..., 1:].sum(-1)
        edge = edge / edge.sum(1, keepdim=True).clamp(min=1e-6)
        loss_cls = F.cross_entropy(head(cls), label[idx])
        loss = (loss_cls + 10 * F.mse_loss(patch_aux(hidden), geo)
                + F.mse_loss(global_aux(cls), (pooled(geo) - g_mean) / g_std)
                - (edge * torch.log(attn + 1e-8)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(ce=f"{loss_cls.item():.3f}", refresh=False)
    vit.eval()
    with torch.no_grad():
        pred = torch.cat([head(vit(val["x"][i:i + 100].float() / 255)[0][:, 0]).argmax(-1)
                          for i in range(0, len(val["x"]), 100)])
    acc = (pred == val["colour"] * len(synth.SHAPES) + val["shape"]).float().mean().item()
    log(f"vision: held-out colour+shape accuracy of the training head {acc:.3f}")
    return vit


@torch.no_grad()
def vit_features(vit: ViTTiny, x: torch.Tensor) -> torch.Tensor:
    vit.eval()
    return torch.cat([vit(x[i:i + 100].float() / 255)[0][:, 0] for i in range(0, len(x), 100)])


# ====================================================================== speech

def synthesize(n: int, rng: random.Random) -> list[dict]:
    """n random phrases spoken with random voices (variants included), rates and pitches."""
    jobs = []
    for _ in range(n):
        text = rng.choice(synth.ALL_PHRASES)
        jobs.append((text, synth.random_voice(rng, variants=True), rng.randint(*synth.RATE_RANGE),
                     rng.randint(*synth.PITCH_RANGE)))

    def one(job):
        text, voice, rate, pitch = job
        wave = synth.speak(text, voice, rate, pitch)
        return {"text": text, "mel": power_mel(wave), "talker_mel": power_mel(wave, **TALKER_MEL)}

    out = []
    with ThreadPoolExecutor(max_workers=2) as ex:
        for item in tqdm(ex.map(one, jobs), total=n, desc="speech synthesis", file=sys.stderr,
                         mininterval=0.5 if sys.stderr.isatty() else 30, leave=sys.stderr.isatty()):
            out.append(item)
    return out


def audio_batch(utts: list[dict], idx: list[int], scale: float, rng: random.Random) -> tuple[torch.Tensor, list[int]]:
    """Right-padded (zero = silence) scaled power mel batch with random gain and leading silence, and the
    unpadded length of each row."""
    mels = []
    for i in idx:
        m = utts[i]["mel"] * scale * rng.uniform(0.6, 1.4) ** 2
        mels.append(F.pad(m, (0, 0, rng.randint(0, 12), 0)))
    T = max(m.shape[0] for m in mels)
    return torch.stack([F.pad(m, (0, 0, 0, T - m.shape[0])) for m in mels]), [m.shape[0] for m in mels]


def speech_frames(mel: torch.Tensor, n_out: int, rel: float = 1e-4) -> torch.Tensor:
    """(B, n_out) True for encoder frames from one before the first to one after the last mel frame with
    sound (energy above `rel` times the row's peak)."""
    energy = mel.sum(-1)
    loud = energy > rel * energy.amax(1, keepdim=True)
    step = mel.shape[1] / n_out
    pos = torch.arange(mel.shape[1])[None, :].expand_as(loud)
    first = torch.where(loud, pos, mel.shape[1]).amin(1)
    last = torch.where(loud, pos, -1).amax(1)
    j = torch.arange(n_out)[None, :]
    return (j >= (first[:, None] / step).floor() - 1) & (j <= (last[:, None] / step).floor() + 1)


def out_frames(T: int, downsample: int) -> int:
    for _ in range(int(math.log2(downsample))):
        T = (T + 1) // 2
    return T


def train_audio(recipe: Recipe, utts: list[dict], val: list[dict], seed: int) -> tuple[AudioEncoderTiny, nn.Linear]:
    """CTC over characters, plus colour/shape classification of the mean frame to speed up learning."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    cfg = AudioEncoderConfig(d_model=recipe.audio_d, n_layers=recipe.audio_layers, n_heads=recipe.audio_heads,
                             d_ff=4 * recipe.audio_d, downsample=recipe.audio_downsample)
    enc = AudioEncoderTiny(cfg)
    head = nn.Linear(cfg.d_model, len(CTC_CHARS))
    aux_c, aux_s = nn.Linear(cfg.d_model, len(COLOURS)), nn.Linear(cfg.d_model, len(synth.SHAPES))
    params = [*enc.parameters(), *head.parameters(), *aux_c.parameters(), *aux_s.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    c2i = {c: i for i, c in enumerate(CTC_CHARS)}

    def words(text: str) -> tuple[int, int]:
        _, colour, shape = text.split()
        return COLOURS.index(colour), synth.SHAPES.index(shape)

    # batches of similar lengths: the encoder attends over padding too, so keep it short; the CTC alignment
    # uses each row's own frames only (inference sees no padding)
    by_len = sorted(range(len(utts)), key=lambda i: utts[i]["mel"].shape[0])
    bar = progress(recipe.audio_steps, "audio encoder")
    for step in bar:
        set_lr(opt, lr_at(step, recipe.audio_steps, 2e-3))
        start = rng.randrange(len(by_len) - recipe.audio_batch + 1)
        idx = by_len[start:start + recipe.audio_batch]
        mel, lengths = audio_batch(utts, idx, recipe.audio_in_scale, rng)
        feats = enc(mel)
        # letters may only be emitted on frames near speech: silent frames are identical inputs to an encoder
        # without positions, so letters placed there stay diffuse and greedy decoding drops them
        logp = head(feats).log_softmax(-1).masked_fill(~speech_frames(mel, feats.shape[1])[..., None]
                                                       & (torch.arange(len(CTC_CHARS)) > 0), -1e4)
        logp = logp.transpose(0, 1)
        targets = [torch.tensor([c2i.get(ch, 1) for ch in utts[i]["text"]]) for i in idx]
        loss_ctc = F.ctc_loss(logp, torch.cat(targets),
                              torch.tensor([out_frames(n, recipe.audio_downsample) for n in lengths]),
                              torch.tensor([len(t) for t in targets]), blank=0, zero_infinity=True)
        if step >= recipe.audio_steps // 4:
            # frame-level targets on the best CTC path sharpen the output into one peak per letter, which is
            # what greedy decoding needs
            lp = logp.detach().transpose(0, 1).numpy()
            frames = torch.full(feats.shape[:2], -100, dtype=torch.long)
            for b, n in enumerate(lengths):
                m = out_frames(n, recipe.audio_downsample)
                frames[b, :m] = torch.from_numpy(ctc_best_path(lp[b, :m], targets[b].tolist()))
            loss_ctc = loss_ctc + F.cross_entropy(logp.transpose(0, 1).flatten(0, 1), frames.flatten(),
                                                  ignore_index=-100)
        cs = torch.tensor([words(utts[i]["text"]) for i in idx])
        valid = torch.arange(feats.shape[1])[None, :] < torch.tensor(
            [out_frames(n, recipe.audio_downsample) for n in lengths])[:, None]
        pooled = (feats * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        loss = loss_ctc + 0.5 * (F.cross_entropy(aux_c(pooled), cs[:, 0]) + F.cross_entropy(aux_s(pooled), cs[:, 1]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(ctc=f"{loss_ctc.item():.3f}", refresh=False)
    enc.eval()
    from models.audio import ctc_greedy_decode
    i2c = {i: c for i, c in enumerate(CTC_CHARS)}
    with torch.no_grad():
        hits = sum(ctc_greedy_decode(head(enc(u["mel"][None] * recipe.audio_in_scale)[0]), i2c) == u["text"]
                   for u in val)
    log(f"audio: held-out transcript exact match {hits / max(1, len(val)):.3f}")
    return enc, head


def ctc_best_path(logp: np.ndarray, target: list[int]) -> np.ndarray:
    """Most probable CTC alignment (Viterbi) of `target` to frame log-probabilities (T, C): a label per frame."""
    ext = [0]
    for t in target:
        ext += [t, 0]
    S, T = len(ext), logp.shape[0]
    ext_a = np.array(ext)
    skip = np.zeros(S, dtype=bool)  # s may come from s-2: a label that differs from the one two back
    skip[2:] = (ext_a[2:] != 0) & (ext_a[2:] != ext_a[:-2])
    score = np.full((T, S), -np.inf)
    back = np.zeros((T, S), dtype=np.int64)
    score[0, 0] = logp[0, 0]
    if S > 1:
        score[0, 1] = logp[0, ext[1]]
    emit = logp[:, ext_a]
    for t in range(1, T):
        prev = score[t - 1]
        cand = np.stack([prev, np.concatenate([[-np.inf], prev[:-1]]),
                         np.where(skip, np.concatenate([[-np.inf, -np.inf], prev[:-2]]), -np.inf)])
        back[t] = cand.argmax(0)
        score[t] = cand.max(0) + emit[t]
    s = S - 1 if S == 1 or score[-1, S - 1] >= score[-1, S - 2] else S - 2
    path = np.zeros(T, dtype=np.int64)
    for t in range(T - 1, -1, -1):
        path[t] = ext[s]
        s -= back[t, s]
    return path


def fold_input_scale(conv: nn.Conv2d | nn.Linear, scale: float) -> None:
    """layer(scale * x) == layer'(x): scale the weights, keep the bias."""
    with torch.no_grad():
        conv.weight.mul_(scale)


# ====================================================================== thinker data

@dataclass
class Example:
    ids: list[int]          # [BOS] + question + answer + [EOS]
    n_prompt: int           # BOS + question tokens (no loss on them)
    image: list[int] | None = None   # indices into the image feature table (one token each)
    audio: int | None = None         # index into the audio feature list


def video_answer(labels: list[tuple[int, int]]) -> str:
    phrases = [synth.phrase(COLOURS[c], synth.SHAPES[s]) for c, s in labels]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


class ThinkerData:
    def __init__(self, tok, rng: random.Random, image_labels: list[tuple[int, int]] | None = None,
                 audio_texts: list[str] | None = None) -> None:
        self.tok, self.rng = tok, rng
        self.image_labels, self.audio_texts = image_labels or [], audio_texts or []
        self.by_label: dict[tuple[int, int], list[int]] = {}
        for i, lab in enumerate(self.image_labels):
            self.by_label.setdefault(lab, []).append(i)

    def qa(self, question: str, answer: str) -> tuple[list[int], int]:
        q = [BOS] + self.tok.encode(question)
        return q + self.tok.encode(answer) + [EOS], len(q)

    def sum_example(self) -> Example:
        a, b = self.rng.randrange(10), self.rng.randrange(10)
        ids, n = self.qa(synth.sum_question(a, b, self.rng.choice(synth.SUM_TEMPLATES)), str(a + b))
        return Example(ids, n)

    def image_question(self) -> str:
        return "" if self.rng.random() < 0.05 else self.rng.choice(synth.IMAGE_QUESTIONS)

    def image_example(self) -> Example:
        i = self.rng.randrange(len(self.image_labels))
        c, s = self.image_labels[i]
        ids, n = self.qa(self.image_question(), synth.phrase(COLOURS[c], synth.SHAPES[s]))
        return Example(ids, n, image=[i])

    def video_example(self) -> Example:
        """Frames sampled as the video loader does (i*total/(n+1)) from a clip of 1-3 still shapes."""
        n_frames = self.rng.choice([4, 4, 4, 2, 3, 5, 6, 8])
        labels = self.rng.sample(sorted(self.by_label), self.rng.randint(1, 3))
        total = 24 * len(labels)
        seg = [min(len(labels) - 1, (i * total // (n_frames + 1)) // 24) for i in range(1, n_frames + 1)]
        frames = [self.rng.choice(self.by_label[labels[k]]) for k in seg]
        shown = [labels[k] for j, k in enumerate(seg) if j == 0 or k != seg[j - 1]]
        ids, n = self.qa(self.image_question(), video_answer(shown))
        return Example(ids, n, image=frames)

    def audio_example(self) -> Example:
        i = self.rng.randrange(len(self.audio_texts))
        q = "" if self.rng.random() < 0.05 else self.rng.choice(synth.AUDIO_QUESTIONS)
        ids, n = self.qa(q, self.audio_texts[i])
        return Example(ids, n, audio=i)


def thinker_batch(thinker: ThinkerLM, examples: list[Example], image_tokens=None,
                  audio_tokens=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input embeddings (B, T, d) and next-token targets (B, T) with -100 where no loss.
    `image_tokens(indices)` and `audio_tokens(index)` give the projected multimodal tokens."""
    seqs, targets = [], []
    for ex in examples:
        parts = []
        if ex.image is not None:
            parts.append(image_tokens(ex.image))
        if ex.audio is not None:
            parts.append(audio_tokens(ex.audio))
        mm = sum(p.shape[0] for p in parts)
        ids = torch.tensor(ex.ids)
        parts.append(thinker.tok_emb(ids))
        seqs.append(torch.cat(parts))
        tgt = torch.full((seqs[-1].shape[0],), -100, dtype=torch.long)
        # position p predicts token p+1: the answer tokens and EOS are the targets
        start = mm + ex.n_prompt - 1
        tgt[start:mm + len(ex.ids) - 1] = ids[ex.n_prompt:]
        targets.append(tgt)
    T = max(s.shape[0] for s in seqs)
    x = torch.stack([F.pad(s, (0, 0, 0, T - s.shape[0])) for s in seqs])
    y = torch.stack([F.pad(t, (0, T - t.shape[0]), value=-100) for t in targets])
    return x, y


def train_thinker(thinker: ThinkerLM, steps: int, batch: int, sample, encode, params: list, lr: float,
                  desc: str) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    thinker.train()
    bar = progress(steps, desc)
    for step in bar:
        set_lr(opt, lr_at(step, steps, lr))
        x, y = encode([sample() for _ in range(batch)])
        logits = thinker(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    thinker.eval()


def make_thinker(recipe: Recipe, vocab: int) -> ThinkerLM:
    block = BlockConfig(d_model=recipe.thinker_d, n_heads=recipe.thinker_heads,
                        n_kv_heads=max(1, recipe.thinker_heads // 2), d_ff=recipe.thinker_ff)
    model = ThinkerLM(ThinkerConfig(vocab_size=vocab, n_layers=recipe.thinker_layers, block=block,
                                    ctx_len=recipe.ctx_len))
    for name, p in model.named_parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
    return model


# ====================================================================== talker

def train_rvq(recipe: Recipe, frames: torch.Tensor, seed: int) -> RVQ:
    """Two-stage residual VQ (straight-through, k-means style init from data) on scaled mel frames."""
    torch.manual_seed(seed)
    rvq = RVQ()
    x_all = frames * recipe.rvq_in_scale
    with torch.no_grad():
        z = rvq.proj_in(x_all)
        pick = torch.randperm(len(z))[:rvq.codebooks[0].weight.shape[0]]
        rvq.codebooks[0].weight.copy_(z[pick])
        q0 = rvq.codebooks[0].weight[((z[:, None] - rvq.codebooks[0].weight) ** 2).sum(-1).argmin(-1)]
        rvq.codebooks[1].weight.copy_((z - q0)[torch.randperm(len(z))[:rvq.codebooks[1].weight.shape[0]]])
    opt = torch.optim.Adam(rvq.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    bar = progress(recipe.rvq_steps, "rvq")
    for step in bar:
        set_lr(opt, lr_at(step, recipe.rvq_steps, 2e-3, warmup=10))
        x = x_all[torch.randint(0, len(x_all), (1024,), generator=gen)]
        residual = rvq.proj_in(x)
        quant, commit = 0, 0
        for cb in rvq.codebooks:
            idx = ((residual.detach()[:, None] - cb.weight) ** 2).sum(-1).argmin(-1)
            q = cb(idx)
            commit = commit + F.mse_loss(q, residual.detach()) + 0.25 * F.mse_loss(residual, q.detach())
            q_st = residual + (q - residual).detach()
            quant = quant + q_st
            residual = residual - q.detach()
        loss = F.mse_loss(rvq.proj_out(quant), x) + commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return rvq


def train_talker(recipe: Recipe, codes: list[torch.Tensor], seed: int) -> TalkerTiny:
    """Next-frame prediction of (base, residual) codes, starting from the [0, 0] frame as at generation."""
    torch.manual_seed(seed)
    block = BlockConfig(d_model=recipe.talker_d, n_heads=recipe.talker_heads,
                        n_kv_heads=max(1, recipe.talker_heads // 2), d_ff=4 * recipe.talker_d)
    talker = TalkerTiny(TalkerConfig(n_layers=recipe.talker_layers, block=block))
    opt = torch.optim.AdamW(talker.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    bar = progress(recipe.talker_steps, "talker")
    for step in bar:
        set_lr(opt, lr_at(step, recipe.talker_steps, 2e-3, warmup=10))
        idx = torch.randint(0, len(codes), (32,), generator=gen).tolist()
        seqs = [codes[i] for i in idx]
        T = max(len(s) for s in seqs)
        tgt = torch.full((len(seqs), T, 2), -100, dtype=torch.long)
        inp = torch.zeros(len(seqs), T, 2, dtype=torch.long)
        for b, s in enumerate(seqs):
            tgt[b, :len(s)] = s
            inp[b, 1:len(s)] = s[:-1]
        base, res = talker(inp)
        loss = (F.cross_entropy(base.flatten(0, 1), tgt[..., 0].flatten(), ignore_index=-100)
                + F.cross_entropy(res.flatten(0, 1), tgt[..., 1].flatten(), ignore_index=-100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(talker.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    talker.eval()
    return talker


# ====================================================================== writing the tree

def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_configs(out: Path, recipe: Recipe, vocab: int, seed: int) -> None:
    thinker = {"vocab_size": vocab, "d_model": recipe.thinker_d, "n_layers": recipe.thinker_layers,
               "n_heads": recipe.thinker_heads, "kv_groups": max(1, recipe.thinker_heads // 2),
               "d_ff": recipe.thinker_ff, "use_gqa": True, "use_swiglu": True, "rope_theta": 10000.0,
               "ctx_len": recipe.ctx_len}
    cfgs = {
        "thinker_tiny": {"save_dir": "checkpoints/thinker_tiny", **thinker, "tokenizer": "checkpoints/thinker_tiny/tokenizer.model",
                         "max_steps": recipe.text_steps, "seed": seed},
        "vision_tiny": {"save_dir": "checkpoints/vision_tiny", "img_size": 224, "patch": 16, "d_model": recipe.vit_d,
                        "n_layers": recipe.vit_layers, "n_heads": recipe.vit_heads, "d_ff": 4 * recipe.vit_d,
                        "max_steps": recipe.vit_steps, "seed": seed},
        "audio_enc_tiny": {"save_dir": "checkpoints/audio_enc_tiny", "sample_rate": 16000, "n_mels": 128,
                           "d_model": recipe.audio_d, "n_layers": recipe.audio_layers, "n_heads": recipe.audio_heads,
                           "d_ff": 4 * recipe.audio_d, "downsample_time": recipe.audio_downsample,
                           "max_steps": recipe.audio_steps, "seed": seed},
        "talker_tiny": {"save_dir": "checkpoints/talker_tiny", "d_model": recipe.talker_d,
                        "n_layers": recipe.talker_layers, "n_heads": recipe.talker_heads,
                        "d_ff": 4 * recipe.talker_d, "codebooks": 2, "codebook_size": 128, "rope_theta": 10000.0,
                        "frame_ms": 80, "max_steps": recipe.talker_steps, "seed": seed},
        "omni_sft_tiny": {"save_dir": "checkpoints/omni_sft_tiny", "thinker_ckpt": "checkpoints/thinker_tiny",
                          "audio_ckpt": "checkpoints/audio_enc_tiny", "vision_ckpt": "checkpoints/vision_tiny",
                          "talker_ckpt": "checkpoints/talker_tiny", "ctx_len": recipe.ctx_len, "thinker": thinker,
                          "max_steps": recipe.sft_steps, "seed": seed},
    }
    for name, cfg in cfgs.items():
        write_json(out / "configs" / f"{name}.json", cfg)
    gen = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": 0, "do_sample": False, "max_new_tokens": 32,
           "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0, "decode_attention": "causal"}
    # beside the root and each directory --ckpt_dir may name: the model was trained with causal attention
    for d in ("", "omni_sft_tiny", "thinker_tiny"):
        write_json(out / d / "generation_config.json", gen)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "checkpoints" / "demo"), help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="a few-minute smoke run (weak model)")
    ap.add_argument("--no_eval", action="store_true", help="skip the held-out evaluation at the end")
    ap.add_argument("--ocr_only", action="store_true",
                    help="train only the OCR model into --out/ocr_tiny (and configs/ocr_tiny.json), leaving the "
                         "other components as they are")
    args = ap.parse_args(argv)
    if args.ocr_only:
        return train_ocr_only(Path(args.out), args.seed, args.threads, args.quick, args.no_eval)
    if not synth.have_espeak():
        ap.error("espeak-ng is not installed; it synthesizes the speech data (apt-get install -y espeak-ng)")
    torch.set_num_threads(args.threads)
    recipe = Recipe().quick() if args.quick else Recipe()
    out = Path(args.out)
    stage = out.parent / f".{out.name}.tmp"
    if stage.exists():
        shutil.rmtree(stage)
    t_start = time.perf_counter()
    seed = args.seed
    log(f"recipe: {json.dumps(asdict(recipe))}")

    dirs = {k: stage / k for k in ("thinker_tiny", "omni_sft_tiny", "vision_tiny", "audio_enc_tiny", "talker_tiny")}
    for d in dirs.values():
        d.mkdir(parents=True)
    tok = train_tokenizer(dirs["thinker_tiny"] / "tokenizer.model", recipe, random.Random(seed))
    vocab = tok.vocab_size
    log(f"tokenizer: {vocab} pieces")

    # ---- vision
    pool = image_pool(recipe.n_images, random.Random(seed + 1), "drawing images")
    val_pool = image_pool(max(100, recipe.n_images // 10), random.Random(seed + 2), "drawing held-out images")
    vit = train_vision(recipe, pool, val_pool, seed + 3)
    torch.save({"vit": cpu_state(vit)}, dirs["vision_tiny"] / "vision.pt")
    image_feats = vit_features(vit, torch.cat([pool["x"], pool["x"].flip(-1)]))
    image_labels = list(zip(pool["colour"].tolist(), pool["shape"].tolist())) * 2
    del pool

    # ---- speech and audio encoder
    utts = synthesize(recipe.n_utterances, random.Random(seed + 4))
    n_val = max(40, len(utts) // 20)
    train_utts, val_utts = utts[n_val:], utts[:n_val]
    enc, ctc_head = train_audio(recipe, train_utts, val_utts, seed + 5)
    with torch.no_grad():
        audio_feats = [enc(u["mel"][None] * recipe.audio_in_scale)[0] for u in train_utts]
    enc_saved = AudioEncoderTiny(enc.cfg)
    enc_saved.load_state_dict(enc.state_dict())
    fold_input_scale(enc_saved.down.net[0] if recipe.audio_downsample == 4 else enc_saved.down[0].net[0],
                     recipe.audio_in_scale)
    torch.save({"enc": cpu_state(enc_saved), "head": cpu_state(ctc_head)}, dirs["audio_enc_tiny"] / "audio_enc.pt")
    write_json(dirs["audio_enc_tiny"] / "audio_enc_metadata.json",
               {"char_to_idx": {c: i for i, c in enumerate(CTC_CHARS)}, "sample_rate": 16000, "n_mels": 128,
                "downsample_time": recipe.audio_downsample, "language": "en"})  # espeak-ng's English voices

    # ---- thinker: text pretraining, then omni SFT
    torch.manual_seed(seed + 6)
    thinker = make_thinker(recipe, vocab)
    data = ThinkerData(tok, random.Random(seed + 7), image_labels, [u["text"] for u in train_utts])
    train_thinker(thinker, recipe.text_steps, recipe.sft_batch, data.sum_example,
                  lambda exs: thinker_batch(thinker, exs, None, None), list(thinker.parameters()), 3e-3,
                  "thinker (text)")
    torch.save({"model": cpu_state(thinker)}, dirs["thinker_tiny"] / "thinker.pt")
    proj_v = nn.Linear(recipe.vit_d, recipe.thinker_d)
    proj_a = nn.Linear(recipe.audio_d, recipe.thinker_d)
    limit = recipe.ctx_len // 4
    mix = [(0.30, data.image_example), (0.20, data.video_example), (0.30, data.audio_example),
           (0.20, data.sum_example)]

    def sample() -> Example:
        r, acc = data.rng.random(), 0.0
        for p, fn in mix:
            acc += p
            if r < acc:
                return fn()
        return mix[-1][1]()

    def encode(exs):
        return thinker_batch(thinker, exs, lambda idx: proj_v(image_feats[idx]),
                             lambda i: proj_a(audio_feats[i][:limit]))

    params = [*thinker.parameters(), *proj_v.parameters(), *proj_a.parameters()]
    train_thinker(thinker, recipe.sft_steps, recipe.sft_batch, sample, encode, params, 2e-3, "omni SFT")
    torch.save({"thinker": cpu_state(thinker), "proj_a": cpu_state(proj_a), "proj_v": cpu_state(proj_v)},
               dirs["omni_sft_tiny"] / "omni.pt")

    # ---- speech out
    frames = torch.cat([u["talker_mel"] for u in utts])
    rvq = train_rvq(recipe, frames, seed + 8)
    with torch.no_grad():
        codes = [rvq.encode(u["talker_mel"] * recipe.rvq_in_scale) for u in utts]
    talker = train_talker(recipe, codes, seed + 9)
    with torch.no_grad():  # fold the input scale: encode/decode work on unscaled power mel
        rvq.proj_in.weight.mul_(recipe.rvq_in_scale)
        rvq.proj_out.weight.div_(recipe.rvq_in_scale)
        rvq.proj_out.bias.div_(recipe.rvq_in_scale)
    torch.save({"rvq": cpu_state(rvq), "talker": cpu_state(talker)}, dirs["talker_tiny"] / "talker.pt")

    write_configs(stage, recipe, vocab, seed)
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    minutes = (time.perf_counter() - t_start) / 60
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2 ** 20
    log(f"wrote {out} ({size:.1f} MB) in {minutes:.1f} min")
    if not args.no_eval:
        from tools.eval_demo import evaluate
        evaluate(out, n=40, seed=12345 + seed)
    return 0


def train_ocr_only(out: Path, seed: int, threads: int, quick: bool, no_eval: bool) -> int:
    """--ocr_only: the OCR model alone, written into an existing demo tree (ocr_tiny/, configs/ocr_tiny.json)."""
    torch.set_num_threads(threads)
    recipe = OCRRecipe().quick() if quick else OCRRecipe()
    log(f"ocr recipe: {json.dumps(asdict(recipe))}")
    t0 = time.perf_counter()
    model = ocr_demo.train(recipe, seed + 10, log)
    stage = out.parent / f".{out.name}.ocr.tmp"
    if stage.exists():
        shutil.rmtree(stage)
    ocr_demo.save(model, recipe, stage, seed + 10)
    if (out / "ocr_tiny").exists():
        shutil.rmtree(out / "ocr_tiny")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (stage / "ocr_tiny").rename(out / "ocr_tiny")
    (stage / "configs" / "ocr_tiny.json").replace(out / "configs" / "ocr_tiny.json")
    shutil.rmtree(stage)
    log(f"wrote {out / 'ocr_tiny'} in {(time.perf_counter() - t0) / 60:.1f} min")
    if not no_eval:
        from omni import load_model
        acc, misses = ocr_demo.accuracy(load_model(out / "ocr_tiny", device="cpu"), 200, 12345 + seed)
        log(f"ocr held-out exact-string accuracy {acc:.3f} on 200 images; misses {misses[:10]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
