"""Transcription with timestamps from the audio encoder's CTC character head, for audio of any length.

    result = transcribe(encode, "talk.flac", chars, frame_samples=640)
    result.text                      # "a red circle a blue square"
    result["segments"][0]["words"]   # [{"word": "a", "start": 0.52, "end": 0.56, "probability": 0.97}, ...]

The data path, in bounded memory whatever the file's length:
1. The file is decoded and resampled block by block (utils.media.audio.stream_audio).
2. Voice activity: 10 ms frames quieter than `vad_threshold_db` dBFS, or more than `vad_range_db` below the
   loudest frame so far, are silence. A silence of `min_silence` s or more ends a speech region; each region,
   widened by `speech_pad` s of its surrounding audio, is encoded on its own (the μOmni encoders were trained
   on single utterances: one pass over several gives worse text). Audio shorter than `min_silence` between
   speech, and a file without long silences, is one region: then the result is exactly the greedy CTC
   transcript of the whole file.
3. A region longer than `window` s is encoded in windows of `window` s overlapping by `overlap` s. Two
   windows are joined at a frame of their overlap where both predict <BLANK>, nearest the overlap's middle
   (else where both are most confident of a blank), so no character is duplicated or dropped at the seam.
4. Each character is the run of frames whose argmax is its label (greedy CTC alignment): it starts at its
   first frame and ends after its last, one encoder frame being 10 ms x the encoder's downsampling.
   Words are runs of characters between spaces; a word's probability is the mean, over its characters'
   frames, of the top softmax probability. A segment ends where no character was emitted for `segment_gap`
   s (a silence between regions or a long run of blanks inside one), or before a word that would make it
   longer than `max_segment` s.

The result is whisper's JSON shape: {"text", "language": None, "duration", "segments": [{"id", "start", "end",
"text", "words": [{"word", "start", "end", "probability"}]}]} (no "words" without word_timestamps).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
import torch

from models.audio import ctc_emissions
from utils.media.audio import HOP_LENGTH, SAMPLE_RATE, audio_seconds, stream_audio
from utils.base.errors import OmniError
from utils.base.transcript import Transcript, TranscribeOptions

Encode = Callable[[np.ndarray], torch.Tensor]  # 16 kHz waveform -> CTC logits (frames, characters)
BLANK = 0


@dataclass(slots=True)
class Char:
    """One emitted character: its label, the samples its frames span, their summed top probability and count,
    and the speech region it came from."""
    label: int
    start: int
    end: int
    prob_sum: float
    frames: int
    region: int


@dataclass(slots=True)
class Frames:
    """Greedy CTC output of consecutive encoder frames, from frame `start` of their region's frame grid."""
    start: int
    labels: np.ndarray  # argmax label per frame
    probs: np.ndarray   # top softmax probability per frame
    blank: np.ndarray   # <BLANK> probability per frame

    def __len__(self) -> int:
        return len(self.labels)

    def tail(self, frame: int) -> "Frames":
        k = frame - self.start
        return Frames(frame, self.labels[k:], self.probs[k:], self.blank[k:])

    def head(self, frame: int) -> "Frames":
        k = frame - self.start
        return Frames(self.start, self.labels[:k], self.probs[:k], self.blank[:k])


def seam(a: Frames, b: Frames) -> int:
    """The frame where window `b` takes over from the earlier, overlapping window `a`: one where both
    predict <BLANK> (nearest the overlap's middle), else where the less confident of the two blanks is most
    confident. `a`'s last frame (it sees the window's edge) is never chosen."""
    lo, hi = b.start, min(a.start + len(a) - 1, b.start + len(b))
    if hi <= lo:
        raise ValueError(f"windows do not overlap: {a.start}+{len(a)} and {b.start}")
    ia, ib = slice(lo - a.start, hi - a.start), slice(lo - b.start, hi - b.start)
    both = (a.labels[ia] == BLANK) & (b.labels[ib] == BLANK)
    if both.any():
        middle = (hi - lo - 1) / 2
        candidates = np.flatnonzero(both)
        return lo + int(candidates[np.argmin(np.abs(candidates - middle))])
    return lo + int(np.argmax(np.minimum(a.blank[ia], b.blank[ib])))


