"""The command line's arguments: argparse value types (the generation flags' from their rows of the options table,
utils.base.options), the parser with its examples and dash aliases, the usage checks argparse cannot express, the
generation options they give, and `run_command`, the life of a command line (parse, check, console, exit status). Torch-free at import, so `--help`, `--version` and usage errors (exit 2)
answer at once."""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import stat
import sys
import textwrap
from typing import Any, Callable, Sequence

from utils.cli.transcribe_command import add_arguments as add_transcribe_arguments
from utils.cli.transcribe_command import check_args as check_transcribe_args
from utils.cli.console import Console, guarded, route_warnings, utf8_streams
from utils.base.defaults import (DEFAULT_VIDEO_FRAMES, DEVICES, DTYPE_NAMES, MAX_SEED, MAX_VIDEO_FRAMES, OCR_MAX_LEN,
                                 QUANTIZATIONS, RANDOM_SEED, VOCODERS)
from utils.base.errors import OmniError
from utils.base.options import BY_NAME, OPTIONS, Option, OptionError
from utils.base.transcript import TranscribeOptions
from utils.base.version import version_text


# ---------------------------------------------------------------- argparse value types

MAX_FORMAT_BYTES = 1 << 20  # a --json_schema_file or --grammar_file is read whole: bounded

# Values a command line (and the REPL's /set) takes beyond a row's range, with what they mean: --seed -1 draws
# a random seed, as in llama.cpp (resolve_random_seed replaces it before anything runs).
CLI_ONLY_VALUES: dict[str, tuple[int, str]] = {"seed": (RANDOM_SEED, "a random seed")}


def option_value(option: Option, text: str) -> Any:
    """`text` as the command line reads it for `option`: the row's parse, plus the CLI_ONLY_VALUES."""
    special = CLI_ONLY_VALUES.get(option.name)
    if special is None:
        return option.parse(text)
    value, meaning = special
    if text.strip() == str(value):
        return value
    try:
        return option.parse(text)
    except OptionError as exc:
        raise OptionError(option.name, f"{exc.reason} (or {value}: {meaning})") from None


