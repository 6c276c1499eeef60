"""The command-line interface shared by infer_chat.py and infer_safetensors.py: a thin layer over omni.py.

Modes: one-shot when --text/--image/--audio_in/--video is given; otherwise a REPL when stdin is a terminal,
else one answer per input line (a pipe). stdout carries answers only; everything else goes to stderr.
Exit codes: 0 ok, 1 error (one `error:` line), 2 usage error (argparse), 130 interrupted (SIGINT), 143 terminated
(SIGTERM).
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

from utils.batch_job import answer_rows, read_batch_file
from utils.cli_transcribe import add_arguments as add_transcribe_arguments
from utils.cli_transcribe import check_args as check_transcribe_args
from utils.cli_transcribe import run_transcribe
from utils.errors import OmniError, Terminated, interrupt_status, one_line, quiet_stdout
from utils.transcript import TranscribeOptions
from utils.version import version_text

MAX_SEED = 2**63 - 1  # torch.Generator's limit (as utils.generation.MAX_SEED; here so usage errors skip torch)
MAX_VIDEO_FRAMES = 256  # as utils.image.MAX_VIDEO_FRAMES (here so usage errors skip torch)
RANDOM_SEED = -1  # --seed -1: a fresh random seed, as in llama.cpp

DEFAULT_VIDEO_FRAMES = 4
ANSWER_PREFIX = "μOmni: "
USER_PROMPT = "You: "

REPL_HELP = """commands:
  /image PATH   attach an image to your next message (several may be attached)
  /video PATH   attach a video (--video_frames evenly spaced frames) to your next message
  /audio PATH   attach an audio file to your next message (several may be attached)
  /reset        drop the attached media
  /set          show the sampling options; /set NAME VALUE changes one (e.g. /set temperature 0.7,
                /set seed 7, /set max_new_tokens 16; NAME default restores it), names: SET_NAMES
  /system TEXT  set the system prompt, prepended to every question ("/system" alone clears it)
  \"\"\"           start a multi-line message; it ends at a line that ends with \"\"\"
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
seed_value = number_in(int, RANDOM_SEED, MAX_SEED)  # -1 = random
video_frame_count = number_in(int, 1, MAX_VIDEO_FRAMES)
non_negative_float = number_in(float, 0.0)
positive_float = number_in(float, 0.0, low_open=True)
probability = number_in(float, 0.0, 1, low_open=True)


# ---------------------------------------------------------------- parser

def epilog(prog: str) -> str:
    d = "export" if "safetensors" in prog else "checkpoints/demo"
    p = f"python {prog} --ckpt_dir {d}"
    return f"""examples:
  # one question; the answer is printed as it is generated
  {p} --text "What is one plus two?"
  # an image, a video (4 frames), an audio question, a transcript
  {p} --image cat.png --text "What colour is it?"
  {p} --video clip.mp4 --video_frames 4
  {p} --audio_in question.wav
  {p} --audio_in speech.wav --transcribe
  {p} --audio_in talk1.flac talk2.mp3 --transcribe --output_format srt --output_dir subs/
  # also speak the answer into a WAV file
  {p} --text "Say hello" --audio_out hello.wav
  # sampling (the same seed gives the same answer)
  {p} --text "Once upon a time" --temperature 0.8 --top_p 0.9 --seed 7
  # machine-readable: one JSON object
  {p} --text "Hi" --json
  # a pipe: one answer per input line (JSON lines with --json)
  printf 'What is one plus two?\\nHello\\n' | {p}
  printf '/image cat.png\\nWhat is this?\\n' | {p} --json > answers.jsonl
  # interactive chat (type /help inside; \"\"\" starts and ends a multi-line message)
  {p}
  # a system prompt (prepended to each question), the model card, timings, versions
  {p} --system "Answer briefly." --text "Hi"
  {p} --info --json
  {p} --text "Hi" --timings
  python {prog} --version

Defaults for the sampling flags come from generation_config.json beside the weights when there is one.
Each question is independent: the μOmni thinker has no chat template and no conversation memory.

limits (an input beyond them is refused with one `error:` line and exit status 1):
  images     at most 64000000 pixels and 200000000 decoded bytes, checked from the header before decoding
  audio      a prompt uses at most (ctx_len // 4) tokens x downsample x 160 / 16000 s (10.24 s at ctx_len 512,
             downsample 8): only that much of the file is decoded, longer audio is trimmed with a warning
             before the spectrogram; --transcribe streams files in bounded memory, up to
             --max_transcribe_seconds (default {TranscribeOptions().max_seconds:.0f} s)
  video      at most 256 frames (--video_frames); frames obey the image pixel limit
  text       a prompt too long for the context beside the answer budget is trimmed (its end kept) with a
             warning; the budget is reduced (with a warning) only when the context cannot hold it at all
  weights    .pt files are unpickled weights-only: tensors and plain data; a pickle that would run code is
             refused and never run; safetensors headers are validated before anything is read; a config
             may not ask for ctx_len above 131072
  --audio_out  written to a temp file then renamed: a failed write leaves no partial file
  files      configs and --batch_file are read only when regular files (JSON at most 16 MiB, a batch file
             at most 64 MiB); safetensors headers at most 16 MiB and 65536 tensors
exit status: 0 ok, 1 error (one `error:` line on stderr), 2 usage error, 130 interrupted, 143 terminated."""


