"""The command-line interface shared by infer_chat.py and infer_safetensors.py: a thin layer over omni.py.

Modes: one-shot when --text/--image/--audio_in/--video is given; otherwise a REPL when stdin is a terminal,
else one answer per input line (a pipe). stdout carries answers only; everything else goes to stderr.
Exit codes: 0 ok, 1 error (one `error:` line), 2 usage error (argparse), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

from utils.errors import OmniError

MAX_SEED = 2**63 - 1  # torch.Generator's limit (as utils.generation.MAX_SEED; here so usage errors skip torch)

DEFAULT_VIDEO_FRAMES = 4
ANSWER_PREFIX = "μOmni: "
USER_PROMPT = "You: "

REPL_HELP = """commands:
  /image PATH   attach an image to your next message (several may be attached)
  /video PATH   attach a video (--video_frames evenly spaced frames) to your next message
  /audio PATH   attach an audio file to your next message
  /reset        drop the attached media
  /help         show this help
  /exit, /quit  leave (Ctrl-D too); Ctrl-C stops an answer and returns to the prompt
Each turn is independent: the μOmni thinker was trained without a chat template, so it does not see
earlier questions or answers. Media attached with /image, /video or /audio is used by the next message
only (an empty message asks about it with the default prompt)."""


# ---------------------------------------------------------------- argparse value types

def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def number_in(kind: type, low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: a `kind` number in [low, high] (or (low, high] with `low_open`)."""
    def parse(text: str) -> Any:
        value = _number(text, kind)
        if value < low or (low_open and value == low) or value > high:
            bounds = f"{'(' if low_open else '['}{low:g}, {high}]" if high != math.inf else \
                (f"greater than {low:g}" if low_open else f"at least {low:g}")
            raise argparse.ArgumentTypeError(f"{value} must be {'in ' if high != math.inf else ''}{bounds}")
        return value
    return parse


positive_int = number_in(int, 1)
non_negative_int = number_in(int, 0)
seed_value = number_in(int, 0, MAX_SEED)
non_negative_float = number_in(float, 0.0)
positive_float = number_in(float, 0.0, low_open=True)
probability = number_in(float, 0.0, 1, low_open=True)


# ---------------------------------------------------------------- parser

def epilog(prog: str) -> str:
    d = "export" if "safetensors" in prog else "checkpoints"
    p = f"python {prog} --ckpt_dir {d}"
    return f"""examples:
  # one question; the answer is printed as it is generated
  {p} --text "What is one plus two?"
  # an image, a video (4 frames), an audio question, a transcript
  {p} --image cat.png --text "What colour is it?"
  {p} --video clip.mp4 --video_frames 4
  {p} --audio_in question.wav
  {p} --audio_in speech.wav --transcribe
  # also speak the answer into a WAV file
  {p} --text "Say hello" --audio_out hello.wav
  # sampling (the same seed gives the same answer)
  {p} --text "Once upon a time" --temperature 0.8 --top_p 0.9 --seed 7
  # machine-readable: one JSON object
  {p} --text "Hi" --json
  # a pipe: one answer per input line (JSON lines with --json)
  printf 'What is one plus two?\\nHello\\n' | {p}
  printf '/image cat.png\\nWhat is this?\\n' | {p} --json > answers.jsonl
  # interactive chat (type /help inside)
  {p}

Defaults for the sampling flags come from generation_config.json beside the weights when there is one.
Each question is independent: the μOmni thinker has no chat template and no conversation memory.

limits (an input beyond them is refused with one `error:` line and exit status 1):
  images     at most 64000000 pixels, checked from the header before decoding (decompression bombs)
  audio      a prompt uses at most (ctx_len // 4) tokens x downsample x 160 / 16000 s (10.24 s at ctx_len 512,
             downsample 8): only that much of the file is decoded, longer audio is trimmed with a warning
             before the spectrogram; --transcribe decodes at most 600 s
  video      at most 256 frames (--video_frames); frames obey the image pixel limit
  text       a prompt longer than the context is trimmed (its end kept) with a warning
  weights    .pt files are unpickled weights-only: tensors and plain data; a pickle that would run code is
             refused and never run; safetensors headers are validated before anything is read; a config
             may not ask for ctx_len above 131072
  --audio_out  written to a temp file then renamed: a failed write leaves no partial file
exit status: 0 ok, 1 error (one `error:` line on stderr), 2 usage error, 130 interrupted."""