def option_type(option: Option) -> Callable[[str], Any]:
    """An argparse type from a row of the table: a value the row refuses is a usage error (exit 2) that names
    the flag and gives the row's reason."""
    def parse(text: str) -> Any:
        try:
            return option_value(option, text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(exc.reason) from None
    return parse


def number_in(kind: type, low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type for the number flags outside the generation table (--batch_size, --threads, ...): a
    `kind` number in [low, high] (or (low, high] with `low_open`), checked as the table's rows are."""
    return option_type(Option("value", kind, None, "", low=low, high=high, low_open=low_open))


positive_int = number_in(int, 1)
non_negative_int = number_in(int, 0)
video_frame_count = number_in(int, 1, MAX_VIDEO_FRAMES)
non_negative_float = number_in(float, 0.0)
positive_float = number_in(float, 0.0, low_open=True)


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
  {p} --image sign.png --ocr
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
  # llama.cpp's spellings: -m model, -p prompt (alone: the question), -n budget, -c context, -f prompt file
  python {prog} -m {d} -p "What is one plus two?" -n 256 -c 512
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
  text       the answer budget is an upper bound: a prompt that fits is kept whole and the budget cut to the
             room it leaves; only a prompt leaving less than min(budget, a quarter of the context) is trimmed
             (its end kept); each cut is a warning, and in --json ("budget_cut", "prompt_trimmed")
  weights    .pt files are unpickled weights-only: tensors and plain data; a pickle that would run code is
             refused and never run; safetensors headers are validated before anything is read; a config
             may not ask for ctx_len above 131072
  --audio_out  written to a temp file then renamed: a failed write leaves no partial file
  files      configs and --batch_file are read only when regular files (JSON at most 16 MiB, a batch file
             at most 64 MiB); safetensors headers at most 16 MiB and 65536 tensors
exit status: 0 ok, 1 error (one `error:` line on stderr), 2 usage error, 130 interrupted, 143 terminated."""


MODES = ("Modes: one-shot when --text, --image, --audio_in or --video is given (or --prompt / -p / -f alone, as in "
         "llama.cpp); otherwise an interactive chat when "
         "stdin is a terminal, else one answer per line of stdin (lines '/image PATH', '/video PATH', '/audio PATH' "
         "attach media to the next line; '/ocr PATH' prints an image's text). Answers go to stdout; loading "
         "messages, warnings and progress to stderr.")


# Flags of other tools (llama.cpp, Ollama, whisper) with no equivalent here: one line naming the nearest flag
# of ours (or why it has no meaning), instead of the whole usage.
FOREIGN_FLAGS: dict[str, str] = {
    **dict.fromkeys(("-ngl", "--n-gpu-layers", "--gpu-layers"),
                    "the whole model runs on one device: use --device cuda (or mps, cpu)"),
    **dict.fromkeys(("-fa", "--flash-attn"), "has no meaning here (the attention kernel is chosen for the device); "
                                            "--decode_kernel picks the decode step"),
    **dict.fromkeys(("--mlock", "--no-mmap", "--mmap"), "has no meaning here (the weights are loaded into memory "
                                                        "once)"),
    **dict.fromkeys(("-cnv", "--conversation", "-i", "--interactive"),
                    "the chat starts by itself when no question is given and stdin is a terminal"),
    **dict.fromkeys(("-sys", "--system-prompt"), "use --system TEXT"),
    **dict.fromkeys(("-np", "--parallel"), "serve.py --max_batch N sets the rows decoded together"),
    "--log-disable": "use --quiet",
    "--fp16": "use --dtype float16",
    **dict.fromkeys(("--beam_size", "--best_of"), "transcription is greedy CTC decoding: there are no beams"),
}


class Parser(argparse.ArgumentParser):
    """argparse without prefixes (a new flag could silently change what one meant), where a flag of another tool
    that has no equivalent here is a one-line usage error that names the nearest flag of ours."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(allow_abbrev=False, **kw)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        for token in (sys.argv[1:] if args is None else args):
            if token == "--":
                break
            flag = token.split("=", 1)[0]
            if flag in FOREIGN_FLAGS and flag not in self._option_string_actions:
                self.exit(2, f"{self.prog}: error: {flag} is not a flag of {self.prog}: {FOREIGN_FLAGS[flag]}\n")
        return super().parse_known_args(args, namespace)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=(description or "").strip() + "\n\n" + textwrap.fill(MODES, 100),
               epilog=epilog(prog), formatter_class=argparse.RawDescriptionHelpFormatter)

    g = add_model_arguments(p, "Checkpoint directory: a thinker dir, an omni_sft dir, a trainers' checkpoints/ "
                               "root, an audio encoder dir (with --transcribe), a merged safetensors export, or one "
                               "weights file.")
    g.add_argument("--ctx_size", "-c", type=positive_int, default=None, metavar="N",
                   help="Use at most N positions of the model's context (prompt, image/audio tokens and answer "
                        "together), as llama.cpp's -c; at most the model's own context (default: all of it).")

    g = p.add_argument_group("input (any of these makes it a one-shot question)")
    g.add_argument("--text", help="The question or instruction.")
    g.add_argument("--prompt", "-p", help="Text used when --text is absent, instead of the built-in prompts "
                                          "(\"Describe what you see concisely.\" with an image or video, "
                                          "\"What did you hear?\" with audio only); without --text or media it is "
                                          "the question, answered one-shot (as llama.cpp's -p).")
    g.add_argument("--file", "-f", metavar="FILE",
                   help="Read --prompt from this file ('-' reads stdin), as llama.cpp's -f; a trailing line break "
                        "is dropped.")
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
    g.add_argument("--ocr", action="store_true",
                   help="Read the text in each --image with the OCR model (an ocr_* checkpoint directory or the "
                        "export's ocr.* weights). Without --text print it, one line per image; with --text answer "
                        "the question with it joined into the prompt as μOmni does: \"TEXT (OCR extracted: "
                        "OCR)\" (several images' texts joined by '; '), the images going in as image tokens too.")
    g.add_argument("--ocr_max_len", type=positive_int, default=OCR_MAX_LEN, metavar="N",
                   help=f"Most characters the OCR decode takes per image (default {OCR_MAX_LEN}, as in μOmni).")
    g.add_argument("--transcribe", action="store_true",
                   help="Transcribe the --audio_in files with the audio encoder's CTC character head (segment "
                        "and word timestamps; any length, streamed) and exit; see 'transcription' below.")

    add_generation_arguments(p)

    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true",
                   help="Print one JSON object per answer (keys text, token_ids, prompt_tokens, generated_tokens, "
                        "timing; plus audio_out with --audio_out, ocr_text, ocr_ids and ocr_stop with --ocr, input "
                        "in pipe mode) instead of plain text.")
    g.add_argument("--no_stream", action="store_true",
                   help="Print each answer when it is complete instead of token by token.")
    g.add_argument("--n", type=positive_int, default=1, metavar="N",
                   help="Give N answers to a one-shot question (OpenAI's n): the prompt is prefilled once and "
                        "answer i sampled with --seed + i; each answer on its own line (its own JSON object with "
                        "\"index\" and --json), when complete (default 1).")
    g.add_argument("--audio_out", metavar="PATH",
                   help="Also speak the answer into this 16 kHz mono file (one-shot only): WAV, or by its suffix "
                        "MP3 (.mp3), Opus (.opus, .ogg), AAC (.aac), FLAC (.flac) or raw 16-bit PCM (.pcm, .raw). "
                        "The μOmni Talker is not conditioned on the text: only the length follows the answer "
                        "(about 5 frames of 80 ms per word, i.e. 12.5 frames/s at ~2.5 words/s).")
    g.add_argument("--audio_temperature", type=non_negative_float, default=0.0, metavar="T",
                   help="Talker sampling temperature (0 = greedy, the default).")
    g.add_argument("--audio_top_k", type=non_negative_int, default=0, metavar="K",
                   help="Talker top-k sampling (0 = no limit, the default).")
    g.add_argument("--max_audio_frames", type=positive_int, default=None, metavar="N",
                   help="Cap the speech at N talker frames (N x 80 ms; default: the talker's limit).")
    g.add_argument("--vocoder", choices=VOCODERS, default="auto",
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
    add_version_argument(p, prog)
    add_dash_aliases(p)
    return p


def add_version_argument(p: argparse.ArgumentParser, prog: str) -> None:
    p.add_argument("--version", action="version", version=version_text(prog),
                   help="Print the suite's, torch's and Python's versions and exit.")


# Other tools' spellings of our flags (llama.cpp's, beside the dashed forms add_dash_aliases gives every flag).
EXTRA_ALIASES = {"--temperature": ("--temp",), "--max_new_tokens": ("-n", "--n-predict", "--n_predict"),
                 "--seed": ("-s",), "--repetition_penalty": ("--repeat-penalty", "--repeat_penalty")}


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


THREADS_HELP = ("CPU threads for torch and the C decode step (default 1, or OMP_NUM_THREADS when set: one answer "
                "at a time gains little from more on models this small, and torch's slow down badly on a busy "
                "machine; 0 = one per core).")
SERVICE_THREADS_HELP = ("CPU threads for torch and the C decode step (default: the physical cores this process may "
                        "use, or OMP_NUM_THREADS when set; 0 = one per logical CPU).")


def add_model_arguments(p: argparse.ArgumentParser, ckpt_help: str, threads_help: str = THREADS_HELP) -> Any:
    """Which model and how to run it: shared by infer_chat.py / infer_safetensors.py, serve.py and batch.py
    (`threads_help`: SERVICE_THREADS_HELP for the server and batch jobs, whose default is the physical cores);
    returns the group, for a script's own model flags."""
    g = p.add_argument_group("model")
    g.add_argument("--ckpt_dir", "-m", "--model", dest="ckpt_dir", required=True, metavar="DIR", help=ckpt_help)
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="Where to run: auto picks cuda, then mps, then cpu (default auto); naming a device this "
                        "machine lacks is an error (exit 1).")
    g.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="Compute precision (default: the stored weights' precision, float32 for μOmni).")
    g.add_argument("--quantize", default=None, choices=QUANTIZATIONS,
                   help="Quantize the linear layers for speed: int8 (weights per output channel) or int4 (CPU; "
                        "4-bit weights in groups of 32); answers may differ slightly from float32.")
    g.add_argument("--threads", "-t", type=non_negative_int, default=None, metavar="N", help=threads_help)
    return g