MODES = ("Modes: one-shot when --text, --image, --audio_in or --video is given; otherwise an interactive chat when "
         "stdin is a terminal, else one answer per line of stdin (lines '/image PATH', '/video PATH', '/audio PATH' "
         "attach media to the next line). Answers go to stdout; loading messages, warnings and progress to stderr.")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=(description or "").strip() + "\n\n" + textwrap.fill(MODES, 100),
        epilog=epilog(prog), formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)

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
    g.add_argument("--image", metavar="PATH", action="append",
                   help="Image file (png, jpg, ...) to ask about: one image token. Repeat it for several images "
                        "(tokens in the order given, before the video frames).")
    g.add_argument("--video", metavar="PATH", help="Video file to ask about: --video_frames evenly spaced frames "
                                                   "become image tokens, in order.")
    g.add_argument("--video_frames", type=video_frame_count, default=DEFAULT_VIDEO_FRAMES, metavar="N",
                   help=f"How many frames to take from --video or /video, 1 to {MAX_VIDEO_FRAMES} "
                        f"(default {DEFAULT_VIDEO_FRAMES}).")
    g.add_argument("--audio_in", metavar="PATH", action="extend", nargs="+",
                   help="Audio file (wav, flac, ogg, mp3, m4a/aac, ...) to ask about; resampled to 16 kHz mono. "
                        "Several (--audio_in a b, or the flag repeated): their tokens follow each other in the "
                        "order given; with --transcribe, each file is transcribed.")
    g.add_argument("--batch_file", metavar="PATH",
                   help="Answer many requests: a JSON Lines file, one object per line with \"text\" and optional "
                        "\"image\", \"audio_in\", \"video\" paths (relative to the current directory, else to "
                        "the file's). Decoded --batch_size at a time; one JSON answer per line on stdout, in order.")
    g.add_argument("--batch_size", type=positive_int, default=8, metavar="N",
                   help="Requests decoded together with --batch_file (default 8).")
    g.add_argument("--transcribe", action="store_true",
                   help="Transcribe the --audio_in files with the audio encoder's CTC character head (segment "
                        "and word timestamps; any length, streamed) and exit; see 'transcription' below.")

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
                   help="Random seed for sampling: the same seed gives the same output (text and speech); -1 picks "
                        "a random one (shown with --verbose and in --json as \"seed\").")
    g.add_argument("--system", metavar="TEXT",
                   help="System prompt. μOmni has no chat template, so it is prepended to every question as plain "
                        "text: the prompt becomes [bos] + encode(\"TEXT QUESTION\"), the join the μOmni SFT trainer "
                        "used (without --system it is [bos] + encode(\"QUESTION\") as always). /system TEXT changes "
                        "it in the chat and in pipes.")
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

    g.add_argument("--info", action="store_true",
                   help="Print the model card and exit: components, parameter counts, dtype, context length, "
                        "vocabulary, the weights and config file of each component, decode mode, generation "
                        "defaults (one JSON object with --json).")
    add_transcribe_arguments(p)

    g = p.add_argument_group("messages")
    g.add_argument("--quiet", action="store_true", help="Print nothing on stderr except errors.")
    g.add_argument("--verbose", action="store_true",
                   help="Show loading messages, the timing summary and Python tracebacks for errors.")
    g.add_argument("--timings", action="store_true",
                   help="After each answer print a timing summary on stderr, as llama.cpp does: load, prompt eval "
                        "and eval (tokens, ms, ms per token, tokens per second).")
    g.add_argument("--version", action="version", version=version_text(prog),
                   help="Print the suite's, torch's and Python's versions and exit.")
    add_dash_aliases(p)
    return p