class Aligner:
    """Collects the characters of consecutive `Frames`, collapsing a label run that continues across them."""

    def __init__(self, frame_samples: int) -> None:
        self.F = frame_samples
        self.chars: list[Char] = []
        self.end = -1          # frame (of its region's grid) after the last frame seen
        self.last_label = -1   # label of that frame
        self.region = -1       # region of that frame

    def add(self, frames: Frames, region: int, origin: int) -> None:
        """`origin`: the sample where frame 0 of the region's grid starts."""
        if len(frames) == 0:
            return
        labels = frames.labels.tolist()
        csum = np.concatenate([[0.0], np.cumsum(frames.probs, dtype=np.float64)])
        for i, (label, first, last) in enumerate(ctc_emissions(labels)):
            prob = float(csum[last + 1] - csum[first])
            end = origin + (frames.start + last + 1) * self.F
            if (i == 0 and first == 0 and frames.start == self.end and label == self.last_label
                    and region == self.region and self.chars):
                merged = self.chars[-1]
                merged.end, merged.prob_sum, merged.frames = end, merged.prob_sum + prob, merged.frames + last + 1
                continue
            self.chars.append(Char(label, origin + (frames.start + first) * self.F, end, prob, last - first + 1,
                                   region))
        self.end = frames.start + len(frames)
        self.last_label = labels[-1]
        self.region = region


class Streamer:
    """Voice activity, windowing and stitching over a stream of 16 kHz blocks (see the module docstring)."""

    def __init__(self, encode: Encode, frame_samples: int, opts: TranscribeOptions) -> None:
        self.encode, self.F, self.opts = encode, frame_samples, opts
        F = frame_samples
        self.W = max(F, round(opts.window * SAMPLE_RATE / F) * F)
        self.O = max(F, round(opts.overlap * SAMPLE_RATE / F) * F)
        self.pad = int(opts.speech_pad * SAMPLE_RATE)
        self.close_after = max(math.ceil(opts.min_silence * SAMPLE_RATE / HOP_LENGTH),
                               math.ceil(self.pad / HOP_LENGTH) + 1)
        self.aligner = Aligner(frame_samples)
        self.buf = np.zeros(0, np.float32)
        self.buf0 = 0          # sample index of buf[0]
        self.total = 0         # samples received
        self.hops = 0          # 10 ms VAD frames judged
        self.peak_db = -math.inf
        self.region = -1       # id of the open region, or of the last one closed
        self.open = False
        self.last_speech = 0   # VAD frame of the open region's latest speech
        self.origin = 0        # sample where the open region starts: its windows start F-multiples later
        self.next_start = 0    # sample where the open region's next window starts
        self.prev: Frames | None = None  # the open region's last window, until the next one is stitched on
        self.prev_end = 0      # sample where that window ends
        self.done_until = 0    # regions never reach back before this sample

    # ------------------------------------------------------------ windows
    def encode_window(self, lo: int, hi: int) -> Frames:
        logits = self.encode(self.buf[lo - self.buf0:hi - self.buf0]).float()
        probs = logits.softmax(-1)
        return Frames((lo - self.origin) // self.F, logits.argmax(-1).numpy(), probs.max(-1).values.numpy(),
                      probs[:, BLANK].numpy())

    def advance(self, avail: int, final: bool) -> None:
        """Encode the open region's windows that the audio up to sample `avail` completes; with `final` the
        region ends at `avail` and everything left is encoded."""
        while True:
            ws = self.next_start
            if final and self.prev is not None and avail <= self.prev_end:
                self.aligner.add(self.prev, self.region, self.origin)
                self.prev = None
                return
            if not final and avail - ws < self.W:
                return
            we = min(ws + self.W, avail)
            cur = self.encode_window(ws, we)
            if self.prev is not None:
                cut = seam(self.prev, cur)
                self.aligner.add(self.prev.head(cut), self.region, self.origin)
                cur = cur.tail(cut)
            if final and we == avail:
                self.aligner.add(cur, self.region, self.origin)
                self.prev = None
                return
            self.prev, self.prev_end, self.next_start = cur, we, we - self.O

    def open_region(self, lo: int) -> None:
        self.region += 1
        self.open = True
        self.origin = self.next_start = max(self.done_until, lo)
        self.prev = None

    def close_region(self, hi: int) -> None:
        hi = min(self.total, hi)
        self.advance(hi, final=True)
        self.open = False
        self.done_until = hi

    # ------------------------------------------------------------ input
    def feed(self, block: np.ndarray) -> None:
        self.buf = np.concatenate([self.buf, block]) if self.buf.size else block.astype(np.float32, copy=False)
        self.total += len(block)
        if not self.opts.vad:
            if not self.open:
                self.open_region(0)
            self.advance(self.total, final=False)
        else:
            self.detect()
            if self.open:
                self.advance(self.total, final=False)
        keep = self.next_start if self.open else max(self.done_until, self.hops * HOP_LENGTH - self.pad)
        if keep > self.buf0:
            self.buf = self.buf[keep - self.buf0:]
            self.buf0 = keep

    def detect(self) -> None:
        """Judge the new complete 10 ms frames: open and close speech regions."""
        n = self.total // HOP_LENGTH - self.hops
        if n <= 0:
            return
        start = self.hops * HOP_LENGTH - self.buf0
        frames = self.buf[start:start + n * HOP_LENGTH].reshape(n, HOP_LENGTH).astype(np.float64)
        db = 10.0 * np.log10(np.mean(frames * frames, axis=1) + 1e-12)
        peak = np.maximum.accumulate(np.maximum(db, self.peak_db))
        self.peak_db = float(peak[-1])
        speech = (db > self.opts.vad_threshold_db) & (db > peak - self.opts.vad_range_db)
        for k, is_speech in enumerate(speech.tolist()):
            h = self.hops + k
            if is_speech:
                if not self.open:
                    self.open_region(h * HOP_LENGTH - self.pad)
                self.last_speech = h
            elif self.open and h - self.last_speech >= self.close_after:
                self.close_region((self.last_speech + 1) * HOP_LENGTH + self.pad)
        self.hops += n

    def finish(self) -> list[Char]:
        if self.open:
            self.close_region(self.total)
        return self.aligner.chars


