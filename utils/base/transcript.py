"""A transcript's options, shape and file formats (txt, json, srt, vtt, tsv), as in whisper.

Torch-free, so the CLI's parser and a server can import it cheaply: the transcription itself lives in
utils/engine/transcribe.py. `format_transcript(result, "srt")` gives a file's text; `write_text_atomic` writes it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

from utils.base.errors import OmniError
from utils.base.fileio import write_atomic

OUTPUT_FORMATS = ("txt", "json", "srt", "vtt", "tsv")
# whisper's --language takes a code or an English name; the names of the codes a checkpoint is likely to give
LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
                  "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese",
                  "ko": "Korean"}


def check_language(given: str, known: str | None) -> None:
    """Accept `given` (a code or an English name, any case) when it is the checkpoint's language `known`; else an
    OmniError that says which language the checkpoint transcribes, or that it does not say."""
    if known is None:
        raise OmniError(f"language {given!r}: this checkpoint does not say which language it transcribes (no "
                        f"\"language\" in its audio_enc_metadata.json), so it cannot be checked; leave it out")
    name = LANGUAGE_NAMES.get(known.lower())
    if given.strip().lower() not in {known.lower(), (name or known).lower()}:
        raise OmniError(f"language {given!r}: this model transcribes {known}" + (f" ({name})" if name else "")
                        + " only")


@dataclass
class TranscribeOptions:
    """Tunables of utils.engine.transcribe.transcribe, in seconds unless said otherwise (its docstring says how
    each is used)."""
    vad: bool = True                 # split at silences and encode each speech region alone
    vad_threshold_db: float = -50.0  # a 10 ms frame quieter than this (dBFS) is silence ...
    vad_range_db: float = 40.0       # ... and so is one this far below the loudest frame so far
    min_silence: float = 0.3         # the shortest silence that ends a speech region
    speech_pad: float = 0.2          # audio kept either side of a region's speech
    window: float = 30.0             # the most audio encoded at once; longer regions go in overlapping windows
    overlap: float = 4.0             # how much consecutive windows share
    segment_gap: float = 0.5         # a gap without characters this long ends a segment
    max_segment: float = 30.0        # a segment ends before a word that would make it longer than this
    max_seconds: float = 24 * 3600.0  # longest audio accepted (a guard against endless inputs)
    word_timestamps: bool = True     # include each segment's "words"

    def check(self) -> None:
        for name in ("min_silence", "window", "overlap", "segment_gap", "max_segment", "max_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise OmniError(f"transcription option {name}={value!r}: must be a positive number of seconds")
        if not 0 <= self.speech_pad <= self.min_silence:
            raise OmniError(f"transcription option speech_pad={self.speech_pad!r}: must be between 0 and "
                            f"min_silence ({self.min_silence})")
        if self.window < 2 * self.overlap:
            raise OmniError(f"transcription options window={self.window} and overlap={self.overlap}: the window "
                            f"must be at least twice the overlap")


class Transcript(dict):
    """{"text", "language": None, "duration", "segments": [{"id", "start", "end", "text", "words": [{"word",
    "start", "end", "probability"}]}]}; `.text` is the plain transcript."""

    @property
    def text(self) -> str:
        return self["text"]

    @property
    def segments(self) -> list[dict[str, Any]]:
        return self["segments"]


def milliseconds(seconds: float) -> int:
    """A time in whole milliseconds, rounded to the nearest (never truncated: 1.001 s is 1000.999... ms in floating
    point and must stay 1001), and never below 0."""
    return max(0, round(seconds * 1000))


def timestamp(seconds: float, decimal: str) -> str:
    """HH:MM:SS,mmm (srt, decimal ',') or HH:MM:SS.mmm (vtt, '.'), from the rounded milliseconds."""
    ms = milliseconds(seconds)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def cue_text(text: str) -> str:
    """One subtitle line: no line breaks (a blank line ends a cue) and no '-->' (it marks a timing line)."""
    return " ".join(text.split()).replace("-->", "->")


def to_txt(result: dict[str, Any]) -> str:
    return "".join(f"{s['text']}\n" for s in result["segments"])


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, ensure_ascii=False) + "\n"


def to_srt(result: dict[str, Any]) -> str:
    return "".join(f"{i}\n{timestamp(s['start'], ',')} --> {timestamp(s['end'], ',')}\n{cue_text(s['text'])}\n\n"
                   for i, s in enumerate(result["segments"], start=1))


def to_vtt(result: dict[str, Any]) -> str:
    return "WEBVTT\n\n" + "".join(f"{timestamp(s['start'], '.')} --> {timestamp(s['end'], '.')}\n"
                                  f"{cue_text(s['text'])}\n\n" for s in result["segments"])


def to_tsv(result: dict[str, Any]) -> str:
    """whisper's tsv: start and end in integer milliseconds, then the text."""
    return "start\tend\ttext\n" + "".join(f"{milliseconds(s['start'])}\t{milliseconds(s['end'])}\t"
                                          f"{cue_text(s['text']).replace(chr(9), ' ')}\n"
                                          for s in result["segments"])


FORMATTERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "txt": to_txt, "json": to_json, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv}


def format_transcript(result: dict[str, Any], fmt: str) -> str:
    """The text of a `fmt` file (one of OUTPUT_FORMATS) for a transcription result."""
    return FORMATTERS[fmt](result)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (utils.base.fileio.write_atomic): no partial file, an existing one untouched."""
    write_atomic(path, text.encode("utf-8"))
