"""The chat loops over a loaded model: the interactive REPL (commands /image /video /audio /ocr /reset /set /system,
multi-line input), pipe mode (one answer per stdin line) and --batch_file. Media commands decode through
OmniModel.load_media, exactly as the one-shot flags do."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, TextIO

from utils.batch.job import answer_rows, read_batch_file
from utils.cli.args import CLI_OPTIONS, generation_options, option_value, random_seed, seed_report
from utils.cli.console import Console, Out, format_card, print_timings
from utils.base.defaults import RANDOM_SEED
from utils.base.errors import OmniError
from utils.base.options import Option, OptionError

if TYPE_CHECKING:
    from omni import Answer, OmniModel

ANSWER_PREFIX = "μOmni: "
USER_PROMPT = "You: "

REPL_HELP = """commands:
  /image PATH   attach an image to your next message (several may be attached)
  /video PATH   attach a video (--video_frames evenly spaced frames) to your next message
  /audio PATH   attach an audio file to your next message (several may be attached)
  /ocr PATH     print the text in an image (the OCR model; --ocr_max_len characters at most)
  /reset, /clear  drop the attached media (there is no chat history to clear: turns are independent)
  /show info    the model card (as --info); /show parameters: the sampling options in effect (as /set)
  /set          show the sampling options; /set NAME VALUE changes one (e.g. /set temperature 0.7,
                /set seed 7, /set max_new_tokens 16; NAME default restores it), names: SET_NAMES
  /system TEXT  set the system prompt, prepended to every question ("/system" alone clears it)
  \"\"\"           start a multi-line message; it ends at a line that ends with \"\"\"
  /help         show this help
  /exit, /quit, /bye  leave (Ctrl-D too); Ctrl-C stops an answer and returns to the prompt