# What the command line adds to a row's help (the table's text is shared with the API and the server).
CLI_NOTES = {
    "seed": "The seed also drives the talker (--audio_out). -1 picks a random one (shown with --verbose and in "
            "--json as \"seed\").",
    "logprobs": "Shown with --json as \"logprobs\": {\"content\": [{token, logprob, bytes, top_logprobs}]}, "
                "OpenAI's shape.",
    "decode_attention": "Answers are wrong in 'reference' mode.",
    "decode_kernel": "The C step is compiled on first use with the machine's C compiler; --verbose and --json "
                     "(timing.decode_kernel) say which ran and why.",
}
# Generation flags, in the order --help lists them: the table's command-line rows.
CLI_OPTIONS = tuple(o for o in OPTIONS if o.cli)


def option_help(option: Option) -> str:
    """A flag's help: the row's meaning, the CLI's note, its accepted values and default."""
    text = " ".join(filter(None, (option.help, CLI_NOTES.get(option.name))))
    if option.kind is bool:
        return text
    default = option.default if option.default is not None else "random" if option.name == "seed" else "none"
    values = "" if option.choices is not None else f"{option.range_text()[0].upper()}{option.range_text()[1:]}. "
    return f"{text} {values}Default: generation_config.json, else {default}."


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """The sampling flags, one per command-line row of the options table (utils.base.options), shared by
    infer_chat.py / infer_safetensors.py and batch.py. Every default is None: only the flags given reach the
    library, the rest come from generation_config.json or the table's defaults."""
    g = p.add_argument_group("generation")
    for option in CLI_OPTIONS:
        flag = f"--{option.name}"
        if option.kind is bool:
            g.add_argument(flag, action="store_true", default=None, help=option_help(option))
        else:
            g.add_argument(flag, type=option_type(option), choices=option.choices, default=None,
                           metavar=option.metavar, help=option_help(option))
    g.add_argument("--system", metavar="TEXT",
                   help="System prompt. μOmni has no chat template, so it is prepended to every question as plain "
                        "text: the prompt becomes [bos] + encode(\"TEXT QUESTION\"), the join the μOmni SFT trainer "
                        "used (without --system it is [bos] + encode(\"QUESTION\") as always). /system TEXT changes "
                        "it in the chat and in pipes.")
    add_format_arguments(p)