MODES = ("Modes: one-shot when --text, --image, --audio_in or --video is given; otherwise an interactive chat when "
         "stdin is a terminal, else one answer per line of stdin (lines '/image PATH', '/video PATH', '/audio PATH' "
         "attach media to the next line). Answers go to stdout; loading messages, warnings and progress to stderr.")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=(description or "").strip() + "\n\n" + textwrap.fill(MODES, 100),
        epilog=epilog(prog), formatter_class=argparse.RawDescriptionHelpFormatter)

    g = p.add_argument_group("model")
    g.add_argument("--ckpt_dir", required=True, metavar="DIR",
                   help="Checkpoint directory: a thinker dir, an omni_sft dir, a trainers' checkpoints/ root, an "
                        "audio encoder dir (with --transcribe) or a merged safetensors export.")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="Where to run: auto picks cuda, then mps, then cpu (default auto); naming a device this "
                        "machine lacks is an error (exit 1).")
    g.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="Compute precision (default: the stored weights' precision, float32 for μOmni).")
    g.add_argument("--quantize", default=None, choices=("int8", "int4"),
                   help="Quantize the linear layers for speed: int8 (weights per output channel) or int4 (CPU; "
                        "4-bit weights in groups of 32); answers may differ slightly from float32.")
    g.add_argument("--threads", type=non_negative_int, default=None, metavar="N",
                   help="CPU threads for torch (default 1, or OMP_NUM_THREADS when set: more threads rarely "
                        "help models this small and slow them down badly on a busy machine; 0 = one per core).")

    g = p.add_argument_group("input (any of these makes it a one-shot question)")
    g.add_argument("--text", help="The question or instruction.")
    g.add_argument("--prompt", help="Text used when --text is absent, instead of the built-in prompts "
                                    "(\"Describe what you see concisely.\" with an image or video, "
                                    "\"What did you hear?\" with audio only).")
    g.add_argument("--image", metavar="PATH", help="Image file (png, jpg, ...) to ask about: one image token.")
    g.add_argument("--video", metavar="PATH", help="Video file to ask about: --video_frames evenly spaced frames "
                                                   "become image tokens, in order.")
    g.add_argument("--video_frames", type=positive_int, default=DEFAULT_VIDEO_FRAMES, metavar="N",
                   help=f"How many frames to take from --video or /video (default {DEFAULT_VIDEO_FRAMES}).")
    g.add_argument("--audio_in", metavar="PATH", help="Audio file (wav, flac, ogg) to ask about; resampled to "
                                                      "16 kHz mono.")
    g.add_argument("--batch_file", metavar="PATH",
                   help="Answer many requests: a JSON Lines file, one object per line with \"text\" and optional "
                        "\"image\", \"audio_in\", \"video\" paths (relative to the current directory, else to "
                        "the file's). Decoded --batch_size at a time; one JSON answer per line on stdout, in order.")
    g.add_argument("--batch_size", type=positive_int, default=8, metavar="N",
                   help="Requests decoded together with --batch_file (default 8).")
    g.add_argument("--transcribe", action="store_true",
                   help="Print the CTC transcript of --audio_in (from the audio encoder's character head) and exit.")

    g = p.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=positive_int, default=None, metavar="N",
                   help="Most tokens to generate (default: generation_config.json, else 64; never more than "
                        "the context has room for).")
    g.add_argument("--temperature", type=non_negative_float, default=None, metavar="T",
                   help="Sampling temperature; 0 means greedy decoding (the default).")
    g.add_argument("--top_k", type=non_negative_int, default=None, metavar="K",
                   help="Sample only among the K most likely tokens (0 = no limit, the default).")
    g.add_argument("--top_p", type=probability, default=None, metavar="P",
                   help="Nucleus sampling: sample among the most likely tokens whose probabilities sum to P, "
                        "in (0, 1] (default 1 = off).")
    g.add_argument("--repetition_penalty", type=positive_float, default=None, metavar="R",
                   help="Divide the scores of tokens already in the prompt or answer by R (> 0; 1 = off, "
                        "the default; 1.1-1.3 discourages loops).")
    g.add_argument("--seed", type=seed_value, default=None, metavar="S",
                   help="Random seed for sampling: the same seed gives the same output (text and speech).")
    g.add_argument("--ignore_eos", action="store_true",
                   help="Keep generating after the end-of-sequence token, up to --max_new_tokens.")
    g.add_argument("--decode_attention", choices=("causal", "reference"), default=None,
                   help="'causal' (the default, also a generation_config.json's unless it says otherwise) attends "
                        "to every earlier position, as the models were trained. 'reference' reproduces a DEFECT of "
                        "the μOmni reference implementation (each generated token attends to the first position "
                        "only), kept only to compare with its old outputs; answers are wrong in that mode.")

    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true",
                   help="Print one JSON object per answer (keys text, token_ids, prompt_tokens, generated_tokens, "
                        "timing; plus audio_out with --audio_out, input in pipe mode) instead of plain text.")
    g.add_argument("--no_stream", action="store_true",
                   help="Print each answer when it is complete instead of token by token.")
    g.add_argument("--audio_out", metavar="PATH",
                   help="Also speak the answer into this 16 kHz mono WAV (one-shot only). The μOmni Talker is "
                        "not conditioned on the text: only the length follows the answer (about 5 frames of "
                        "80 ms per word, i.e. 12.5 frames/s at ~2.5 words/s).")
    g.add_argument("--audio_temperature", type=non_negative_float, default=0.0, metavar="T",
                   help="Talker sampling temperature (0 = greedy, the default).")
    g.add_argument("--audio_top_k", type=non_negative_int, default=0, metavar="K",
                   help="Talker top-k sampling (0 = no limit, the default).")
    g.add_argument("--max_audio_frames", type=positive_int, default=None, metavar="N",
                   help="Cap the speech at N talker frames (N x 80 ms; default: the talker's limit).")
    g.add_argument("--vocoder", choices=("auto", "hifigan", "griffin-lim"), default="auto",
                   help="Mel-to-wave: auto (default) uses HiFi-GAN when a vocoder.pt/hifigan.pt was found, "
                        "else Griffin-Lim.")

    g = p.add_argument_group("messages")
    g.add_argument("--quiet", action="store_true", help="Print nothing on stderr except errors.")
    g.add_argument("--verbose", action="store_true", help="Show Python tracebacks for errors.")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors that argparse cannot express on its own (exit 2)."""
    if args.transcribe and not args.audio_in:
        parser.error("--transcribe needs --audio_in")
    if args.transcribe and args.audio_out is not None:
        parser.error("--transcribe and --audio_out cannot be combined")
    if args.audio_out is not None and not one_shot(args):
        parser.error("--audio_out needs a one-shot question (--text, --image, --audio_in or --video)")
    if args.quiet and args.verbose:
        parser.error("--quiet and --verbose cannot be combined")
    if args.batch_file is not None and (one_shot(args) or args.transcribe or args.audio_out is not None):
        parser.error("--batch_file cannot be combined with --text, --image, --audio_in, --video, --transcribe "
                     "or --audio_out (put the inputs in the file)")


def one_shot(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.text, args.image, args.audio_in, args.video))


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the flags that were given: the rest come from generation_config.json or the library defaults."""
    opts = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                          "repetition_penalty", "seed", "decode_attention")}
    opts["ignore_eos"] = args.ignore_eos or None
    return {k: v for k, v in opts.items() if v is not None}