Each turn is independent: the μOmni thinker was trained without a chat template, so it does not see
earlier questions or answers. Media attached with /image, /video or /audio is used by the next message
only (an empty message asks about it with the default prompt)."""


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


def attach(model: OmniModel, cmd: str, arg: str, media: Attachments, video_frames: int) -> str:
    """Decode the file now (so a bad path is reported at once) and keep it for the next message."""
    if not arg:
        raise OmniError(f"/{cmd} needs a file path, e.g. /{cmd} {'clip.mp4' if cmd == 'video' else 'file'}")
    path = os.path.expanduser(arg.strip().strip("'\""))
    loaded = model.load_media(**{cmd: path}, video_frames=video_frames, purpose=f"/{cmd}")
    media.images.extend(loaded.images)
    media.audio.extend(loaded.audio)
    media.names.append(f"{cmd} {path}")
    media.paths.setdefault("audio_in" if cmd == "audio" else cmd, []).append(path)
    return f"attached {cmd} {path}" + (f" ({video_frames} frames)" if cmd == "video" else "")


MEDIA_COMMANDS = ("image", "video", "audio")


def read_text(model: OmniModel, args: argparse.Namespace, arg: str) -> tuple[str, dict[str, Any]]:
    """`/ocr PATH`: (the path, the image's OCR fields)."""
    from omni import ocr_fields  # loaded with the model already
    if not arg:
        raise OmniError("/ocr needs an image path, e.g. /ocr sign.png")
    path = os.path.expanduser(arg.strip().strip("'\""))
    return path, ocr_fields([model.ocr(path, max_len=args.ocr_max_len)])


def split_command(line: str) -> tuple[str, str] | None:
    """'/image cat.png' -> ('image', 'cat.png'); None for an ordinary message."""
    s = line.strip()
    if not s.startswith("/") or len(s) < 2 or not s[1].isalpha():
        return None
    name, _, arg = s[1:].partition(" ")
    return name.lower(), arg.strip()


def ask(model: OmniModel, args: argparse.Namespace, text: str | None, media: Attachments,
        on_text: Callable[[str], None] | None) -> Answer:
    return model.answer(text, image=list(media.images) or None, audio=list(media.audio) or None,
                        on_text=on_text, **generation_options(args))


# /set NAME VALUE: the command-line rows of the options table, read as their flags read them
SETTABLE: dict[str, Option] = {o.name: o for o in CLI_OPTIONS}
SET_ALIASES = {"temp": "temperature", "max_tokens": "max_new_tokens", "num_predict": "max_new_tokens",
               "repeat_penalty": "repetition_penalty"}


def set_option(model: OmniModel, args: argparse.Namespace, arg: str) -> str:
    """`/set` (show the options in effect), `/set NAME VALUE`, `/set NAME default`; Ollama's
    `/set parameter NAME VALUE` too. Returns the message to show; a bad name or value is an OmniError."""
    words = arg.split()
    if words[:1] == ["parameter"]:
        words = words[1:]
    if not words:
        opts = model.sampling_options(**{k: v for k, v in generation_options(args).items() if k != "system"})
        shown = ", ".join(f"{k} {getattr(opts, k)}" for k in SETTABLE)
        return f"{shown}, system {args.system!r}" if args.system else f"{shown}, system (none)"
    name = SET_ALIASES.get(words[0].replace("-", "_"), words[0].replace("-", "_"))
    if name not in SETTABLE or len(words) != 2:
        raise OmniError(f"/set {arg}: use /set NAME VALUE with NAME one of {', '.join(SETTABLE)} "
                        f"(VALUE 'default' restores it); /set alone shows them")
    value: Any = None
    if words[1] != "default":
        try:
            value = option_value(SETTABLE[name], words[1])
        except OptionError as exc:
            raise OmniError(f"/set {name} {words[1]}: {exc.reason}") from None
        if name == "logprobs" and not args.json:
            raise OmniError("/set logprobs: the log-probabilities are shown with --json only")
        if name == "seed" and value == RANDOM_SEED:
            value = random_seed()
    setattr(args, name, value)
    return f"set {name} to {'its default' if value is None else value}"


def show(model: OmniModel, args: argparse.Namespace, arg: str) -> str:
    """Ollama's `/show info` (the model card, as --info prints it) and `/show parameters` (the options in effect)."""
    if arg == "info":
        return format_card(model.info())
    if arg == "parameters":
        return set_option(model, args, "")
    raise OmniError(f"/show {arg}: use /show info (the model card) or /show parameters (the sampling options)")


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


def run_pipe(model: OmniModel, args: argparse.Namespace, con: Console, out: Out, lines: TextIO) -> int:
    """One output line per message line, in order (one JSON object per line with --json): the answer, or for a
    message that failed an error line ({"input", "error"} in JSON, else an empty line on stdout and `error:` on
    stderr). '/ocr PATH' prints the image's text as its answer line ({"input": {"ocr": PATH}, ocr fields} in JSON).
    Command lines ('/image PATH', '/video PATH', '/audio PATH', '/reset' or '/clear', '/system TEXT',
    '/set NAME VALUE') print nothing on stdout; a media command that failed fails the message after it (one
    error, reported there), which is never answered without its media."""
    from omni import answer_timing

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
        if cmd and cmd[0] == "ocr":
            try:
                path, fields = read_text(model, args, cmd[1])
            except OmniError as exc:
                con.error(f"line {number}: {exc}")
                out.json({"input": {"ocr": cmd[1]}, "error": str(exc)}) if args.json else out.line()
                status = 1
                continue
            out.json({"input": {"ocr": path}, **fields}) if args.json else out.line(fields["ocr_text"])
            continue
        if cmd and cmd[0] in MEDIA_COMMANDS + ("reset", "clear", "system", "set"):
            try:
                if cmd[0] in ("reset", "clear"):
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
                          "generated_tokens": 0, "timing": answer_timing(0.0, 0.0, 0, 0.0, 0)})
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


def run_batch_file(model: OmniModel, args: argparse.Namespace, con: Console, out: Out) -> int:
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


def run_repl(model: OmniModel, args: argparse.Namespace, con: Console, out: Out) -> int:
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
            if name in ("exit", "quit", "bye"):
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
            elif name == "show":
                try:
                    out.line(show(model, args, arg))
                except OmniError as exc:
                    con.error(str(exc))
            elif name in ("reset", "clear"):
                dropped = ", ".join(media.names) or "nothing was attached"
                media.clear()
                out.line(f"dropped: {dropped} (there is no chat history to forget: turns are independent)")
            elif name == "ocr":
                try:
                    _, fields = read_text(model, args, arg)
                    out.json(fields) if args.json else out.line(fields["ocr_text"])
                except OmniError as exc:
                    con.error(str(exc))
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