def add_format_arguments(p: argparse.ArgumentParser) -> None:
    """The answer-format flags (llama.cpp's): together they give the response_format row of the options table
    (resolve_response_format), so they sit in a group of their own."""
    g = p.add_argument_group("structured output (constrained decoding, llguidance)")
    g.add_argument("--json_object", action="store_true",
                   help="Answer with a JSON object (constrained decoding: every token is one the JSON grammar "
                        "allows, and the answer ends only where the object is complete; cut short only when "
                        "--max_new_tokens runs out, finish_reason \"length\" in --json).")
    g.add_argument("--json_schema", metavar="SCHEMA",
                   help="Answer with JSON valid against this JSON schema (its text, as llama.cpp's -j).")
    g.add_argument("--json_schema_file", metavar="FILE", help="As --json_schema, the schema read from FILE.")
    g.add_argument("--grammar", metavar="GRAMMAR",
                   help="Answer in this grammar's language: its text, in llama.cpp's GBNF (root ::= ...) or Lark "
                        "(start: ...), as llguidance reads them.")
    g.add_argument("--grammar_file", metavar="FILE", help="As --grammar, the grammar read from FILE (e.g. a .gbnf).")


FORMAT_FLAGS = ("json_object", "json_schema", "json_schema_file", "grammar", "grammar_file")


def check_format_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """At most one of the answer-format flags; an inline --json_schema must be JSON (exit 2 otherwise). Returns
    the flag given, if any."""
    given = [f"--{name}" for name in FORMAT_FLAGS if getattr(args, name) not in (None, False)]
    if len(given) > 1:
        parser.error(f"{' and '.join(given)} cannot be combined: give one answer format")
    if args.json_schema is not None:
        try:
            json.loads(args.json_schema)
        except ValueError as exc:
            parser.error(f"--json_schema: not valid JSON ({exc})")
    return given[0] if given else None


def read_flag_file(flag: str, name: str, limit: int, dash_is_stdin: bool = False) -> str:
    """The text of the file a flag names, read whole but bounded by `limit` bytes (undecodable bytes become
    U+FFFD); '-' is stdin where `dash_is_stdin`. OmniError naming the flag and the file."""
    try:
        if dash_is_stdin and name == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            if not stat.S_ISREG(os.stat(name).st_mode):  # before opening: a FIFO would block
                raise OmniError(f"{flag} {name}: not a regular file")
            with open(name, "rb") as f:
                data = f.read(limit + 1)
    except OSError as exc:
        raise OmniError(f"{flag} {name}: cannot read ({exc.strerror or exc})") from exc
    if len(data) > limit:
        raise OmniError(f"{flag} {name}: over the limit of {limit:,} bytes")
    return data.decode("utf-8", errors="replace")