# ---------------------------------------------------------------- stderr

class Console:
    """stderr messages: info and warnings unless --quiet; errors always. Loading chatter (`status`) only on a
    terminal or with --verbose, so a script's stderr holds just warnings and the one `error:` line."""

    def __init__(self, quiet: bool, err: TextIO | None = None, verbose: bool = False) -> None:
        self.quiet = quiet
        self.verbose = verbose
        self.err = err or sys.stderr

    def status(self, msg: str) -> None:
        if self.verbose or (not self.quiet and self.err.isatty()):
            print(msg, file=self.err, flush=True)

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.err, flush=True)

    def warn(self, msg: str) -> None:
        self.info(f"warning: {msg}")

    def error(self, msg: str) -> None:
        print(f"error: {msg}", file=self.err, flush=True)

    @property
    def progress_enabled(self) -> bool:
        return not self.quiet and self.err.isatty()

    def progress(self, total: int, desc: str):
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="step", file=self.err, leave=False,
                    disable=not self.progress_enabled)


def route_warnings(con: Console) -> None:
    """Python warnings become one `warning:` line on stderr (none with --quiet)."""
    if con.quiet:
        warnings.simplefilter("ignore")
        return

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        con.warn(str(message))
    warnings.showwarning = show


# ---------------------------------------------------------------- output

