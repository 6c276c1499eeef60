"""The Python API: `load_model(path).chat(text, image=..., audio=...)`. The CLIs are thin layers over this."""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import torch
from PIL import Image

from models.audio import ctc_greedy_decode
from utils.audio import load_audio, power_mel
from utils.errors import OmniError
from utils.generation import SamplingOptions, generate
from utils.image import load_image, load_video_frames, preprocess_image
from utils.loading import Components, load_components, to_device

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]
AudioInput = Union[str, os.PathLike, np.ndarray]

IMAGE_PROMPT = "Describe what you see concisely."
AUDIO_PROMPT = "What did you hear?"


@dataclass
class Answer:
    """One generated answer with the numbers `--json` reports."""
    text: str
    token_ids: list[int]
    prompt_tokens: int
    timing: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


def pick_device(device: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; naming an absent device is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise OmniError("--device cuda: no CUDA device is available on this machine")
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise OmniError("--device mps: no Apple MPS device is available on this machine")
    if device not in ("cpu", "cuda", "mps"):
        raise OmniError(f"--device {device}: unknown device (use auto, cpu, cuda or mps)")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class OmniModel:
    """A loaded μOmni model: thinker + whichever encoders, talker and vocoder the checkpoint provides."""

    def __init__(self, comps: Components, device: torch.device, dtype: torch.dtype | None = None,
                 load_seconds: float = 0.0) -> None:
        self.c = comps
        self.device = device
        self.dtype = dtype or torch.float32
        self.load_seconds = load_seconds
        to_device(comps, device, dtype)

    # ------------------------------------------------------------ inputs
    def _need(self, what: str, *attrs: str) -> None:
        for a in attrs:
            if getattr(self.c, a) is None:
                kind = {"vision": "vision", "proj_v": "omni projector", "audio": "audio", "proj_a": "omni projector",
                        "thinker": "thinker", "ctc_head": "CTC head", "ctc_chars": "CTC character map",
                        "talker": "talker", "rvq": "talker"}[a]
                where = self.c.searched.get(a.replace("proj_v", "vision").replace("proj_a", "audio")
                                             .replace("ctc_head", "audio").replace("rvq", "talker"),
                                             self.c.searched.get(a, str(self.c.root)))
                raise OmniError(f"{what} needs a {kind} checkpoint, but none was found (searched {where})")

    def image_tensor(self, image: ImageInput) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image
        if isinstance(image, Image.Image):
            return preprocess_image(image)
        return load_image(image)

    def audio_wave(self, audio: AudioInput) -> np.ndarray:
        if isinstance(audio, np.ndarray):
            wave = audio.astype(np.float32, copy=False)
            if wave.ndim != 1 or wave.size == 0:
                raise OmniError(f"audio array: expected a non-empty 1-D waveform, found shape {wave.shape}")
            return wave
        return load_audio(audio)

    @torch.inference_mode()
    def encode_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """One Thinker token per image: proj_v(ViT cls), shape (N, d)."""
        self._need("an image or video", "vision", "proj_v")
        batch = torch.stack(images).to(self.device, self.dtype)
        cls, _ = self.c.vision(batch)
        return self.c.proj_v(cls[:, 0])

    @torch.inference_mode()
    def encode_audio(self, wave: np.ndarray) -> torch.Tensor:
        """Audio encoder frames, (T', d_audio)."""
        self._need("audio input", "audio")
        mel = power_mel(wave).to(self.device, self.dtype)
        return self.c.audio(mel[None])[0]

    def build_prompt(self, text: str, images: list[torch.Tensor], wave: np.ndarray | None,
                     max_new_tokens: int) -> tuple[torch.Tensor, list[int], list[str]]:
        """Embeddings [image tokens, audio tokens, tok_emb([bos] + encode(text))] and the text ids used."""
        self._need("chat", "thinker")
        notes: list[str] = []
        parts = []
        if images:
            parts.append(self.encode_images(images))
        if wave is not None:
            self._need("audio input", "proj_a")
            frames = self.encode_audio(wave)
            limit = self.c.ctx_len // 4
            if frames.shape[0] > limit:
                notes.append(f"audio trimmed to its first {limit} encoder frames "
                             f"({limit * 0.08:.1f} s) to fit the context of {self.c.ctx_len}")
                frames = frames[:limit]
            with torch.inference_mode():
                parts.append(self.c.proj_a(frames))
        mm_len = sum(p.shape[0] for p in parts)
        ids = self.c.tokenizer.prompt_ids(text)
        budget = self.c.ctx_len - mm_len - max_new_tokens - 1
        if budget < 1:
            raise OmniError(f"--max_new_tokens {max_new_tokens}: no room left for the prompt in the context of "
                            f"{self.c.ctx_len} tokens ({mm_len} used by image/audio)")
        if len(ids) > budget:
            notes.append(f"prompt trimmed from {len(ids)} to {budget} tokens (its end kept) to fit the context "
                         f"of {self.c.ctx_len}")
            ids = ids[:1] + ids[len(ids) - budget + 1:]
        with torch.inference_mode():
            tok = self.c.thinker.tok_emb(torch.tensor(ids, device=self.device))
            embeds = torch.cat(parts + [tok], dim=0)[None]
        return embeds, ids, notes

    def _gather(self, text: str | None, image: ImageInput | list[ImageInput] | None, audio: AudioInput | None,
                video: str | os.PathLike | None, video_frames: int, prompt: str | None) -> tuple[str, list, Any]:
        images = []
        if image is not None:
            for im in image if isinstance(image, (list, tuple)) else [image]:
                images.append(self.image_tensor(im))
        if video is not None:
            images.extend(load_video_frames(video, video_frames))
        wave = self.audio_wave(audio) if audio is not None else None
        if text is None:
            text = prompt if prompt is not None else (IMAGE_PROMPT if images else AUDIO_PROMPT if wave is not None
                                                      else "")
        return text, images, wave

    # ------------------------------------------------------------ chat
    def options(self, **overrides: Any) -> SamplingOptions:
        """Sampling options: library defaults < generation_config.json beside the weights < explicit arguments."""
        gc = self.c.generation_defaults
        opts = SamplingOptions()
        names = {f.name for f in fields(SamplingOptions)}
        for key in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "decode_attention"):
            if key in gc and key in names:
                setattr(opts, key, gc[key])
        if gc.get("do_sample") is False and "temperature" not in overrides:
            opts.temperature = 0.0
        for k, v in overrides.items():
            if k not in names:
                raise TypeError(f"unknown generation option {k!r}")
            if v is not None:
                setattr(opts, k, v)
        return opts

    def answer(self, text: str | None = None, image: ImageInput | list[ImageInput] | None = None,
               audio: AudioInput | None = None, video: str | os.PathLike | None = None, video_frames: int = 4,
               prompt: str | None = None, on_token: Any = None, **gen: Any) -> Answer:
        """Generate one answer with ids and timings; `on_token(id)` is called as each id is produced."""
        opts = self.options(**gen)
        text, images, wave = self._gather(text, image, audio, video, video_frames, prompt)
        t0 = time.perf_counter()
        embeds, ids, notes = self.build_prompt(text, images, wave, opts.max_new_tokens)
        out: list[int] = []
        t_first = None
        for tid in generate(self.c.thinker, embeds, opts, ids):
            if t_first is None:
                t_first = time.perf_counter()
            out.append(tid)
            if on_token is not None:
                on_token(tid)
        t_end = time.perf_counter()
        t_first = t_first or t_end
        decode_s = t_end - t_first
        timing = {"load_s": round(self.load_seconds, 6), "prefill_s": round(t_first - t0, 6),
                  "decode_s": round(decode_s, 6),
                  "decode_tokens_per_s": round((len(out) - 1) / decode_s, 3) if len(out) > 1 and decode_s > 0 else 0.0}
        return Answer(self.c.tokenizer.decode(out), out, embeds.shape[1], timing, notes)

    def chat(self, text: str | None = None, image: ImageInput | list[ImageInput] | None = None,
             audio: AudioInput | None = None, video: str | os.PathLike | None = None, **gen: Any) -> str:
        """The answer text only."""
        return self.answer(text, image=image, audio=audio, video=video, **gen).text

    # ------------------------------------------------------------ transcription
    @torch.inference_mode()
    def transcribe(self, audio: AudioInput) -> str:
        """Greedy CTC transcript from the audio encoder's character head."""
        self._need("--transcribe", "audio", "ctc_head", "ctc_chars")
        frames = self.encode_audio(self.audio_wave(audio))
        return ctc_greedy_decode(self.c.ctc_head(frames).float(), self.c.ctc_chars)


def load_model(path: str | os.PathLike, device: str = "auto", dtype: str | torch.dtype | None = None) -> OmniModel:
    """Load every component found under `path` (see utils.loading) onto `device`."""
    t0 = time.perf_counter()
    dev = pick_device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise OmniError(f"--dtype {dtype}: unknown (use {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's nested-tensor notice for norm_first encoders
        comps = load_components(Path(path))
    return OmniModel(comps, dev, dtype, time.perf_counter() - t0)