def resolve_response_format(args: argparse.Namespace) -> None:
    """args.response_format from the format flags (None without one), the files read once: OmniError (exit 1)
    for a file that cannot be read or a schema file that is not JSON."""
    text, what = args.json_schema, "--json_schema"
    for flag in ("json_schema_file", "grammar_file"):
        path = getattr(args, flag)
        if path is not None:
            data = read_flag_file(f"--{flag}", path, MAX_FORMAT_BYTES)
            if flag == "grammar_file":
                args.grammar = data
            else:
                text, what = data, f"--json_schema_file {path}"
    fmt = None
    if args.json_object:
        fmt = {"type": "json_object"}
    elif text is not None:
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise OmniError(f"{what}: not valid JSON ({exc})") from None
        fmt = {"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}}
    elif args.grammar is not None:
        fmt = {"type": "grammar", "grammar": args.grammar}
    if fmt is not None:
        try:
            fmt = BY_NAME["response_format"].check(fmt)
        except OptionError as exc:
            raise OmniError(f"{what if text is not None else '--grammar'}: {exc.reason}") from None
    args.response_format = fmt


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors that argparse cannot express on its own (exit 2)."""
    check_transcribe_args(parser, args)
    flag = check_format_flags(parser, args)
    if args.transcribe and flag:
        parser.error(f"--transcribe and {flag} cannot be combined")
    if args.transcribe and not args.audio_in:
        parser.error("--transcribe needs --audio_in")
    if args.transcribe and args.audio_out is not None:
        parser.error("--transcribe and --audio_out cannot be combined")
    if args.audio_out is not None and not one_shot(args):
        parser.error("--audio_out needs a one-shot question (--text, --image, --audio_in or --video)")
    if args.logprobs is not None and not args.json and args.batch_file is None:  # --batch_file writes JSON
        parser.error("--logprobs needs --json (the log-probabilities are part of its answer object)")
    if args.n > 1 and (not one_shot(args) or args.transcribe or args.audio_out is not None or args.timings):
        parser.error("--n needs a one-shot question (--text, --image, --audio_in or --video), without "
                     "--transcribe, --audio_out or --timings")
    if args.ocr and not args.image:
        parser.error("--ocr needs --image (in a pipe or the chat, /ocr PATH reads an image's text)")
    if args.ocr and args.transcribe:
        parser.error("--ocr and --transcribe cannot be combined")
    if args.ocr and args.text is None and (args.audio_out is not None or args.audio_in or args.video
                                           or args.prompt is not None):
        parser.error("--ocr without --text prints the images' text only: --audio_in, --video, --prompt and "
                     "--audio_out need a question (--text)")
    if args.quiet and args.verbose:
        parser.error("--quiet and --verbose cannot be combined")
    if args.prompt is not None and args.file is not None:
        parser.error("--prompt and --file cannot be combined (--file reads the prompt from a file)")
    if args.batch_file is not None and (one_shot(args) or args.transcribe or args.audio_out is not None):
        parser.error("--batch_file cannot be combined with --text, --image, --audio_in, --video, --transcribe "
                     "or --audio_out (put the inputs in the file)")
    if args.info and (one_shot(args) or args.batch_file is not None or args.transcribe or args.audio_out):
        parser.error("--info prints the model card only: drop the inputs (--text, --image, ...) or --info")


def one_shot(args: argparse.Namespace) -> bool:
    """A question on the command line: --text, media, or --prompt / --file alone (llama.cpp's -p and -f)."""
    return any(v is not None for v in (args.text, args.image, args.audio_in, args.video, args.prompt, args.file))


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options that were given (flags, or /set in the REPL), and the system prompt: the rest come from
    generation_config.json or the library defaults."""
    opts = {o.name: getattr(args, o.name) for o in CLI_OPTIONS}
    opts["system"] = args.system or None
    opts["response_format"] = args.response_format
    return {k: v for k, v in opts.items() if v is not None}


def seed_report(args: argparse.Namespace) -> dict[str, int]:
    """{"seed": S} for --json when --seed -1 picked S at random (so the answer can be reproduced), else {}."""
    return {"seed": args.seed} if getattr(args, "random_seed", False) else {}


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def resolve_random_seed(args: argparse.Namespace) -> bool:
    """--seed -1 (as in llama.cpp): replace it by a fresh random seed, remembered for `seed_report`; True if so."""
    if args.seed != RANDOM_SEED:
        return False
    args.seed, args.random_seed = random_seed(), True
    return True


def run_command(make_parser: Callable[[], argparse.ArgumentParser],
                check: Callable[[argparse.ArgumentParser, argparse.Namespace], None],
                run: Callable[[argparse.Namespace, Console], int], argv: Sequence[str] | None) -> int:
    """The life of a command line (infer_chat.py, infer_safetensors.py, batch.py): UTF-8 streams, parse and check
    the flags (usage errors exit 2), a console for stderr, --seed -1 resolved, then `run` under `guarded`."""
    utf8_streams()
    parser = make_parser()
    args = parser.parse_args(argv)
    check(parser, args)
    con = Console(args.quiet, verbose=args.verbose)
    route_warnings(con)
    if resolve_random_seed(args):
        con.status(f"seed: {args.seed} (--seed -1: random)")

    def start() -> int:
        if "json_object" in vars(args):  # the format flags come with the generation flags (transcribe.py has none)
            resolve_response_format(args)
        return run(args, con)
    return guarded(start, con, args.verbose)