class Out:
    """stdout, flushed after every write (answers stream as they are generated)."""

    def __init__(self, stream: TextIO | None = None, one_line: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.one_line = one_line  # pipe mode: an answer never spans lines

    def write(self, text: str) -> None:
        if self.one_line:
            text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
        self.stream.write(text)
        self.stream.flush()

    def line(self, text: str = "") -> None:
        self.write(text)
        self.stream.write("\n")
        self.stream.flush()

    def json(self, obj: dict[str, Any]) -> None:
        self.stream.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.stream.flush()


def speak(model: Any, args: argparse.Namespace, text: str, con: Console) -> dict[str, Any]:
    """Synthesise `text` into args.audio_out; returns the --json "audio_out" object."""
    from utils.audio import write_wav
    from utils.speech import GRIFFIN_LIM_ITERS, choose_vocoder

    kind = choose_vocoder(model.c.vocoder, args.vocoder)
    if not text.strip():
        raise OmniError(f"--audio_out {args.audio_out}: the answer is empty, so there is nothing to speak "
                        f"(no file written)")
    frames = model.speech_frames(text, args.max_audio_frames)
    if kind == "hifigan":
        con.info(f"speech: {frames} talker frames, HiFi-GAN vocoder ({model.c.sources.get('vocoder', '?')})")
    else:
        why = "" if args.vocoder == "griffin-lim" else " (no vocoder.pt or hifigan.pt found)"
        con.info(f"speech: {frames} talker frames, Griffin-Lim vocoder{why}")
    with con.progress(frames + (GRIFFIN_LIM_ITERS if kind == "griffin-lim" else 0), "speech") as bar:
        speech = model.speak(text, frames=frames, temperature=args.audio_temperature, top_k=args.audio_top_k,
                             seed=args.seed, decode_attention=args.decode_attention, vocoder=kind,
                             progress=bar.update)
    for note in speech.notes:
        con.warn(note)
    write_wav(args.audio_out, speech.wave, speech.sample_rate)
    con.info(f"wrote {args.audio_out}: {speech.seconds:.2f} s, {speech.sample_rate} Hz mono")
    return {"path": str(args.audio_out), "frames": speech.frames, "seconds": round(speech.seconds, 6),
            "sample_rate": speech.sample_rate, "vocoder": speech.vocoder}


def check_audio_out(model: Any, args: argparse.Namespace) -> None:
    """Fail before generating the answer if speech cannot be written."""
    from utils.audio import check_output_path
    from utils.speech import choose_vocoder

    model.require("--audio_out", "talker", "rvq")
    choose_vocoder(model.c.vocoder, args.vocoder)
    check_output_path(args.audio_out)


# ---------------------------------------------------------------- modes

def run_one_shot(model: Any, args: argparse.Namespace, con: Console, out: Out) -> int:
    if args.transcribe:
        text = model.transcribe(args.audio_in)
        out.json({"text": text}) if args.json else out.line(text)
        return 0
    if args.audio_out is not None:
        check_audio_out(model, args)
    if args.prompt is not None and args.text is not None:
        con.warn("--prompt is ignored because --text is given")
    stream = not (args.json or args.no_stream)
    started = []

    def on_text(piece: str) -> None:
        started.append(True)
        out.write(piece)

    try:
        ans = model.answer(args.text, image=args.image, audio=args.audio_in, video=args.video,
                           video_frames=args.video_frames, prompt=args.prompt, on_text=on_text if stream else None,
                           **generation_options(args))
    except BaseException:
        if started:
            out.line()  # end the partial answer's line
        raise
    if stream:
        out.line()
    elif not args.json:
        out.line(ans.text)
    for note in ans.warnings:
        con.warn(note)
    result = ans.to_json()
    if args.audio_out is not None:
        result["audio_out"] = speak(model, args, ans.text, con)
    if args.json:
        out.json(result)
    return 0


@dataclass
class Attachments:
    """Media waiting for the next message (REPL and pipe mode)."""
    images: list[Any] = field(default_factory=list)  # image tensors and video frames, in attach order
    audio: Any = None
    names: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.images) or self.audio is not None

    def clear(self) -> None:
        self.images, self.audio, self.names = [], None, []


