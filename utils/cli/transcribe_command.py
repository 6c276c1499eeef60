"""`--transcribe`: the whisper-style command line over OmniModel.transcribe (flags, files out, progress).

    infer_chat.py --ckpt_dir D --transcribe --audio_in a.wav                 # text on stdout
    infer_chat.py --ckpt_dir D --transcribe --audio_in a.wav --json          # JSON on stdout
    infer_chat.py --ckpt_dir D --transcribe --audio_in *.flac --output_format all --output_dir subs/

One file without --output_dir goes to stdout; otherwise each input INPUT.ext becomes INPUT.FORMAT in
--output_dir (default: the current directory), written atomically.

transcribe.py (utils/cli/transcribe_script.py) is the same with whisper's habits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.base.errors import OmniError
from utils.base.transcript import (OUTPUT_FORMATS, TranscribeOptions, check_language, format_transcript,
                                   write_text_atomic)

if TYPE_CHECKING:
    from omni import OmniModel
    from utils.cli.console import Console, Out

DEFAULTS = TranscribeOptions()
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of audio [{elapsed}<{remaining}]"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transcription (with --transcribe)")
    g.add_argument("--output_format", choices=OUTPUT_FORMATS + ("all",), default=None,
                   help="txt (one segment per line), json (text, duration, segments with word timestamps and "
                        "probabilities), srt, vtt, tsv, or all of them (default: txt, json with --json).")
    g.add_argument("--output_dir", metavar="DIR", default=None,
                   help="Write INPUT.FORMAT files here (created if missing; default: stdout for one input and "
                        "one format, else the current directory).")
    g.add_argument("--no_vad", action="store_true",
                   help="Encode the audio as it is, in windows, instead of each speech region on its own.")
    g.add_argument("--min_silence", type=float, default=None, metavar="S",
                   help=f"The shortest silence that splits speech regions (default {DEFAULTS.min_silence} s).")
    g.add_argument("--segment_gap", type=float, default=None, metavar="S",
                   help=f"A gap without characters this long starts a new segment (default "
                        f"{DEFAULTS.segment_gap} s).")
    g.add_argument("--max_transcribe_seconds", type=float, default=None, metavar="S",
                   help=f"Refuse longer audio (default {DEFAULTS.max_seconds:.0f} s); audio is streamed, so "
                        f"memory does not grow with the length.")
    g.add_argument("--word_timestamps", type=true_or_false, default=None, metavar="True|False",
                   help="Each segment's words with their times and probabilities in the json output (default "
                        "True: CTC timestamps cost nothing extra).")
    g.add_argument("--language", metavar="LANG",
                   help="The spoken language, as whisper's --language (a code such as en, or English): accepted "
                        "when it is the language the checkpoint transcribes (its audio_enc_metadata.json says "
                        "which), else an error naming it. The CTC head knows one language: nothing is detected.")


def true_or_false(text: str) -> bool:
    """whisper's True|False flags (any case; also 1/0, yes/no)."""
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} must be True or False")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors of the transcription flags."""
    flags = ("output_format", "output_dir", "min_silence", "segment_gap", "max_transcribe_seconds", "word_timestamps",
             "language")
    given = [f for f in flags if getattr(args, f) is not None] + (["no_vad"] if args.no_vad else [])
    if not args.transcribe:
        if given:
            parser.error(f"--{given[0]} needs --transcribe")
        return
    if args.json and args.output_format not in (None, "json"):
        parser.error(f"--json and --output_format {args.output_format} cannot be combined")
    for flag in ("min_silence", "segment_gap", "max_transcribe_seconds"):
        value = getattr(args, flag)
        if value is not None and not 0 < value < float("inf"):
            parser.error(f"--{flag} {value}: must be a positive number of seconds")


def options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the flags that were given: the rest are OmniModel.transcribe's defaults (--language is checked once,
    by run_transcribe)."""
    given = {"min_silence": args.min_silence, "segment_gap": args.segment_gap,
             "max_seconds": args.max_transcribe_seconds, "word_timestamps": args.word_timestamps}
    opts = {k: v for k, v in given.items() if v is not None}
    if args.no_vad:
        opts["vad"] = False
    if args.min_silence is not None and args.min_silence < DEFAULTS.speech_pad:
        opts["speech_pad"] = args.min_silence
    return opts


def output_paths(files: list[str], out_dir: Path, formats: tuple[str, ...]) -> list[list[Path]]:
    """INPUT.FORMAT in `out_dir` for each input; two inputs with the same name would overwrite each other."""
    seen: dict[str, str] = {}
    for f in files:
        stem = Path(f).stem
        if stem in seen:
            raise OmniError(f"--audio_in {f} and {seen[stem]}: both would be written as {stem}.* in {out_dir}")
        seen[stem] = f
    return [[out_dir / f"{Path(f).stem}.{fmt}" for fmt in formats] for f in files]


def run_transcribe(model: OmniModel, args: argparse.Namespace, con: Console, out: Out) -> int:
    """Transcribe every --audio_in; a file that fails is reported (one `error:` line) and the rest go on."""
    from tqdm import tqdm

    if args.language is not None:  # once, before any file: the checkpoint knows one language
        check_language(args.language, model.language)
    fmt = args.output_format or ("json" if args.json else "txt")
    formats = OUTPUT_FORMATS if fmt == "all" else (fmt,)
    files = args.audio_in
    to_stdout = args.output_dir is None and len(files) == 1 and fmt != "all"
    paths: list[list[Path]] = []
    if not to_stdout:
        out_dir = Path(args.output_dir or ".")
        paths = output_paths(files, out_dir, formats)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OmniError(f"--output_dir {out_dir}: cannot create ({exc.strerror or exc})") from exc
    opts = options(args)
    failed = 0
    for i, path in enumerate(files):
        bars: list[Any] = []  # made at the first report, when the file's duration is known

        def progress(done: float, total: float | None, name: str = Path(path).name) -> None:
            if not bars:
                bars.append(tqdm(total=total, desc=name, unit="s", file=sys.stderr, leave=False,
                                 disable=not con.progress_enabled, bar_format=BAR_FORMAT if total else None))
            bars[0].update(done - bars[0].n)
        try:
            result = model.transcribe(path, progress=progress, **opts)
        except OmniError as exc:
            if len(files) == 1:
                raise
            con.error(str(exc))
            failed += 1
            continue
        finally:
            for bar in bars:
                bar.close()
        if to_stdout:
            out.write(format_transcript(result, fmt))
            continue
        for fmt_i, target in zip(formats, paths[i]):
            write_text_atomic(target, format_transcript(result, fmt_i))
        con.status(f"{path}: wrote {', '.join(str(p) for p in paths[i])}")
    return 1 if failed else 0