# Spellings kept working now that prefixes are off (allow_abbrev=False): --temp is llama.cpp's name.
EXTRA_ALIASES = {"--temperature": ("--temp",)}


def add_dash_aliases(parser: argparse.ArgumentParser) -> None:
    """Every --snake_case flag also answers to --kebab-case (and EXTRA_ALIASES), so both spellings users bring
    from other tools work; exact names only, never prefixes."""
    for action in list(parser._actions):
        for opt in list(action.option_strings):
            aliases = list(EXTRA_ALIASES.get(opt, ()))
            if opt.startswith("--") and "_" in opt[2:]:
                aliases.append("--" + opt[2:].replace("_", "-"))
            for alias in aliases:
                if alias not in parser._option_string_actions:
                    action.option_strings.append(alias)
                    parser._option_string_actions[alias] = action


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors that argparse cannot express on its own (exit 2)."""
    check_transcribe_args(parser, args)
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
    if args.info and (one_shot(args) or args.batch_file is not None or args.transcribe or args.audio_out):
        parser.error("--info prints the model card only: drop the inputs (--text, --image, ...) or --info")


def one_shot(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.text, args.image, args.audio_in, args.video))


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the flags that were given: the rest come from generation_config.json or the library defaults."""
    opts = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                          "repetition_penalty", "seed", "decode_attention")}
    opts["ignore_eos"] = args.ignore_eos or None
    opts["system"] = args.system or None
    return {k: v for k, v in opts.items() if v is not None}