def attach(model: Any, cmd: str, arg: str, media: Attachments, video_frames: int) -> str:
    """Decode the file now (so a bad path is reported at once) and keep it for the next message."""
    if not arg:
        raise OmniError(f"/{cmd} needs a file path, e.g. /{cmd} {'clip.mp4' if cmd == 'video' else 'file'}")
    path = os.path.expanduser(arg.strip().strip("'\""))
    if cmd == "image":
        model.require("/image", "vision", "proj_v")
        media.images.append(model.image_tensor(path))
    elif cmd == "video":
        from utils.image import load_video_frames
        model.require("/video", "vision", "proj_v")
        media.images.extend(load_video_frames(path, video_frames))
    else:
        model.require("/audio", "audio", "proj_a")
        replaced = media.audio is not None
        media.audio = model.audio_wave(path)
        media.names.append(f"audio {path}")
        return f"attached audio {path}" + (" (replacing the earlier audio: one per message)" if replaced else "")
    media.names.append(f"{cmd} {path}")
    return f"attached {cmd} {path}" + (f" ({video_frames} frames)" if cmd == "video" else "")


MEDIA_COMMANDS = ("image", "video", "audio")


def split_command(line: str) -> tuple[str, str] | None:
    """'/image cat.png' -> ('image', 'cat.png'); None for an ordinary message."""
    s = line.strip()
    if not s.startswith("/") or len(s) < 2 or not s[1].isalpha():
        return None
    name, _, arg = s[1:].partition(" ")
    return name.lower(), arg.strip()


def ask(model: Any, args: argparse.Namespace, text: str | None, media: Attachments,
        on_text: Callable[[str], None] | None) -> Any:
    return model.answer(text, image=list(media.images) or None, audio=media.audio, prompt=args.prompt,
                        on_text=on_text, **generation_options(args))


MAX_LINE_CHARS = 1_000_000  # one pipe line; bounds memory when stdin has no newlines (e.g. < /dev/zero)


