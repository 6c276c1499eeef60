"""Prompt assembly: a chat request's inputs (text, images, video frames, audio clips) decoded and turned into the
Thinker's prompt embeddings, [image tokens, audio tokens, tok_emb([bos] + text)], fitted to the context; and the
validation of one `answer_batch` request. omni.OmniModel builds every prompt through `PromptBuilder`, so the
CLI, the API, batch jobs and the server give a request the same prompt."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Union

import numpy as np
import torch
from PIL import Image

from utils.base.defaults import (AUDIO_PROMPT, DEFAULT_VIDEO_FRAMES, IMAGE_PROMPT, OCR_JOIN, OCR_NO_QUESTION,
                                 OCR_QUESTION)
from utils.base.errors import OmniError
from utils.base.options import BY_NAME, OptionError
from utils.media.audio import check_wave, load_audio, load_audio_bytes, max_audio_seconds, trim_audio
from utils.media.image import IMAGE_SIZE, load_image, load_image_bytes, load_video_frames, preprocess_image
from utils.weights.components import Components

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor, bytes]  # bytes: an encoded image file
AudioInput = Union[str, os.PathLike, np.ndarray, bytes]  # bytes: an encoded audio file
Wave = Union[np.ndarray, list[np.ndarray], None]

# What a missing component is called in messages, and which `Components.searched` entry says where it was sought.
PARTS = {"thinker": ("a thinker checkpoint", "thinker"), "vision": ("a vision encoder checkpoint", "vision"),
         "proj_v": ("an omni checkpoint (proj_v projector)", "vision"),
         "audio": ("an audio encoder checkpoint", "audio"),
         "proj_a": ("an omni checkpoint (proj_a projector)", "audio"),
         "ctc_head": ("a CTC head in the audio encoder checkpoint", "audio"),
         "ctc_chars": ("audio_enc_metadata.json (the CTC character map)", "ctc_chars"),
         "talker": ("a talker checkpoint", "talker"), "rvq": ("a talker checkpoint (RVQ codec)", "talker"),
         "ocr": ("an OCR checkpoint (an ocr_* directory with ocr.pt)", "ocr")}

BATCH_KEYS = {"text", "image", "audio", "audio_in", "video", "video_frames", "prompt",
              "response_format"}  # answer_batch requests


def require_parts(comps: Components, purpose: str, *parts: str) -> None:
    """Raise a clear OmniError when a component `purpose` depends on was not found."""
    for part in parts:
        if getattr(comps, part) is None:
            label, key = PARTS[part]
            where = comps.searched.get(key, str(comps.root))
            raise OmniError(f"{purpose} needs {label}, but none was found (searched {where})")


def ocr_prompt(text: str | None, texts: list[str]) -> str:
    """The chat prompt with the OCR'd texts of the images joined in, as μOmni's infer_chat joins them
    (MUOMNI_OCR §4): "TEXT (OCR extracted: OCR)", or without a question "Extracted text from image: OCR. Describe
    what you see."; several images' texts are joined by OCR_JOIN."""
    ocr = OCR_JOIN.join(texts)
    return OCR_QUESTION.format(text=text, ocr=ocr) if text else OCR_NO_QUESTION.format(ocr=ocr)


def media_path(what: str, value: Any) -> str | os.PathLike:
    """A media argument that must name a file (a batch request's "audio": 5 or a list is an error, not a crash)."""
    if not isinstance(value, (str, os.PathLike)):
        raise OmniError(f"{what}: expected a file path, found {type(value).__name__}")
    return value


def batch_request(req: Any) -> dict[str, Any]:
    """One `answer_batch` item checked: the keyword arguments of `PromptBuilder.gather` it gives, and its
    "response_format" when it has one."""
    if not isinstance(req, dict):
        raise OmniError(f"expected an object with 'text' and optional 'image', 'audio_in', 'video', found "
                        f"{type(req).__name__}")
    unknown = set(req) - BATCH_KEYS
    if unknown:
        raise OmniError(f"unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(BATCH_KEYS))})")
    for key in ("text", "prompt"):
        if req.get(key) is not None and not isinstance(req[key], str):
            raise OmniError(f"'{key}' must be a string, found {type(req[key]).__name__}")
    out = dict(text=req.get("text"), image=req.get("image"), audio=req.get("audio", req.get("audio_in")),
               video=req.get("video"), prompt=req.get("prompt"),
               video_frames=DEFAULT_VIDEO_FRAMES if req.get("video_frames") is None else req["video_frames"])
    if "response_format" in req:  # this request's own (checked by the options table), instead of the batch's
        try:
            out["response_format"] = BY_NAME["response_format"].check(req["response_format"])
        except OptionError as exc:
            raise OmniError(str(exc)) from None
    return out


