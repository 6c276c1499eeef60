"""Speech out: Talker codes -> RVQ mel frames (12.5 Hz, 80 ms each) -> 16 kHz waveform.

The μOmni Talker is an unconditional language model over two-codebook speech codes: it never sees the
answer text (spec §2). So the number of frames is chosen from the answer's length (about 5 frames per
word: 12.5 frames per second of speech at ~2.5 words per second), or given explicitly.

Generation runs on the Thinker's engine, one row of its KV slots (utils.engine.generation.Slots: the same cache
placement, prefill and decode step): a causal prefill of [start, emb(0)+emb(0)] at positions 0 and 1, then one
frame per step, each frame attending to every earlier position ("causal", the default). The "reference"
decode_attention mode reproduces the reference implementation's defect (each new frame attends only to the
`start` slot), for comparison only. The Scheduler above the slots does not fit the Talker, so `generate_codes`
picks the codes itself: the Scheduler's rows emit token ids one by one, stop at EOS, keep a repetition-penalty
mask over a vocabulary and go through the int8 greedy screen, while a talker frame is a pair of codes sampled
from a pair of logits, with no end token and a fixed frame count.

Timing: each talker frame is 80 ms (1280 samples at 16 kHz). The reference fed these frames straight into a
hop-256 vocoder, so its speech ran 5x too fast. Here the mel is first stretched (linear interpolation) to the
vocoder's hop, so the waveform lasts exactly 80 ms per frame, with HiFi-GAN or with Griffin-Lim.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from models.talker import RVQ, TalkerTiny
from models.vocoder import HiFiGANGenerator, griffin_lim, mel_to_magnitude
from utils.media.audio import SAMPLE_RATE, change_tempo, encode_audio, mel_filterbank, write_audio
from utils.base.errors import OmniError
from utils.base.defaults import DECODE_ATTENTION, VOCODERS
from utils.base.options import SamplingOptions
from utils.engine.generation import Slots
from utils.engine.sampling import sample

FRAME_RATE = 12.5  # talker frames per second
FRAME_SAMPLES = 1280  # 80 ms at 16 kHz: the talker's training mel hop
TALKER_N_FFT = 1024  # the talker's training mel: n_fft 1024, win 1024, hop 1280, power, 128 HTK bands
FRAMES_PER_WORD = 5  # 12.5 frames/s at ~2.5 words/s
GRIFFIN_LIM_HOP = 256  # Griffin-Lim needs overlapping frames: run it on the mel stretched to hop 256
GRIFFIN_LIM_ITERS = 32

Progress = Callable[[int], None]


@dataclass
class SpeechOptions:
    """How the Talker picks codes: greedy (temperature 0, argmax of each head) unless told otherwise."""
    temperature: float = 0.0
    top_k: int = 0
    seed: int | None = None
    decode_attention: str = DECODE_ATTENTION[0]

    def check(self) -> None:
        if self.temperature < 0:
            raise OmniError(f"audio temperature {self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise OmniError(f"audio top_k {self.top_k}: must be >= 0")
        if self.decode_attention not in DECODE_ATTENTION:
            raise OmniError(f"decode_attention {self.decode_attention!r}: use one of {', '.join(DECODE_ATTENTION)}")


@dataclass
class Speech:
    """A synthesised utterance: mono float32 waveform in [-1, 1] plus how it was made."""
    wave: np.ndarray
    sample_rate: int
    codes: torch.Tensor  # (frames, 2) talker codes
    vocoder: str  # "hifigan" or "griffin-lim"
    notes: list[str] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])

    @property
    def seconds(self) -> float:
        return self.wave.shape[0] / self.sample_rate

    def at_speed(self, speed: float) -> "Speech":
        """The utterance `speed` times faster (0.25 to 4), at the same pitch (utils.media.audio.change_tempo)."""
        if speed == 1:
            return self
        return replace(self, wave=change_tempo(self.wave, self.sample_rate, speed))

    def encoded(self, fmt: str = "wav") -> bytes:
        """The utterance as a complete file in memory in `fmt`: wav, mp3, opus, aac, flac or pcm (raw 16-bit)."""
        return encode_audio(self.wave, self.sample_rate, fmt)

    def write(self, path: str | os.PathLike, flag: str = "--audio_out") -> str:
        """Write the utterance atomically, in the format its suffix names (WAV otherwise); returns that format."""
        return write_audio(path, self.wave, self.sample_rate, flag)


def frames_for_text(text: str) -> int:
    """Talker frames for speaking `text`: 5 per word (12.5 frames/s at ~2.5 words/s); texts written without
    spaces count one word per 6 characters."""
    words = max(len(text.split()), math.ceil(len(text.strip()) / 6) if " " not in text.strip() else 0)
    return FRAMES_PER_WORD * words


def max_talker_frames(talker: TalkerTiny) -> int:
    """Most frames one generation can hold: the rotary table covers the start slot, [0,0] and the frames."""
    return talker.rotary.max_len - 2


@torch.inference_mode()
def generate_codes(talker: TalkerTiny, n_frames: int, opts: SpeechOptions | None = None,
                   progress: Progress | None = None) -> torch.Tensor:
    """`n_frames` (base, residual) code frames (n_frames, 2), long, on the CPU, starting from frame [0, 0]."""
    opts = opts or SpeechOptions()
    opts.check()
    limit = max_talker_frames(talker)
    if not 1 <= n_frames <= limit:
        raise OmniError(f"speech of {n_frames} frames: the talker generates 1 to {limit} frames "
                        f"({limit / FRAME_RATE:.0f} s) at a time")
    device = talker.start.device
    generator = torch.Generator(device=device).manual_seed(opts.seed) if opts.seed is not None else None
    sampling = SamplingOptions(temperature=opts.temperature, top_k=opts.top_k,
                               decode_attention=opts.decode_attention, max_new_tokens=n_frames - 1)
    first = torch.zeros(1, 1, 2, dtype=torch.long, device=device)
    prompt = torch.cat([talker.start, talker.embed(first)], dim=1)  # positions 0 (start slot) and 1 (frame [0,0])
    slots = Slots(talker, 1, 2 + n_frames - 1, sampling, longest=2)  # the last frame is never fed back
    slot = slots.place(2, n_frames - 1)
    base, res = slots.prefill(slot, prompt[0])
    codes = torch.empty(n_frames, 2, dtype=torch.long, device=device)
    for i in range(n_frames):
        frame = torch.stack([sample(base, sampling, generator), sample(res, sampling, generator)], dim=-1)
        codes[i] = frame[0]
        if progress is not None:
            progress(1)
        if i + 1 == n_frames:
            break
        base, res = slots.step(frame)
    return codes.cpu()


@torch.inference_mode()
def codes_to_mel(rvq: RVQ, codes: torch.Tensor) -> torch.Tensor:
    """RVQ decode: (frames, 2) codes -> (frames, n_mels) float32 power-mel frames at 12.5 Hz."""
    p = next(rvq.parameters())
    return rvq.decode(codes.to(p.device)).float().cpu()


def stretch_mel(mel: torch.Tensor, hop: int) -> torch.Tensor:
    """(T, n_mels) frames 80 ms apart -> (ceil(T*1280/hop), n_mels) frames `hop` samples apart (linear)."""
    n = math.ceil(mel.shape[0] * FRAME_SAMPLES / hop)
    if n == mel.shape[0]:
        return mel
    return F.interpolate(mel.T[None], size=n, mode="linear", align_corners=False)[0].T.contiguous()


def fit_length(wave: torch.Tensor, n: int) -> torch.Tensor:
    """Trim or zero-pad a 1-D waveform to exactly n samples."""
    return wave[:n] if wave.shape[0] >= n else F.pad(wave, (0, n - wave.shape[0]))


@torch.inference_mode()
def vocode_hifigan(vocoder: HiFiGANGenerator, mel: torch.Tensor) -> torch.Tensor:
    """Talker mel (T, n_mels) -> waveform (T*1280,) with the HiFi-GAN generator at its own hop."""
    p = next(vocoder.parameters())
    if mel.shape[1] != vocoder.cfg.n_mels:
        raise OmniError(f"vocoder expects {vocoder.cfg.n_mels} mel bands but the talker's RVQ gives {mel.shape[1]}")
    stretched = stretch_mel(mel, vocoder.cfg.hop_length)
    wave = vocoder(stretched.T[None].to(p.device, p.dtype))[0, 0].float().cpu()
    return fit_length(wave, mel.shape[0] * FRAME_SAMPLES)


def vocode_griffin_lim(mel: torch.Tensor, n_iter: int = GRIFFIN_LIM_ITERS, progress: Progress | None = None,
                       seed: int = 0) -> torch.Tensor:
    """Talker power mel (T, n_mels) -> waveform (T*1280,) by Griffin-Lim (n_fft 1024, win 1024) on the mel
    stretched to hop 256, through the pseudo-inverse of the mel filterbank."""
    fb = mel_filterbank(TALKER_N_FFT // 2 + 1, mel.shape[1], SAMPLE_RATE)
    stretched = stretch_mel(mel.float().cpu(), GRIFFIN_LIM_HOP)
    # centred STFT frames sit at 0, hop, ..., n*hop: one more frame than hops, so repeat the last one.
    stretched = torch.cat([stretched, stretched[-1:]], dim=0)
    magnitude = mel_to_magnitude(stretched, fb)
    n = mel.shape[0] * FRAME_SAMPLES
    wave = griffin_lim(magnitude, TALKER_N_FFT, GRIFFIN_LIM_HOP, TALKER_N_FFT, n_iter=n_iter,
                       length=(stretched.shape[0] - 1) * GRIFFIN_LIM_HOP, seed=seed, progress=progress)
    return fit_length(wave, n)


def choose_vocoder(vocoder: HiFiGANGenerator | None, which: str = "auto") -> str:
    if which not in VOCODERS:
        raise OmniError(f"vocoder {which!r}: use one of {', '.join(VOCODERS)}")
    if which == "hifigan" and vocoder is None:
        raise OmniError("--vocoder hifigan: no HiFi-GAN checkpoint (vocoder.pt or hifigan.pt) was found")
    if which == "auto":
        return "hifigan" if vocoder is not None else "griffin-lim"
    return which


def synthesize(talker: TalkerTiny, rvq: RVQ, vocoder: HiFiGANGenerator | None, n_frames: int,
               opts: SpeechOptions | None = None, which: str = "auto",
               progress: Progress | None = None) -> Speech:
    """Talker codes -> mel -> 16 kHz waveform lasting n_frames * 80 ms. Errors propagate: no fallback tone."""
    kind = choose_vocoder(vocoder, which)
    codes = generate_codes(talker, n_frames, opts, progress)
    mel = codes_to_mel(rvq, codes)
    if kind == "hifigan":
        wave = vocode_hifigan(vocoder, mel)
    else:
        wave = vocode_griffin_lim(mel, progress=progress)
    wave = wave.numpy().astype(np.float32)
    if not np.isfinite(wave).all():
        raise OmniError(f"speech synthesis produced NaN or infinite samples ({kind} vocoder); nothing was written")
    notes = []
    peak = float(np.abs(wave).max(initial=0.0))
    if peak > 1.0:  # Griffin-Lim keeps the mel's loudness, which may exceed full scale: scale, never clip
        wave = wave * (0.99 / peak)
        notes.append(f"speech scaled down by {peak / 0.99:.2f}x to avoid clipping")
    return Speech(wave, SAMPLE_RATE, codes, kind, notes)