def print_timings(con: "Console", ans: Any) -> None:
    """llama.cpp's end-of-answer summary, on stderr: load, prompt eval and eval (decode steps)."""
    t = ans.timing
    prefill_ms, decode_ms, steps = t["prefill_s"] * 1000, t["decode_s"] * 1000, t.get("decode_steps", 0)

    def rate(ms: float, n: int, unit: str) -> str:
        per = f"{ms / n:8.2f} ms per token, {n * 1000 / ms:9.2f} tokens per second" if n and ms > 0 else \
            "no tokens timed"
        return f"{ms:10.2f} ms / {n:5d} {unit} ({per})"
    con.always(f"timings:        load time = {t['load_s'] * 1000:10.2f} ms")
    con.always(f"timings: prompt eval time = {rate(prefill_ms, ans.prompt_tokens, 'tokens')}")
    con.always(f"timings:        eval time = {rate(decode_ms, steps, 'runs  ')}")
    con.always(f"timings:       total time = {prefill_ms + decode_ms:10.2f} ms / "
               f"{ans.prompt_tokens + ans.generated_tokens:5d} tokens")


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
        self.info(f"warning: {one_line(msg)}")

    def error(self, msg: str) -> None:
        print(f"error: {one_line(msg)}", file=self.err, flush=True)

    def always(self, msg: str) -> None:
        """Output the user asked for on stderr (--timings): shown even with --quiet."""
        print(msg, file=self.err, flush=True)

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
        text = json.dumps(obj, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (a non-UTF-8 file name, "\ud800" in a request): JSON escapes
            text = json.dumps(obj)
        self.stream.write(text + "\n")
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
        return run_transcribe(model, args, con, out)
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
    if args.timings or args.verbose:
        print_timings(con, ans)
    result = {**ans.to_json(), **seed_report(args)}
    if args.audio_out is not None:
        result["audio_out"] = speak(model, args, ans.text, con)
    if args.json:
        out.json(result)
    return 0


@dataclass
class Attachments:
    """Media waiting for the next message (REPL and pipe mode)."""
    images: list[Any] = field(default_factory=list)  # image tensors and video frames, in attach order
    audio: list[Any] = field(default_factory=list)  # waveforms, in attach order
    names: list[str] = field(default_factory=list)
    paths: dict[str, list[str]] = field(default_factory=dict)  # "image"/"video"/"audio_in" -> paths, for `input`
    failed: str | None = None  # a failed /image, /video or /audio: the next message is not answered without it

    def __bool__(self) -> bool:
        return bool(self.images) or bool(self.audio) or self.failed is not None

    def clear(self) -> None:
        self.images, self.audio, self.names, self.paths, self.failed = [], [], [], {}, None


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
        media.audio.append(model.audio_wave(path))
    media.names.append(f"{cmd} {path}")
    media.paths.setdefault("audio_in" if cmd == "audio" else cmd, []).append(path)
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
    return model.answer(text, image=list(media.images) or None, audio=list(media.audio) or None,
                        prompt=args.prompt, on_text=on_text, **generation_options(args))


# /set NAME VALUE: the generation flags, parsed by the same argparse types as on the command line
SETTABLE = {"max_new_tokens": positive_int, "temperature": non_negative_float, "top_k": non_negative_int,
            "top_p": probability, "repetition_penalty": positive_float, "seed": seed_value,
            "decode_attention": None, "ignore_eos": None}
SET_ALIASES = {"temp": "temperature", "max_tokens": "max_new_tokens", "num_predict": "max_new_tokens",
               "repeat_penalty": "repetition_penalty"}


def set_option(model: Any, args: argparse.Namespace, arg: str) -> str:
    """`/set` (show the options in effect), `/set NAME VALUE`, `/set NAME default`; Ollama's
    `/set parameter NAME VALUE` too. Returns the message to show; a bad name or value is an OmniError."""
    words = arg.split()
    if words[:1] == ["parameter"]:
        words = words[1:]
    if not words:
        opts = model.options(**{k: v for k, v in generation_options(args).items() if k != "system"})
        shown = ", ".join(f"{k} {getattr(opts, k)}" for k in SETTABLE)
        return f"{shown}, system {args.system!r}" if args.system else f"{shown}, system (none)"
    name = SET_ALIASES.get(words[0].replace("-", "_"), words[0].replace("-", "_"))
    if name not in SETTABLE or len(words) != 2:
        raise OmniError(f"/set {arg}: use /set NAME VALUE with NAME one of {', '.join(SETTABLE)} "
                        f"(VALUE 'default' restores it); /set alone shows them")
    value: Any = words[1]
    if value == "default":
        value = False if name == "ignore_eos" else None
    elif name == "ignore_eos":
        if value.lower() not in ("true", "false", "on", "off", "1", "0"):
            raise OmniError(f"/set ignore_eos {value}: use true or false")
        value = value.lower() in ("true", "on", "1")
    elif name == "decode_attention":
        if value not in ("reference", "causal"):
            raise OmniError(f"/set decode_attention {value}: use reference or causal")
    else:
        try:
            value = SETTABLE[name](value)
        except argparse.ArgumentTypeError as exc:
            raise OmniError(f"/set {name} {words[1]}: {exc}") from None
        if name == "seed" and value == RANDOM_SEED:
            value = random_seed()
    setattr(args, name, value)
    return f"set {name} to {'its default' if value is None else value}"


def seed_report(args: argparse.Namespace) -> dict[str, int]:
    """{"seed": S} for --json when --seed -1 picked S at random (so the answer can be reproduced), else {}."""
    return {"seed": args.seed} if getattr(args, "random_seed", False) else {}


def random_seed() -> int:
    import secrets
    return secrets.randbelow(MAX_SEED + 1)


def set_system(args: argparse.Namespace, arg: str) -> str:
    args.system = arg or None
    return f"system prompt set: {arg!r}" if arg else "system prompt cleared"


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
    """One output line per message line, in order (one JSON object per line with --json): the answer, or for a
    message that failed an error line ({"input", "error"} in JSON, else an empty line on stdout and `error:` on
    stderr). Command lines ('/image PATH', '/video PATH', '/audio PATH', '/reset', '/system TEXT',
    '/set NAME VALUE') print nothing on stdout; a media command that failed fails the message after it (one
    error, reported there), which is never answered without its media."""
    from omni import decode_timing

    out.one_line = True
    media = Attachments()
    status = 0
    stream = not (args.json or args.no_stream)
    number = 0

    def fail(line: str | None, message: str) -> None:
        nonlocal status
        con.error(f"line {number}: {message}")
        if args.json:
            out.json({"input": message_input(line), "error": message})
        else:
            out.line()
        status = 1

    def message_input(line: str | None) -> dict[str, Any]:
        """The `input` object: the line's text and the media attached to it (as --batch_file's requests)."""
        return {"text": line, **media.paths}

    for number, raw in enumerate(bounded_lines(lines), 1):
        if raw is None:
            fail(None, f"longer than {MAX_LINE_CHARS} characters; not answered")
            media.clear()
            continue
        line = raw.rstrip("\r\n")
        cmd = split_command(line)
        if cmd and cmd[0] in MEDIA_COMMANDS + ("reset", "system", "set"):
            try:
                if cmd[0] == "reset":
                    media.clear()
                elif cmd[0] == "system":
                    con.info(f"line {number}: " + set_system(args, cmd[1]))
                elif cmd[0] == "set":
                    con.info(f"line {number}: " + set_option(model, args, cmd[1]))
                else:
                    con.info(f"line {number}: " + attach(model, cmd[0], cmd[1], media, args.video_frames))
            except OmniError as exc:
                if cmd[0] in MEDIA_COMMANDS:  # reported once, with the message it fails (or at the end)
                    media.failed = media.failed or f"because of line {number}: {exc}"
                else:
                    con.error(f"line {number}: {exc}")
                    status = 1
            continue
        if media.failed is not None:
            fail(line, f"not answered, {media.failed}")
            media.clear()
            continue
        if not line.strip() and not media:
            # keep the answers aligned with the input lines: an empty line gets an empty answer
            if args.json:
                out.json({"input": message_input(line), "text": "", "token_ids": [], "prompt_tokens": 0,
                          "generated_tokens": 0, "timing": decode_timing(0.0, 0.0, 0, 0.0, 0)})
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
            if started:
                out.line()  # ends a partial answer
                con.error(f"line {number}: {exc}")
                status = 1
            else:
                fail(line, str(exc))
            media.clear()
            continue
        except BaseException:
            if started:
                out.line()
            raise
        for note in ans.warnings:
            con.warn(f"line {number}: {note}")
        if args.timings or args.verbose:
            print_timings(con, ans)
        if args.json:
            out.json({"input": message_input(line), **ans.to_json(), **seed_report(args)})
        elif stream:
            out.line()
        else:
            out.line(ans.text)
        media.clear()
    if media.failed is not None:
        con.error(f"no message followed the media command that failed {media.failed}")
        status = 1
    if number == 0:
        con.warn("stdin is empty: nothing to answer (give --text, --image, --audio_in or --video, pipe questions "
                 "in, or run in a terminal for the interactive chat)")
    return status


def run_batch_file(model: Any, args: argparse.Namespace, con: Console, out: Out) -> int:
    """--batch_file: one JSON object per request line, in order ({"line", "input", answer keys} or
    {"line", "input", "error"}), printed as each batch of --batch_size requests finishes; exit 1 if any failed.
    (batch.py runs the same requests as a resumable job, locally or on Ray.)"""
    rows = read_batch_file(args.batch_file)
    if not rows:
        con.warn(f"--batch_file {args.batch_file}: no requests in it")
    gen = generation_options(args)
    status = 0
    start = 0
    while start < len(rows):
        end, n = start, 0  # the rows up to the next --batch_size requests
        while end < len(rows) and n < args.batch_size:
            n += rows[end].request is not None
            end += 1
        chunk = rows[start:end]
        for row, result in zip(chunk, answer_rows(model, chunk, gen)):
            given = {} if row.request is None else {"input": row.request}
            if isinstance(result, OmniError):
                con.error(f"line {row.line}: {result}")
                out.json({"line": row.line, **given, "error": str(result)})
                status = 1
                continue
            for note in result.get("warnings", []):
                con.warn(f"line {row.line}: {note}")
            out.json({"line": row.line, **given, **result})
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
            line = read_message(input(USER_PROMPT))
        except EOFError:
            out.line()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line, ask again
            out.line()
            continue
        cmd = split_command(line) if "\n" not in line else None
        if cmd:
            name, arg = cmd
            if name in ("exit", "quit"):
                return 0
            if name == "help":
                out.line(REPL_HELP.replace("SET_NAMES", ", ".join(SETTABLE)))
            elif name == "set":
                try:
                    out.line(set_option(model, args, arg))
                except OmniError as exc:
                    con.error(str(exc))
            elif name == "system":
                out.line(set_system(args, arg))
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
        if args.timings or args.verbose:
            print_timings(con, ans)


MULTILINE = '"""'


def read_message(first: str) -> str:
    """Ollama's multi-line input: a message starting with three double quotes runs until a line ending with
    them (the quotes are dropped, the line breaks kept). Anything else is the message as typed."""
    if not first.lstrip().startswith(MULTILINE):
        return first
    text = first.lstrip()[len(MULTILINE):]
    lines = []
    while not text.rstrip().endswith(MULTILINE):
        lines.append(text)
        text = input("... ")
    lines.append(text.rstrip()[:-len(MULTILINE)])
    return "\n".join(lines).strip("\n")


# ---------------------------------------------------------------- entry point

def run(args: argparse.Namespace, con: Console) -> int:
    from omni import load_model

    out = Out()
    con.status(f"loading μOmni from {args.ckpt_dir} ...")
    model = load_model(args.ckpt_dir, device=args.device, dtype=args.dtype, quantize=args.quantize,
                       threads=args.threads)
    con.status(f"loaded {', '.join(model.components) or 'nothing'} in {model.load_seconds:.1f} s "
             f"on {model.device} ({str(model.dtype).replace('torch.', '')})")
    if args.info:
        card = model.info()
        out.json(card) if args.json else out.line(format_card(card))
        return 0
    if args.batch_file is not None:
        return run_batch_file(model, args, con, out)
    if one_shot(args):
        return run_one_shot(model, args, con, out)
    if sys.stdin.isatty():
        return run_repl(model, args, con, out)
    return run_pipe(model, args, con, out, sys.stdin)


def format_card(card: dict[str, Any]) -> str:
    """The human-readable model card (`--info` without --json)."""
    rows = [("path", card["path"]), ("format", card["format"])]
    for name, comp in card["components"].items():
        rows.append((name, f"{comp['parameters']:,} parameters"))
        rows.append(("  weights", comp["weights"]))
        rows.append(("  config", comp["config"]))
    rows.append(("parameters", f"{card['parameters']:,} in all"))
    if "thinker" in card:
        t = card["thinker"]
        rows.append(("architecture", f"{t['layers']} layers, d_model {t['d_model']}, {t['heads']} heads "
                                     f"({t['kv_heads']} KV), {t['ffn']} FFN d_ff {t['d_ff']}"
                                     + (f", {t['experts']} experts" if t["experts"] else "")
                                     + f", rope_theta {t['rope_theta']:g}"))
    rows += [("dtype", card["dtype"]), ("device", card["device"]), ("context length", card["context_length"])]
    if "vocabulary" in card:
        v = card["vocabulary"]
        rows.append(("vocabulary", f"{v['tokenizer_pieces']} tokenizer pieces, {v['embedding_rows']} embedding rows "
                                   f"({v['tokenizer']})"))
    rows.append(("decode mode", card["decode_attention"]))
    rows.append(("defaults", ", ".join(f"{k} {v}" for k, v in card["generation_defaults"].items())))
    for name, where in card["missing"].items():
        rows.append((f"no {name}", f"searched {where}"))
    return "\n".join(f"{k:<16}{v}" for k, v in rows)


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
    if args.seed == RANDOM_SEED:
        args.seed, args.random_seed = random_seed(), True
        con.status(f"seed: {args.seed} (--seed -1: random)")
    try:
        return run(args, con)
    except OmniError as exc:
        if args.verbose:
            traceback.print_exc()
        con.error(str(exc))
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        con.info("interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc))
        return interrupt_status(exc)
    except BrokenPipeError:
        # the reader went away (e.g. `| head -1`): stop quietly, without a second error at interpreter exit
        quiet_stdout()
        return 0
    except Exception as exc:  # a bug or an environment problem: one line, the traceback on request
        if args.verbose:
            traceback.print_exc()
        con.error(f"unexpected {type(exc).__name__}: {exc}" + ("" if args.verbose else
                                                              " (run with --verbose for the traceback)"))
        return 1