# ---------------------------------------------------------------- result

def build_result(chars: list[Char], idx_to_char: dict[int, str], total: int, opts: TranscribeOptions) -> Transcript:
    """Words from runs of characters between spaces (and across regions or long gaps), segments from words;
    `total`: the audio's length in samples (the encoder's last frame may reach past it)."""
    gap = opts.segment_gap * SAMPLE_RATE
    words: list[list[Char]] = []
    current: list[Char] = []
    for c in chars:
        ch = idx_to_char.get(c.label, "")
        if current and (c.region != current[-1].region or c.start - current[-1].end >= gap):
            words.append(current)
            current = []
        if not ch or ch.isspace():
            if current:
                words.append(current)
                current = []
            continue
        current.append(c)
    if current:
        words.append(current)

    segments: list[dict[str, Any]] = []
    group: list[dict[str, Any]] = []
    previous_end = 0
    for w in words:
        info = {"word": "".join(idx_to_char[c.label] for c in w), "start": seconds(w[0].start),
                "end": seconds(min(w[-1].end, total)),
                "probability": round(sum(c.prob_sum for c in w) / sum(c.frames for c in w), 4)}
        if group and (w[0].start - previous_end >= gap or info["end"] - group[0]["start"] > opts.max_segment):
            segments.append(make_segment(len(segments), group, opts.word_timestamps))
            group = []
        group.append(info)
        previous_end = w[-1].end
    if group:
        segments.append(make_segment(len(segments), group, opts.word_timestamps))
    return Transcript(text=" ".join(s["text"] for s in segments), language=None,
                      duration=seconds(total), segments=segments)


def seconds(samples: int) -> float:
    return round(samples / SAMPLE_RATE, 3)


def make_segment(index: int, words: list[dict[str, Any]], word_timestamps: bool) -> dict[str, Any]:
    seg = {"id": index, "start": words[0]["start"], "end": words[-1]["end"],
           "text": " ".join(w["word"] for w in words)}
    if word_timestamps:
        seg["words"] = words
    return seg


# ---------------------------------------------------------------- entry point

def array_blocks(wave: np.ndarray, block: int = 1 << 18) -> Iterator[np.ndarray]:
    for i in range(0, len(wave), block):
        yield wave[i:i + block]


def transcribe(encode: Encode, audio: str | os.PathLike | BinaryIO | np.ndarray, idx_to_char: dict[int, str],
               frame_samples: int, options: TranscribeOptions | None = None,
               progress: Callable[[float, float | None], None] | None = None) -> Transcript:
    """Transcribe a file (a path or an open binary file, streamed) or a 16 kHz float32 waveform. `encode`
    maps a waveform to CTC logits (frames, characters), one frame per `frame_samples` samples (160 x the
    encoder's downsampling); `progress` is called with the seconds of audio read so far and the total (None
    when a file's header does not say)."""
    opts = options or TranscribeOptions()
    opts.check()
    if isinstance(audio, np.ndarray):
        if len(audio) > opts.max_seconds * SAMPLE_RATE:
            raise OmniError(f"audio array: {len(audio) / SAMPLE_RATE:.0f} s long, over the transcription limit "
                            f"of {opts.max_seconds:.0f} s")
        blocks: Iterable[np.ndarray] = array_blocks(audio.astype(np.float32, copy=False))
        total = len(audio) / SAMPLE_RATE
    else:
        total = None if hasattr(audio, "read") else audio_seconds(audio)
        blocks = stream_audio(audio, opts.max_seconds)
    streamer = Streamer(encode, frame_samples, opts)
    for block in blocks:
        streamer.feed(block)
        if progress is not None:
            progress(streamer.total / SAMPLE_RATE, total)
    chars = streamer.finish()
    return build_result(chars, idx_to_char, streamer.total, opts)