def bounded_lines(stream: TextIO) -> Iterator[str | None]:
    """The stream's lines; None stands for a line longer than MAX_LINE_CHARS (its rest is skipped unread)."""
    while line := stream.readline(MAX_LINE_CHARS):
        if len(line) < MAX_LINE_CHARS or line.endswith("\n"):
            yield line
            continue
        while (rest := stream.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
            pass
        yield None


def run_pipe(model: Any, args: argparse.Namespace, con: Console, out: Out, lines: TextIO) -> int:
    """One answer per input line (one JSON object per line with --json); '/image PATH' lines attach media."""
    out.one_line = True
    media = Attachments()
    status = 0
    stream = not (args.json or args.no_stream)
    number = 0
    for number, raw in enumerate(bounded_lines(lines), 1):
        if raw is None:
            con.error(f"line {number}: longer than {MAX_LINE_CHARS} characters; skipped")
            status = 1
            continue
        line = raw.rstrip("\r\n")
        cmd = split_command(line)
        if cmd and cmd[0] in MEDIA_COMMANDS + ("reset",):
            try:
                if cmd[0] == "reset":
                    media.clear()
                else:
                    con.info(f"line {number}: " + attach(model, cmd[0], cmd[1], media, args.video_frames))
            except OmniError as exc:
                con.error(f"line {number}: {exc}")
                status = 1
            continue
        if not line.strip() and not media:
            # keep the answers aligned with the input lines: an empty line gets an empty answer
            if args.json:
                out.json({"input": line, "text": "", "token_ids": [], "prompt_tokens": 0, "generated_tokens": 0,
                          "timing": {"load_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "decode_tokens_per_s": 0.0}})
            else:
                out.line()
            continue
        started = []

        def on_text(piece: str) -> None:
            started.append(True)
            out.write(piece)

        try:
            ans = ask(model, args, line if line.strip() else None, media, on_text if stream else None)
        except OmniError as exc:
            con.error(f"line {number}: {exc}")
            if args.json:
                out.json({"input": line, "error": str(exc)})
            else:
                out.line()  # ends a partial answer, or stands in for the missing one
            status = 1
            media.clear()
            continue
        except BaseException:
            if started:
                out.line()
            raise
        media.clear()
        for note in ans.warnings:
            con.warn(f"line {number}: {note}")
        if args.json:
            out.json({"input": line, **ans.to_json()})
        elif stream:
            out.line()
        else:
            out.line(ans.text)
    if number == 0:
        con.warn("stdin is empty: nothing to answer (give --text, --image, --audio_in or --video, pipe questions "
                 "in, or run in a terminal for the interactive chat)")
    return status


BATCH_PATH_KEYS = ("image", "audio_in", "video")


def read_batch_file(path: str) -> list[tuple[int, Any]]:
    """(line number, parsed JSON or an OmniError) for each non-blank line of a JSON Lines file."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise OmniError(f"--batch_file {path}: cannot read ({exc.strerror or exc})") from exc
    base = Path(path).resolve().parent
    rows: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            rows.append((number, OmniError(f"not valid JSON ({exc})")))
            continue
        if not isinstance(obj, dict):
            rows.append((number, OmniError(f"expected a JSON object, found {type(obj).__name__}")))
            continue
        bad = [k for k in ("text", "prompt", *BATCH_PATH_KEYS) if k in obj and not isinstance(obj[k], str)]
        if bad:
            rows.append((number, OmniError(f"{bad[0]} must be a string")))
            continue
        for key in BATCH_PATH_KEYS:  # relative to the current directory, else to the batch file
            if key in obj and not Path(obj[key]).is_absolute() and not Path(obj[key]).exists():
                if (base / obj[key]).exists():
                    obj[key] = str(base / obj[key])
        rows.append((number, obj))
    return rows


def run_batch_file(model: Any, args: argparse.Namespace, con: Console, out: Out) -> int:
    """--batch_file: one JSON object per request line, in order ({"line", "input", answer keys} or
    {"line", "input", "error"}), printed as each batch of --batch_size requests finishes; exit 1 if any failed."""
    rows = read_batch_file(args.batch_file)
    if not rows:
        con.warn(f"--batch_file {args.batch_file}: no requests in it")
    gen = generation_options(args)
    status = 0
    start = 0
    while start < len(rows):
        end, n = start, 0  # the rows up to the next --batch_size requests
        while end < len(rows) and n < args.batch_size:
            n += not isinstance(rows[end][1], OmniError)
            end += 1
        chunk = rows[start:end]
        requests = [obj for _, obj in chunk if not isinstance(obj, OmniError)]
        failed: dict[int, str] = {}
        answers = model.answer_batch(requests, batch_size=len(requests) or 1,
                                     on_error=lambda i, exc: failed.__setitem__(i, str(exc)), **gen)
        k = 0
        for number, obj in chunk:
            if isinstance(obj, OmniError):
                con.error(f"line {number}: {obj}")
                out.json({"line": number, "error": str(obj)})
                status = 1
                continue
            ans = answers[k]
            if ans is None:
                con.error(f"line {number}: {failed[k]}")
                out.json({"line": number, "input": obj, "error": failed[k]})
                status = 1
            else:
                for note in ans.warnings:
                    con.warn(f"line {number}: {note}")
                out.json({"line": number, "input": obj, **ans.to_json()})
            k += 1
        start = end
    return status


def run_repl(model: Any, args: argparse.Namespace, con: Console, out: Out) -> int:
    """Interactive chat on a terminal."""
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    con.info(f"μOmni chat ({', '.join(model.components)} on {model.device}). Type /help for commands, "
             f"/exit to leave. Each turn is independent (no chat history).")
    media = Attachments()
    while True:
        try:
            line = input(USER_PROMPT)
        except EOFError:
            out.line()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line, ask again
            out.line()
            continue
        cmd = split_command(line)
        if cmd:
            name, arg = cmd
            if name in ("exit", "quit"):
                return 0
            if name == "help":
                out.line(REPL_HELP)
            elif name == "reset":
                dropped = ", ".join(media.names) or "nothing was attached"
                media.clear()
                out.line(f"dropped: {dropped} (there is no chat history to forget: turns are independent)")
            elif name in MEDIA_COMMANDS:
                try:
                    out.line(attach(model, name, arg, media, args.video_frames))
                except OmniError as exc:
                    con.error(str(exc))
                except KeyboardInterrupt:  # e.g. a long video being decoded
                    out.line(" [cancelled]")
            else:
                out.line(f"unknown command /{name}: type /help for the list")
            continue
        if not line.strip() and not media:
            continue
        stream = not (args.json or args.no_stream)
        if not args.json:
            out.write(ANSWER_PREFIX)
        try:
            ans = ask(model, args, line if line.strip() else None, media, out.write if stream else None)
        except KeyboardInterrupt:
            out.line(" [stopped]")
            media.clear()
            continue
        except OmniError as exc:
            if not args.json:
                out.line()
            con.error(str(exc))
            media.clear()
            continue
        media.clear()
        if args.json:
            out.json(ans.to_json())
        else:
            out.line("" if stream else ans.text)
        for note in ans.warnings:
            con.warn(note)


# ---------------------------------------------------------------- entry point

def run(args: argparse.Namespace, con: Console) -> int:
    from omni import load_model

    out = Out()
    con.status(f"loading μOmni from {args.ckpt_dir} ...")
    model = load_model(args.ckpt_dir, device=args.device, dtype=args.dtype, quantize=args.quantize,
                       threads=args.threads)
    con.status(f"loaded {', '.join(model.components) or 'nothing'} in {model.load_seconds:.1f} s "
             f"on {model.device} ({str(model.dtype).replace('torch.', '')})")
    if args.batch_file is not None:
        return run_batch_file(model, args, con, out)
    if one_shot(args):
        return run_one_shot(model, args, con, out)
    if sys.stdin.isatty():
        return run_repl(model, args, con, out)
    return run_pipe(model, args, con, out, sys.stdin)


def utf8_streams() -> None:
    """Answers are Unicode whatever the locale says: read and write UTF-8."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        utf8 = (getattr(stream, "encoding", "") or "").lower().replace("-", "") == "utf8"
        if stream is not None and (stream is sys.stdin or not utf8):
            try:  # stdin: undecodable bytes become U+FFFD instead of a crash
                stream.reconfigure(encoding="utf-8", errors="replace")
            except (AttributeError, ValueError):
                pass


def main(argv: Sequence[str] | None, prog: str, description: str) -> int:
    utf8_streams()
    parser = build_parser(prog, description)
    args = parser.parse_args(argv)
    check_args(parser, args)
    con = Console(args.quiet, verbose=args.verbose)
    route_warnings(con)
    try:
        return run(args, con)
    except OmniError as exc:
        if args.verbose:
            traceback.print_exc()
        con.error(str(exc))
        return 1
    except KeyboardInterrupt:
        con.info("interrupted")
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head -1`): stop quietly, without a second error at interpreter exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug or an environment problem: one line, the traceback on request
        if args.verbose:
            traceback.print_exc()
        con.error(f"unexpected {type(exc).__name__}: {exc}" + ("" if args.verbose else
                                                              " (run with --verbose for the traceback)"))
        return 1
