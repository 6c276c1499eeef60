"""The Python API. The CLIs (utils/cli/main.py) are thin layers over it.

    from omni import load_model
    model = load_model("checkpoints/demo")                 # or a merged export, or a weights file
    model.chat("What is one plus two?")                    # -> str
    model.chat(image="cat.png")                            # default prompt "Describe what you see concisely."
    for piece in model.stream("Tell me a story", temperature=0.8, seed=1):
        print(piece, end="", flush=True)
    model.transcribe("speech.wav").text                    # greedy CTC transcript
    model.ocr("sign.png").text                             # the text in an image (an OCR checkpoint)
    model.transcribe("talk.flac")["segments"]              # ... with segment and word timestamps
    wave, sr = model.generate_speech("Hello there", out_path="hello.wav")

Each call is an independent turn: the μOmni thinker was trained without a chat template, so there is no
conversation history.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from utils.base.cpus import passive_openmp

passive_openmp()  # OpenMP reads its wait policy when torch loads it
import torch

from utils.base.defaults import DEFAULT_VIDEO_FRAMES, DTYPE_NAMES, OCR_MAX_LEN, QUANTIZATIONS
from utils.base.errors import OmniError
from utils.base.options import BY_NAME, OptionError, SamplingOptions
from utils.base.transcript import Transcript, TranscribeOptions, check_language
from utils.engine.constrain import Constraint, Vocabulary
from utils.engine.generation import (EngineThread, RowPrompt, generate, generate_batch, generate_choices,
                                     serving_engine)
from utils.engine.native.step import native_model
from utils.engine.prompt import AudioInput, ImageInput, PromptBuilder, batch_request, ocr_prompt, require_parts
from utils.engine.speech import (GRIFFIN_LIM_ITERS, Speech, SpeechOptions, choose_vocoder, frames_for_text,
                                 max_talker_frames, synthesize)
from utils.engine.transcribe import transcribe
from utils.media.audio import HOP_LENGTH, SAMPLE_RATE, check_output_path, power_mel, write_wav
from utils.media.tokenizer import IncrementalDecoder
from utils.weights.card import model_card
from utils.weights.components import Components, to_device
from utils.weights.loading import load_components
from utils.weights.quant import quantize_linears


# What the apps (CLI, server, batch jobs) use besides OmniModel: re-exported so they stand on this module only.
__all__ = ["Answer", "AudioInput", "ImageInput", "Media", "OCRResult", "OmniError", "OmniModel", "SAMPLE_RATE",
           "SpeechPlan", "Transcript", "answer_timing", "check_output_path", "load_model", "ocr_fields", "ocr_prompt",
           "write_wav"]


@dataclass
class Answer:
    """One generated answer with the numbers `--json` reports. `logprobs` (with the `logprobs` option): one
    entry per generated token in OpenAI's `logprobs.content[]` shape, {"token", "logprob", "bytes",
    "top_logprobs": [{"token", "logprob", "bytes"}, ...]}: the model's raw distribution (before penalties, bias
    and temperature), natural log."""
    text: str
    token_ids: list[int]
    prompt_tokens: int
    timing: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str = "stop"  # "stop" (EOS), "length" (the budget ran out: a constrained answer is then cut)
    fitted: dict[str, Any] = field(default_factory=dict)  # what was cut to fit the context (PromptBuilder.build)

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> dict[str, Any]:
        """The `--json` object (keys are a stable interface: add, never remove; `logprobs` only when asked,
        `budget_cut` / `prompt_trimmed` only when something was cut)."""
        out = {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
               "generated_tokens": self.generated_tokens, "finish_reason": self.finish_reason,
               "timing": self.timing, **self.fitted}
        if self.logprobs is not None:
            out["logprobs"] = {"content": self.logprobs}
        return out


@dataclass
class OCRResult:
    """One image's OCR: the text, the greedy ids (ending with the stopping id 2 <EOS> or 0 <PAD>, unless the
    decode ran out of steps) and why it stopped: 'eos', 'pad' or 'max_len'."""
    text: str
    ids: list[int]
    stop: str


def ocr_fields(results: list[OCRResult]) -> dict[str, Any]:
    """The JSON fields of an OCR (CLI --json, /ocr, batch records): ocr_text (the images' texts, one line each),
    and per image ocr_ids (the greedy ids, ending with the stopping id unless max_len ran out) and ocr_stop."""
    return {"ocr_text": "\n".join(r.text for r in results), "ocr_ids": [r.ids for r in results],
            "ocr_stop": [r.stop for r in results]}


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(device: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; naming an absent device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise OmniError("--device cuda: no CUDA device is available on this machine (try --device auto or cpu)")
    if device == "mps" and not mps_available():
        raise OmniError("--device mps: no Apple MPS device is available on this machine (try --device auto or cpu)")
    if device not in ("cpu", "cuda", "mps"):
        raise OmniError(f"--device {device}: unknown device (use auto, cpu, cuda or mps)")
    return torch.device(device)


DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class Media:
    """Decoded inputs (OmniModel.load_media): image tensors in order (images, then video frames) and 16 kHz
    waveforms; `answer`, `prepare_chat` and the other chat methods take them as they are."""
    images: list[torch.Tensor] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)


@dataclass
class SpeechPlan:
    """What `speak` will do for a text: talker frames, the vocoder it uses ('hifigan' or 'griffin-lim') and
    that vocoder's weights file (None for Griffin-Lim); `steps` sizes a progress bar over the synthesis."""
    frames: int
    vocoder: str
    vocoder_source: str | None
    steps: int


class OmniModel:
    """A loaded μOmni model: thinker + whichever encoders, talker and vocoder the checkpoint provides."""

    def __init__(self, comps: Components, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self._parts = comps
        self.device = device
        self.dtype = dtype or comps.dtype
        self.load_seconds = 0.0  # set by load_model
        to_device(comps, device, self.dtype)
        self._prompts = PromptBuilder(comps, device, self.encode_images, self.encode_audio)
        self._vocabulary: Vocabulary | None = None  # built on the first response_format

    @property
    def components(self) -> list[str]:
        """Names of the loaded parts, e.g. ['thinker', 'vision', 'audio', 'talker', 'vocoder']."""
        names = ("thinker", "vision", "audio", "talker", "vocoder", "ocr")
        return [n for n in names if getattr(self._parts, n) is not None]

    @property
    def parts(self) -> Components:
        """The loaded networks, tokenizer and where each came from (utils.weights.loading.Components), for tools and tests
        that work below the chat API; the apps use the methods."""
        return self._parts

    def info(self) -> dict[str, Any]:
        """The model card (`--info`, like `ollama show`): components with parameter counts and the weights and
        config files they came from, dtype, context, vocabulary, decode mode and generation defaults."""
        return model_card(self._parts, self.dtype, self.device, self.sampling_options())

    # ------------------------------------------------------------ inputs
    def _require_parts(self, purpose: str, *parts: str) -> None:
        """Raise a clear OmniError when a component `purpose` depends on was not found."""
        require_parts(self._parts, purpose, *parts)

    @property
    def image_size(self) -> int:
        """The vision checkpoint's input size (224 for every μOmni release), so Pillow does the resize."""
        return self._prompts.image_size

    def load_media(self, image: ImageInput | list[ImageInput] | None = None,
                   audio: AudioInput | list[AudioInput] | None = None, video: str | os.PathLike | None = None,
                   video_frames: int = DEFAULT_VIDEO_FRAMES, purpose: str | None = None) -> Media:
        """Decode media now (a bad file fails here, before any generation), exactly as a chat call would: images
        and video frames at the vision checkpoint's size, audio up to what a prompt can use. With `purpose`
        (e.g. '/video'), a model lacking the encoder for a given kind is an OmniError naming that purpose."""
        if purpose is not None and (image is not None or video is not None):
            self._require_parts(purpose, "vision", "proj_v")
        if purpose is not None and audio is not None:
            self._require_parts(purpose, "audio", "proj_a")
        _, images, wave = self._prompts.gather("", image, audio, video, video_frames)
        return Media(images, [] if wave is None else wave if isinstance(wave, list) else [wave])

    @torch.inference_mode()
    def encode_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """One Thinker token per image: proj_v(ViT cls), shape (N, d)."""
        self._require_parts("image or video input", "vision", "proj_v")
        batch = torch.stack(images).to(self.device, self.dtype)
        cls, _ = self._parts.vision(batch)
        return self._parts.proj_v(cls[:, 0])

    @torch.inference_mode()
    def encode_audio(self, wave: np.ndarray) -> torch.Tensor:
        """Audio encoder frames, (T', d_audio)."""
        self._require_parts("audio input", "audio")
        mel = power_mel(wave).to(self.device, self.dtype)
        return self._parts.audio(mel[None])[0]

    # ------------------------------------------------------------ chat
    def sampling_options(self, **overrides: Any) -> SamplingOptions:
        """Sampling options: library defaults < generation_config.json beside the weights < explicit arguments
        (None means "not given")."""
        gc = self._parts.generation_defaults
        for k in overrides:
            if k not in BY_NAME:
                raise TypeError(f"unknown generation option {k!r} (known: {', '.join(sorted(BY_NAME))})")
        defaults = {k: gc.get(k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                                            "decode_attention")}
        if gc.get("do_sample") is False:
            defaults["temperature"] = 0.0
        try:
            opts = SamplingOptions().updated(**defaults).updated(**overrides).checked()
        except OptionError as exc:
            raise OmniError(f"generation options: {exc}") from None
        vocab = self._parts.thinker.cfg.vocab_size if self._parts.thinker is not None else None
        beyond = [t for t in opts.logit_bias or {} if vocab is not None and t >= vocab]
        if beyond:
            raise OmniError(f"generation options: logit_bias names token id {beyond[0]}, beyond this model's "
                            f"vocabulary of {vocab}")
        return opts

    def logprob_entry(self, entry: Any) -> dict[str, Any]:
        """A TokenLogprobs (utils.engine.sampling) as OpenAI's `logprobs.content[]` item: `token` is the text the
        id stands for (its UTF-8 `bytes`; a byte-fallback piece's lone byte shows as a \\xNN escape)."""
        def token(tid: int, logprob: float) -> dict[str, Any]:
            raw = self._parts.tokenizer.token_bytes(tid)
            return {"token": raw.decode("utf-8", "backslashreplace"), "logprob": logprob, "bytes": list(raw)}
        return {**token(entry.id, entry.logprob), "top_logprobs": [token(t, lp) for t, lp in entry.top]}

    def constraint(self, response_format: dict[str, Any] | None) -> Constraint | None:
        """A new row state holding an answer to `response_format` (checked by the options table, or None: no
        constraint), compiled against this model's vocabulary (utils.engine.constrain); OmniError when the schema
        or grammar does not compile, or this vocabulary cannot start it. The server checks a request's format
        with it before queueing the request."""
        if response_format is None:
            return None
        try:
            response_format = BY_NAME["response_format"].check(response_format)
        except OptionError as exc:
            raise OmniError(f"generation options: {exc}") from None
        if self._vocabulary is None:
            self._require_parts("a response_format", "thinker")
            self._vocabulary = Vocabulary(self._parts.tokenizer, self._parts.thinker.cfg.vocab_size)
        return self._vocabulary.constraint(response_format, self.device)

    def _generate(self, result: list[Answer], text: str | None, image: Any, audio: Any, video: Any,
                  video_frames: int, prompt: str | None, gen: dict[str, Any]) -> Iterator[str]:
        """Yield the answer's text pieces as they are generated; append the finished Answer to `result`."""
        system = gen.pop("system", None)
        opts = self.sampling_options(**gen)
        text, images, wave = self._prompts.gather(text, image, audio, video, video_frames, prompt, system)
        t0 = time.perf_counter()
        built = self._prompts.build(text, images, wave, opts.max_new_tokens)
        embeds, ids, opts.max_new_tokens = built.embeds, built.ids, built.max_new_tokens
        constraint = self.constraint(opts.response_format)
        detok = IncrementalDecoder(self._parts.tokenizer)
        t_first = None
        info: dict[str, Any] = {}
        logprobs: list[Any] = []
        for tid in generate(self._parts.thinker, embeds, opts, ids, info, logprobs, constraint):
            if t_first is None:
                t_first = time.perf_counter()  # the prefill's token: decode time runs from here
            piece = detok.push(tid)
            if piece:
                yield piece
        t_end = time.perf_counter()
        tail = detok.flush()
        if tail:
            yield tail
        out = detok.ids
        t_first = t_first or t_end
        # Decode steps: forward passes after the prefill, each yielding one token — the answer's tokens after
        # the first, plus the step whose EOS ended it. Timed from the first token to the end of the last step.
        steps = max(0, len(out) - 1) + (len(out) < opts.max_new_tokens and not opts.ignore_eos and bool(out))
        reason = info.pop("finish_reason", "length")  # none: max_new_tokens 0
        timing = {**answer_timing(self.load_seconds, t_first - t0, embeds.shape[1], t_end - t_first, steps), **info}
        result.append(Answer(detok.text, out, embeds.shape[1], timing, built.notes, self._logprobs(opts, logprobs),
                             reason, built.fitted))

    def _logprobs(self, opts: SamplingOptions, entries: list[Any]) -> list[dict[str, Any]] | None:
        return [self.logprob_entry(e) for e in entries] if opts.logprobs is not None else None

    def answer(self, text: str | None = None, image: ImageInput | list[ImageInput] | None = None,
               audio: AudioInput | list[AudioInput] | None = None, video: str | os.PathLike | None = None,
               video_frames: int = DEFAULT_VIDEO_FRAMES, prompt: str | None = None,
               on_text: Callable[[str], None] | None = None, **gen: Any) -> Answer:
        """Generate one answer with its ids and timings; `on_text(piece)` receives the text as it is generated.

        `gen` are SamplingOptions: max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, logit_bias ({token id: bias}), seed, ignore_eos,
        logprobs (N: Answer.logprobs with N alternatives per token), response_format (e.g. {"type":
        "json_object"}: the answer held to JSON, a JSON schema or a grammar; see utils.base.options; cut short only
        when max_new_tokens runs out, finish_reason "length"), decode_attention ('reference' or 'causal'),
        decode_kernel ('auto', 'c' or 'torch': the decode step in C where it applies, see utils.engine.native.step;
        timing["decode_kernel"] says which ran and why); and `system`, a system prompt joined before
        the text as "SYSTEM TEXT" (μOmni has no chat template). `image` and `audio` may be lists: one token per image, the clips' tokens in order."""
        result: list[Answer] = []
        for piece in self._generate(result, text, image, audio, video, video_frames, prompt, gen):
            if on_text is not None:
                on_text(piece)
        return result[0]

    def answer_choices(self, text: str | None = None, image: ImageInput | list[ImageInput] | None = None,
                       audio: AudioInput | list[AudioInput] | None = None, video: str | os.PathLike | None = None,
                       video_frames: int = DEFAULT_VIDEO_FRAMES, prompt: str | None = None, n: int = 1,
                       **gen: Any) -> list[Answer]:
        """`n` answers to one question (OpenAI's `n`), its prompt prefilled once and its cache shared by the n
        rows. Answer i is sampled with seed + i (`seed` given), so answer 0 is what `answer` gives; timing is
        the whole run's."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise OmniError(f"n {n!r}: must be a positive integer")
        system = gen.pop("system", None)
        opts = self.sampling_options(**gen)
        text, images, wave = self._prompts.gather(text, image, audio, video, video_frames, prompt, system)
        t0 = time.perf_counter()
        built = self._prompts.build(text, images, wave, opts.max_new_tokens)
        opts.max_new_tokens = built.max_new_tokens
        info: dict[str, Any] = {}
        outs = generate_choices(self._parts.thinker, built.embeds[0], built.ids, opts, n, info,
                                self.constraint(opts.response_format))
        seconds = time.perf_counter() - t0
        return [Answer(self._parts.tokenizer.decode(out), out, built.embeds.shape[1],
                       {"total_s": round(seconds, 6), "choices": n, **info}, built.notes, self._logprobs(opts, lps),
                       reason or "length", built.fitted)
                for out, lps, reason in outs]

    def chat(self, text: str | None = None, image: ImageInput | list[ImageInput] | None = None,
             audio: AudioInput | list[AudioInput] | None = None, video: str | os.PathLike | None = None,
             **gen: Any) -> str:
        """The answer text only (see `answer` for the options)."""
        return self.answer(text, image=image, audio=audio, video=video, **gen).text

    def stream(self, text: str | None = None, image: ImageInput | list[ImageInput] | None = None,
               audio: AudioInput | list[AudioInput] | None = None, video: str | os.PathLike | None = None,
               video_frames: int = DEFAULT_VIDEO_FRAMES, prompt: str | None = None, **gen: Any) -> Iterator[str]:
        """The answer as an iterator of text pieces, produced as the tokens are generated; "".join(pieces) is
        exactly what `chat` returns."""
        yield from self._generate([], text, image, audio, video, video_frames, prompt, gen)

    # ------------------------------------------------------------ continuous batching (the server)
    @property
    def context_length(self) -> int:
        """The thinker's context in positions (prompt, image/audio tokens and answer together)."""
        return self._parts.ctx_len

    @property
    def language(self) -> str | None:
        """The language the CTC head transcribes, when its audio_enc_metadata.json says ("en"), else None."""
        return self._parts.language

    def limit_context(self, ctx_size: int) -> None:
        """Use at most `ctx_size` positions of the context from now on (llama.cpp's -c): prompts, image/audio
        tokens and answers are fitted to it; more than the model's own context is an OmniError saying it."""
        if isinstance(ctx_size, bool) or not isinstance(ctx_size, int) or not 1 <= ctx_size <= self._parts.ctx_len:
            raise OmniError(f"ctx_size {ctx_size!r}: the model's context is {self._parts.ctx_len} tokens (give 1 to "
                            f"{self._parts.ctx_len})")
        self._parts.ctx_len = ctx_size

    def detokenizer(self) -> IncrementalDecoder:
        """A streaming detokeniser for this model's ids (push(id) -> new text)."""
        return IncrementalDecoder(self._parts.tokenizer)

    def prepare_chat(self, text: str | None = None, image: ImageInput | list[ImageInput] | None = None,
                     audio: AudioInput | None = None, prompt: str | None = None, trim: bool = True,
                     system: str | None = None, budget_name: str = "max_new_tokens", **gen: Any) -> RowPrompt:
        """One request's prompt as `answer` builds it (embeddings, ids, options with the answer budget; `system`
        joined before the text as there), for a `batch_engine`. Without `trim` the text is never cut: the budget
        takes whatever room the prompt leaves, and a prompt that leaves none is an OmniError (audio is still
        trimmed to what a prompt can use, with a note, as in the CLI). `budget_name`: what the notes call the
        budget (the client's own field)."""
        opts = self.sampling_options(**gen)
        text, images, wave = self._prompts.gather(text, image, audio, prompt=prompt, system=system)
        built = self._prompts.build(text, images, wave, opts.max_new_tokens, trim=trim, budget_name=budget_name)
        opts.max_new_tokens = built.max_new_tokens
        return RowPrompt(built.embeds[0], built.ids, opts, built.notes, constraint=self.constraint(opts.response_format),
                         fitted=built.fitted)

    def decode_kernel(self, decode_kernel: str = "auto") -> str:
        """The decode step a causal generation with `decode_kernel` takes, built and loaded now (so a server or
        a batch job compiles the C step before it accepts work): "c (FEATURES, COMPILER)" or "torch (why)".
        "c" where the C step cannot run is an OmniError saying why."""
        self._require_parts("chat", "thinker")
        opts = self.sampling_options(decode_kernel=decode_kernel)
        return native_model(self._parts.thinker, opts.decode_kernel, False, None)[1]

    def batch_engine(self, max_batch: int = 16, max_queue: int = 64) -> EngineThread:
        """The server's continuous batching: the one decode engine (utils.engine.generation.Scheduler) over this
        model's thinker, run in a thread of its own. Requests prepared with `prepare_chat` join the running batch
        at its next step (`submit`); each greedy answer equals `answer`'s. Other model work (transcribe, speak,
        encoders) should go through its `call` so one thread runs the model."""
        self._require_parts("chat", "thinker")
        return serving_engine(self._parts.thinker, max_batch, max_queue, self.sampling_options())

    # ------------------------------------------------------------ batched chat
    def answer_batch(self, items: list[dict[str, Any]], batch_size: int = 8,
                     on_error: Callable[[int, OmniError], None] | None = None, **gen: Any) -> list[Answer | None]:
        """Answers for several requests, decoded together `batch_size` at a time (utils.engine.generation.generate_batch:
        the rows submitted together to the one engine, each answer equal to the one `answer` gives, sampled ones
        too when seeded). Each item is a dict with `text` and
        optional `image`, `audio` (or `audio_in`), `video`, `video_frames`, `prompt`, `response_format` (this
        item's, instead of the one in `gen`; {"type": "text"}: none). A request that cannot be
        prepared raises ("request N: ..."), or with `on_error(index, error)` is reported there and its slot is
        None.
        Timing: prefill_s is the wait for the batch's first tokens; decode figures are per answer."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise OmniError(f"batch_size {batch_size!r}: must be a positive integer")
        system = gen.pop("system", None)
        opts = self.sampling_options(**gen)
        results: list[Answer | None] = [None] * len(items)
        for lo in range(0, len(items), batch_size):
            t0 = time.perf_counter()
            ready = []  # (index, its BuiltPrompt, its constraint)
            for i in range(lo, min(lo + batch_size, len(items))):
                try:
                    request = batch_request(items[i])
                    fmt = request.pop("response_format", opts.response_format)
                    try:
                        dataclasses.replace(opts, response_format=fmt).checked()
                    except OptionError as exc:
                        raise OmniError(f"generation options: {exc}") from None
                    constraint = self.constraint(fmt)
                    text, images, wave = self._prompts.gather(**request, system=system)
                    built = self._prompts.build(text, images, wave, opts.max_new_tokens)
                except OmniError as exc:
                    if on_error is None:
                        raise OmniError(f"request {i + 1}: {exc}") from exc
                    on_error(i, exc)
                    continue
                ready.append((i, built, constraint))
            if not ready:
                continue
            times: list[float] = []
            info: dict[str, Any] = {}
            logprobs: list[list[Any]] = []
            reasons: list[str] = []
            outs = generate_batch(self._parts.thinker, [b.embeds[0] for _, b, _ in ready], [b.ids for _, b, _ in ready],
                                  opts, max_new_tokens=[b.max_new_tokens for _, b, _ in ready], step_times=times,
                                  info=info, logprobs=logprobs, constraints=[c for _, _, c in ready], reasons=reasons)
            t_first = times[0] if times else time.perf_counter()
            for (i, built, _), out, lps, reason in zip(ready, outs, logprobs, reasons):
                steps = min(len(out) - 1 + (len(out) < built.max_new_tokens and not opts.ignore_eos),
                            len(times) - 1) if out else 0  # as in _generate: the EOS step counts
                decode_s = times[steps] - t_first if times else 0.0
                n = built.embeds.shape[1]
                timing = {**answer_timing(self.load_seconds, t_first - t0, n, decode_s, steps),
                          "batch_size": len(ready), **info}
                results[i] = Answer(self._parts.tokenizer.decode(out), out, n, timing, built.notes,
                                    self._logprobs(opts, lps), reason or "length", built.fitted)
        return results

    def chat_batch(self, items: list[dict[str, Any]], batch_size: int = 8, **gen: Any) -> list[str]:
        """The answer texts for several requests (see `answer_batch`), in order."""
        return [a.text for a in self.answer_batch(items, batch_size=batch_size, **gen)]

    def quantize(self, method: str) -> list[str]:
        """Runtime quantization for speed: 'int8' / 'int4' swap the nn.Linear layers inside the networks for
        int8 (utils.weights.quant.Int8Linear) or 4-bit group-wise (utils.weights.quant.Int4Linear, CPU) ones; torch's own
        attention layers stay float. Returns the names replaced. Top-1 agreement with float32 is high but
        not exact (tools/quant_agreement.py measures it)."""
        if method not in QUANTIZATIONS:
            raise OmniError(f"--quantize {method}: unknown (use {', '.join(QUANTIZATIONS)})")
        if method == "int4" and self.device.type != "cpu":
            raise OmniError(f"--quantize int4: runs on the CPU only (the device here is {self.device.type}; "
                            f"use --quantize int8 or --device cpu)")
        done = []
        for name in ("thinker", "vision", "audio", "talker", "rvq", "ocr"):
            module = getattr(self._parts, name)
            if module is not None:
                done += [f"{name}.{n}" for n in quantize_linears(module, method)]
        return done

    # ------------------------------------------------------------ transcription
    @torch.inference_mode()
    def transcribe(self, audio: AudioInput | BinaryIO, word_timestamps: bool = True,
                   progress: Callable[[float, float | None], None] | None = None, language: str | None = None,
                   **options: Any) -> Transcript:
        """Greedy CTC transcript from the audio encoder's character head, with segment and word timestamps:
        a dict in whisper's JSON shape whose `.text` is the plain transcript (utils/engine/transcribe.py says how).
        A file (a path or an open binary file) is streamed: any length, bounded memory; an array is a 16 kHz
        waveform. `options`: fields of utils.base.transcript.TranscribeOptions (vad, min_silence, segment_gap,
        window, max_seconds, ...); `progress` is called with the seconds of audio read so far and the total
        (None when unknown). `language` (whisper's --language: a code or an English name) must be the one the
        checkpoint transcribes, which its audio_enc_metadata.json names (result["language"]); an OmniError
        says which it is, or that the checkpoint does not say."""
        self._require_parts("transcription", "audio", "ctc_head", "ctc_chars")
        if language is not None:
            check_language(language, self._parts.language)
        opts = TranscribeOptions(word_timestamps=word_timestamps, **options)
        if isinstance(audio, np.ndarray):
            audio = self._prompts.audio_wave(audio)
        result = transcribe(self._ctc_logits, audio, self._parts.ctc_chars,
                            HOP_LENGTH * self._parts.audio.cfg.downsample, opts, progress)
        result["language"] = self._parts.language
        return result

    @torch.inference_mode()
    def _ctc_logits(self, wave: np.ndarray) -> torch.Tensor:
        """CTC character logits (frames, characters) of a 16 kHz waveform, as float32 on the CPU."""
        return self._parts.ctc_head(self.encode_audio(wave)).float().cpu()

    # ------------------------------------------------------------ OCR
    @property
    def ocr_image_size(self) -> int:
        """The OCR checkpoint's input size (its config's img_size), which its images are resized to."""
        self._require_parts("OCR", "ocr")
        return self._parts.ocr.cfg.vision.img_size

    def ocr(self, image: ImageInput, max_len: int = OCR_MAX_LEN) -> OCRResult:
        """The text in `image` (a path, PIL image, encoded bytes, or a (3, S, S) tensor at the OCR size): RGB,
        resized to the OCR config's img_size, then greedy character decoding (MUOMNI_OCR §4) for at most
        `max_len` steps, with the self-attention KV cache (the same ids as a full recompute per step)."""
        self._require_parts("OCR", "ocr")
        model, limit = self._parts.ocr, self._parts.ocr.cfg.max_positions - 1
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= limit:
            raise OmniError(f"OCR max_len {max_len!r}: must be an integer from 1 to {limit}")
        ids, stop = model.greedy(self._prompts.image_tensor(image, self.ocr_image_size), max_len)
        chars = self._parts.ocr_chars
        special = set(chars[:4])  # <PAD>, <BOS>, <EOS>, <UNK> give no text (ids 1 and 3 may be generated)
        text = "".join(chars[i] for i in (ids[:-1] if stop != "max_len" else ids) if chars[i] not in special)
        return OCRResult(text, ids, stop)

    # ------------------------------------------------------------ speech out
    def _speech_frames(self, text: str, max_frames: int | None = None) -> int:
        """Talker frames for speaking `text` (~5 per word, 80 ms each), capped by `max_frames` and the talker."""
        self._require_parts("speech output", "talker", "rvq")
        limit = max_talker_frames(self._parts.talker)
        if max_frames is not None and not 1 <= max_frames <= limit:
            raise OmniError(f"--max_audio_frames {max_frames}: the talker generates 1 to {limit} frames")
        return min(frames_for_text(text), max_frames or limit)

    def speech_plan(self, text: str | None, max_frames: int | None = None, vocoder: str = "auto",
                    purpose: str = "speech output") -> SpeechPlan:
        """Check that speech can be made (talker, RVQ and the asked vocoder present; `purpose` names the request in
        errors) and plan it for `text`: frames, vocoder, progress steps. `text=None` only checks (frames and
        steps 0), so a caller can fail before generating the answer it will speak."""
        self._require_parts(purpose, "talker", "rvq")
        kind = choose_vocoder(self._parts.vocoder, vocoder)
        frames = 0 if text is None else self._speech_frames(text, max_frames)
        source = self._parts.sources.get("vocoder", "?") if kind == "hifigan" else None
        steps = frames + (GRIFFIN_LIM_ITERS if kind == "griffin-lim" and frames else 0)
        return SpeechPlan(frames, kind, source, steps)

    def speak(self, text: str | None = None, frames: int | None = None, max_frames: int | None = None,
              temperature: float = 0.0, top_k: int = 0, seed: int | None = None,
              decode_attention: str | None = None, vocoder: str = "auto",
              progress: Callable[[int], None] | None = None) -> Speech:
        """Synthesise speech for `text` (or exactly `frames` talker frames). The μOmni Talker is not
        conditioned on text: the text only sets the length (~5 frames = 0.4 s per word).
        `vocoder`: 'auto' (HiFi-GAN when a vocoder checkpoint was found, else Griffin-Lim), 'hifigan',
        'griffin-lim'."""
        self._require_parts("speech output", "talker", "rvq")
        if frames is None:
            if text is None or not text.strip():
                raise OmniError("speech output: the text to speak is empty (give frames= / --max_audio_frames "
                                "to synthesise a fixed length anyway)")
            frames = self._speech_frames(text, max_frames)
        opts = SpeechOptions(temperature=temperature, top_k=top_k, seed=seed,
                             decode_attention=decode_attention or self.sampling_options().decode_attention)
        return synthesize(self._parts.talker, self._parts.rvq, self._parts.vocoder, frames, opts, vocoder, progress)

    def generate_speech(self, text: str, out_path: str | os.PathLike | None = None,
                        **speech_options: Any) -> tuple[np.ndarray, int]:
        """Speak `text`: returns (float32 mono waveform, sample rate 16000); with `out_path` also writes it
        atomically, in the format its suffix names (.mp3, .opus/.ogg, .aac, .flac, .pcm/.raw; else 16-bit WAV).
        Options as for `speak`."""
        speech = self.speak(text, **speech_options)
        if out_path is not None:
            speech.write(out_path, "out_path")
        return speech.wave, speech.sample_rate


def answer_timing(load_s: float, prefill_s: float, prompt_tokens: int, decode_s: float, steps: int
                  ) -> dict[str, float]:
    """The `timing` object. decode_tokens_per_s = decode_steps / decode_s: the forward passes after the prefill
    (each yields one token: the answer's tokens after the first, plus the step that produced the ending EOS) over
    the time from the first token to the end of the last step — llama.cpp's "eval" figure. It is 0.0 when no step
    ran (a one-token answer that hit max_new_tokens, or an empty one)."""
    return {"load_s": round(load_s, 6), "prefill_s": round(prefill_s, 6), "decode_s": round(decode_s, 6),
            "decode_tokens_per_s": round(steps / decode_s, 3) if steps and decode_s > 0 else 0.0,
            "prefill_tokens_per_s": round(prompt_tokens / prefill_s, 3) if prefill_s > 0 else 0.0,
            "decode_steps": steps}


def set_threads(threads: int | None) -> int:
    """torch's intra-op thread count for this process (process-wide), returned; the C step's sessions run on
    as many threads. None: 1, unless the environment names a count (OMP_NUM_THREADS / MKL_NUM_THREADS, which
    torch already follows); 0: torch's own default (one per core); N >= 1: N. One thread is the default
    because these models are small: on a busy 2-core machine two torch threads made decode 10-20x slower
    (their barriers wait on a preempted sibling), and on an idle one a second thread gains little on one-row
    decode steps."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise OmniError(f"--threads {threads!r}: must be an integer >= 0 (0 = one per core)")
    if threads is None:
        if not (os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")):
            torch.set_num_threads(1)
    elif threads == 0:
        torch.set_num_threads(os.cpu_count() or 1)
    else:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_model(path: str | os.PathLike, device: str = "auto", dtype: str | torch.dtype | None = None,
               quantize: str | None = None, threads: int | None = None) -> OmniModel:
    """Load every component found under `path` (see utils.weights.loading) onto `device` ('auto', 'cpu', 'cuda', 'mps')
    in `dtype` ('float32', 'float16', 'bfloat16'; default: the stored weights' dtype, float32 for μOmni);
    `quantize='int8'` / `'int4'` then quantizes the linear layers (OmniModel.quantize). `threads`: torch's
    CPU thread count for the process (see `set_threads`; default 1 unless OMP_NUM_THREADS is set)."""
    t0 = time.perf_counter()
    set_threads(threads)
    dev = pick_device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise OmniError(f"--dtype {dtype}: unknown (use {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nested.tensor")  # torch notice for norm_first encoders
        comps = load_components(Path(path))
    model = OmniModel(comps, dev, dtype)
    if quantize is not None:
        model.quantize(quantize)
    model.load_seconds = time.perf_counter() - t0
    return model


# ---------------------------------------------------------------- the export library, for export.py and
# infer_safetensors.py: its public entry points (writing an export, finding its weights file, the config tied
# to a checkpoint directory), re-exported so those apps stand on this module like the others.
from utils.weights.checkpoint import find_config  # noqa: E402
from utils.weights.export_format import dtype_name, export_file  # noqa: E402
from utils.weights.export_writer import ExportResult, export_checkpoints  # noqa: E402

__all__ += ["ExportResult", "dtype_name", "export_checkpoints", "export_file", "find_config"]