@dataclass
class BuiltPrompt:
    """A prompt fitted to the context: embeddings (1, T, d), the text ids used, notes for the user, the answer
    budget, and what was cut to fit (`budget_cut` {requested, allowed, context}, `prompt_trimmed` {from, to}),
    which --json and the server's usage report."""
    embeds: torch.Tensor
    ids: list[int]
    notes: list[str]
    max_new_tokens: int
    fitted: dict[str, Any]


class PromptBuilder:
    """Decodes a request's media at the checkpoint's sizes and assembles its prompt; the encoders are the
    model's (`encode_images(list of image tensors) -> (N, d)`, `encode_audio(wave) -> (T', d_audio)`)."""

    def __init__(self, comps: Components, device: torch.device, encode_images: Callable[[list[torch.Tensor]], torch.Tensor],
                 encode_audio: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.comps, self.device = comps, device
        self.encode_images, self.encode_audio = encode_images, encode_audio

    @property
    def image_size(self) -> int:
        """The vision checkpoint's input size (224 for every μOmni release), so Pillow does the resize."""
        return self.comps.vision.cfg.img_size if self.comps.vision is not None else IMAGE_SIZE

    def image_tensor(self, image: ImageInput, size: int | None = None) -> torch.Tensor:
        """An image as the encoder takes it: RGB, `size` x `size` (default: the chat image size), CHW in [0, 1]. A
        tensor is taken as already preprocessed; with `size` given it must have that shape."""
        if isinstance(image, torch.Tensor):
            if size is not None and tuple(image.shape) != (3, size, size):
                raise OmniError(f"image tensor: expected shape (3, {size}, {size}), found {tuple(image.shape)}")
            return image
        size = size or self.image_size
        if isinstance(image, Image.Image):
            return preprocess_image(image, size)
        if isinstance(image, bytes):
            return load_image_bytes(image, size)
        return load_image(media_path("image", image), size)

    def audio_wave(self, audio: AudioInput) -> np.ndarray:
        """The 16 kHz waveform. From a file only the start a prompt can use is decoded (plus a second, so
        `build` notices and reports the trim)."""
        if isinstance(audio, np.ndarray):
            wave = audio.astype(np.float32, copy=False)
            if wave.ndim != 1 or wave.size == 0:
                raise OmniError(f"audio array: expected a non-empty 1-D waveform, found shape {wave.shape}")
            check_wave(wave, "audio array")
            return wave
        chat_seconds = None if self.comps.audio is None else \
            max_audio_seconds(self.comps.ctx_len, self.comps.audio.cfg.downsample) + 1.0
        if isinstance(audio, bytes):
            return load_audio_bytes(audio, max_seconds=chat_seconds)
        return load_audio(media_path("audio", audio), max_seconds=chat_seconds)

    def gather(self, text: str | None = None, image: ImageInput | list[ImageInput] | None = None,
               audio: AudioInput | list[AudioInput] | None = None, video: str | os.PathLike | None = None,
               video_frames: int = DEFAULT_VIDEO_FRAMES, prompt: str | None = None, system: str | None = None
               ) -> tuple[str, list[torch.Tensor], Wave]:
        """Decode the inputs: (prompt text, image tensors in order — images, then video frames —, waveform, or
        a list of them for several clips). Without `text`, `prompt` (or a built-in prompt per modality) is used.
        A `system` prompt is prepended: SYSTEM + " " + TEXT (μOmni has no chat template; the SFT trainer joined
        its config `prompt` to the text the same way); without one the prompt is exactly TEXT."""
        images = [self.image_tensor(im) for im in (image if isinstance(image, (list, tuple)) else
                                                  [image] if image is not None else [])]
        if video is not None:
            if isinstance(video_frames, bool) or not isinstance(video_frames, int) or video_frames < 1:
                raise OmniError(f"video_frames {video_frames!r}: must be a positive integer")
            images.extend(load_video_frames(media_path("video", video), video_frames, self.image_size))
        if isinstance(audio, (list, tuple)):
            wave: Wave = [self.audio_wave(a) for a in audio] or None
        else:
            wave = self.audio_wave(audio) if audio is not None else None
        if text is None:
            text = prompt if prompt is not None else (IMAGE_PROMPT if images else AUDIO_PROMPT if wave is not None
                                                      else "")
        if system:
            text = f"{system} {text}" if text else system
        return text, images, wave

    @torch.inference_mode()
    def build(self, text: str, images: list[torch.Tensor], wave: Wave, max_new_tokens: int, trim: bool = True,
              budget_name: str = "max_new_tokens") -> BuiltPrompt:
        """The prompt [image tokens, audio tokens, tok_emb([bos] + encode(text))] fitted to the context.

        The budget is an upper bound, as llama.cpp's -n: a prompt that fits is kept whole and the budget cut to
        the room it leaves. Only a prompt that leaves less than min(budget, ctx_len // 4) is trimmed from the
        start (with `trim`; its end kept) so that the answer gets that much. Without `trim` (the server, which
        refuses to cut what a client sent) any room of at least one token is used, and a prompt that leaves none
        is an OmniError. Every cut is a note (naming the budget as `budget_name`, the caller's own field) and an
        entry of `fitted`. With `trim` one position stays free beside prompt and answer, as the spec's trimming
        keeps; without it the context may be filled exactly."""
        c = self.comps
        require_parts(c, "chat", "thinker")
        notes: list[str] = []
        parts = []
        if images:
            parts.append(self.encode_images(images))
        waves = [] if wave is None else wave if isinstance(wave, list) else [wave]
        if waves:  # several clips: their tokens in order, at most ctx_len // 4 in all
            require_parts(c, "audio input", "audio", "proj_a")
            limit = c.ctx_len // 4
            seconds = max_audio_seconds(c.ctx_len, c.audio.cfg.downsample)
            clips = []
            for w in waves:
                w, cut = trim_audio(w, seconds)  # before the mel: a long recording costs only what is used
                clips.append(self.encode_audio(w))
                if cut:
                    notes.append(f"audio trimmed to its first {seconds:.2f} s ({limit} encoder frames) to fit the "
                                 f"context of {c.ctx_len}")
            frames = torch.cat(clips, dim=0)
            if len(clips) > 1 and frames.shape[0] > limit:
                notes.append(f"audio clips together give {frames.shape[0]} encoder frames: only the first {limit} "
                             f"are used (the audio limit for the context of {c.ctx_len})")
            parts.append(c.proj_a(frames[:limit]))
        mm_len = sum(p.shape[0] for p in parts)
        ids = c.tokenizer.prompt_ids(text)
        room = c.ctx_len - mm_len - (1 if trim else 0)  # text and answer together
        media = f" ({mm_len} tokens of image/audio)" if mm_len else ""
        fitted: dict[str, Any] = {}
        budget = max_new_tokens
        if len(ids) + budget > room:
            left = room - len(ids)  # the answer's room beside the whole prompt
            if left >= (max(1, min(budget, c.ctx_len // 4)) if trim else 1):
                budget = left
            elif not trim:
                raise OmniError(f"the prompt ({mm_len + len(ids)} positions{media}) leaves no room for an answer "
                                f"in the context of {c.ctx_len}")
            else:
                shortest = min(len(ids), 2)  # [bos] and the last text token
                if room - shortest < 1:
                    raise OmniError(f"no room left for an answer in the context of {c.ctx_len} tokens "
                                    f"({mm_len} used by image/audio)")
                budget = min(budget, max(1, c.ctx_len // 4), room - shortest)
                keep = room - budget
                notes.append(f"prompt trimmed from {len(ids)} to {keep} tokens (its end kept) to leave room for "
                             f"{budget_name} {budget} in the context of {c.ctx_len}{media}")
                fitted["prompt_trimmed"] = {"from": len(ids), "to": keep}
                ids = ids[:1] + ids[len(ids) - keep + 1:]
            if budget < max_new_tokens:
                notes.append(f"{budget_name} {max_new_tokens} cut to {budget}: what the context of {c.ctx_len} "
                             f"leaves beside the prompt{media}")
                fitted["budget_cut"] = {"requested": max_new_tokens, "allowed": budget, "context": c.ctx_len}
        tok = c.thinker.tok_emb(torch.tensor(ids, device=self.device))
        embeds = torch.cat(parts + [tok.to(parts[0].dtype if parts else tok.dtype)], dim=0)[None]
        return BuiltPrompt(embeds, ids, notes, budget, fitted)
