"""The command-line interface shared by infer_chat.py and infer_safetensors.py: a thin layer over omni.py.

Modes: one-shot when --text/--image/--audio_in/--video (or --prompt / -f alone) is given; otherwise a REPL when
stdin is a terminal, else one answer per input line (a pipe). stdout carries answers only; everything else goes to stderr.
Exit codes: 0 ok, 1 error (one `error:` line), 2 usage error (argparse), 130 interrupted (SIGINT), 143 terminated
(SIGTERM).

The parser is in utils/cli/args.py, stdout/stderr handling in utils/cli/console.py, the REPL, pipes and --batch_file in
utils/cli/repl.py; this module holds the one-shot question, speech output and main().
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Sequence

from utils.cli.args import (build_parser, check_args, generation_options, one_shot, read_flag_file, run_command,
                            seed_report)
from utils.cli.transcribe_command import run_transcribe
from utils.cli.console import Console, Out, format_card, print_timings
from utils.base.errors import OmniError
from utils.cli.repl import run_batch_file, run_pipe, run_repl

if TYPE_CHECKING:
    from omni import OmniModel


def speak(model: OmniModel, args: argparse.Namespace, text: str, con: Console) -> dict[str, Any]:
    """Synthesise `text` into args.audio_out (in the format its suffix names); returns the --json "audio_out"
    object."""
    if not text.strip():
        raise OmniError(f"--audio_out {args.audio_out}: the answer is empty, so there is nothing to speak "
                        f"(no file written)")
    plan = model.speech_plan(text, args.max_audio_frames, args.vocoder, purpose="--audio_out")
    frames, kind = plan.frames, plan.vocoder
    if kind == "hifigan":
        con.info(f"speech: {frames} talker frames, HiFi-GAN vocoder ({plan.vocoder_source})")
    else:
        why = "" if args.vocoder == "griffin-lim" else " (no vocoder.pt or hifigan.pt found)"
        con.info(f"speech: {frames} talker frames, Griffin-Lim vocoder{why}")
    with con.progress(plan.steps, "speech") as bar:
        speech = model.speak(text, frames=frames, temperature=args.audio_temperature, top_k=args.audio_top_k,
                             seed=args.seed, decode_attention=args.decode_attention, vocoder=kind,
                             progress=bar.update)
    for note in speech.notes:
        con.warn(note)
    fmt = speech.write(args.audio_out)
    kind = "" if fmt == "wav" else f" {fmt}"
    con.info(f"wrote {args.audio_out}:{kind} {speech.seconds:.2f} s, {speech.sample_rate} Hz mono")
    return {"path": str(args.audio_out), "frames": speech.frames, "seconds": round(speech.seconds, 6),
            "sample_rate": speech.sample_rate, "vocoder": speech.vocoder}


def check_audio_out(model: OmniModel, args: argparse.Namespace) -> None:
    """Fail before generating the answer if speech cannot be written."""
    from omni import check_output_path  # loaded with the model already

    model.speech_plan(None, vocoder=args.vocoder, purpose="--audio_out")
    check_output_path(args.audio_out)


# ---------------------------------------------------------------- modes

def run_one_shot(model: OmniModel, args: argparse.Namespace, con: Console, out: Out) -> int:
    if args.transcribe:
        return run_transcribe(model, args, con, out)
    ocr: dict[str, Any] = {}
    if args.ocr:
        from omni import ocr_fields, ocr_prompt  # loaded with the model already
        results = [model.ocr(path, max_len=args.ocr_max_len) for path in args.image]
        ocr = ocr_fields(results)
        if args.text is None:
            out.json(ocr) if args.json else out.line(ocr["ocr_text"])
            return 0
        args.text = ocr_prompt(args.text, [r.text for r in results])
    if args.audio_out is not None:
        check_audio_out(model, args)
    if args.prompt is not None and args.text is not None:
        con.warn("--prompt is ignored because --text is given")
    if args.n > 1:
        return run_choices(model, args, con, out)
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
    result = {**ans.to_json(), **ocr, **seed_report(args)}
    if args.audio_out is not None:
        result["audio_out"] = speak(model, args, ans.text, con)
    if args.json:
        out.json(result)
    return 0


def run_choices(model: OmniModel, args: argparse.Namespace, con: Console, out: Out) -> int:
    """--n N: N answers to the one-shot question (OmniModel.answer_choices), one line or JSON object each."""
    answers = model.answer_choices(args.text, image=args.image, audio=args.audio_in, video=args.video,
                                   video_frames=args.video_frames, prompt=args.prompt, n=args.n,
                                   **generation_options(args))
    for note in answers[0].warnings:
        con.warn(note)
    for i, ans in enumerate(answers):
        if args.json:
            out.json({"index": i, **ans.to_json(), **seed_report(args)})
        else:
            out.line(ans.text)
    return 0


# ---------------------------------------------------------------- entry point

MAX_PROMPT_FILE_BYTES = 16 << 20  # -f FILE is read whole: bounded


def read_prompt_file(name: str) -> str:
    """-f FILE (llama.cpp's prompt file; '-' is stdin) as text, without its trailing line break."""
    return read_flag_file("--file", name, MAX_PROMPT_FILE_BYTES, dash_is_stdin=True).rstrip("\r\n")


def run(args: argparse.Namespace, con: Console) -> int:
    from omni import load_model

    out = Out()
    if args.file is not None:
        args.prompt = read_prompt_file(args.file)
    con.status(f"loading μOmni from {args.ckpt_dir} ...")
    model = load_model(args.ckpt_dir, device=args.device, dtype=args.dtype, quantize=args.quantize,
                       threads=args.threads)
    if args.ctx_size is not None:
        if args.ctx_size > model.context_length:  # a usage error, found once the model says its context
            con.error(f"-c/--ctx-size {args.ctx_size}: the model's context is {model.context_length} tokens; give "
                      f"at most {model.context_length}")
            return 2
        model.limit_context(args.ctx_size)
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


def main(argv: Sequence[str] | None, prog: str, description: str) -> int:
    return run_command(lambda: build_parser(prog, description), check_args, run, argv)
