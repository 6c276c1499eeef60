"""transcribe.py: whisper's command line over `--transcribe` (utils/cli/transcribe_command.py). Audio files are
arguments, --model is the checkpoint, and every format (txt, vtt, srt, tsv, json) of each input is written as
INPUT.FORMAT into the current directory unless --output_format / --output_dir say otherwise, as whisper does."""
from __future__ import annotations

import argparse

from utils.cli.args import Parser, add_dash_aliases, add_model_arguments, add_version_argument, run_command
from utils.cli.console import Console, Out
from utils.cli.transcribe_command import add_arguments, check_args, run_transcribe


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """whisper's spellings: audio files as arguments, --model the checkpoint, every format written by default."""
    p = Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"""examples:
  python {prog} examples/phrases.wav --model checkpoints/demo                 # phrases.txt .vtt .srt .tsv .json
  python {prog} talk1.flac talk2.mp3 --model checkpoints/demo --output_format srt --output_dir subs/
  python {prog} a.wav --model checkpoints/demo --language en --word_timestamps False

exit status: 0 ok, 1 a file failed (one `error:` line each; the others are written), 2 usage error.""")
    p.add_argument("audio_in", nargs="+", metavar="AUDIO", help="Audio files to transcribe (any format infer_chat.py "
                                                               "--audio_in reads).")
    add_model_arguments(p, "The checkpoint (as infer_chat.py --ckpt_dir): one with an audio encoder and its CTC "
                           "head, e.g. checkpoints/demo or its audio_enc_tiny directory.")
    add_arguments(p)
    p.set_defaults(output_format="all", output_dir=".", transcribe=True, json=False, seed=None)
    g = p.add_argument_group("messages")
    g.add_argument("--quiet", action="store_true", help="Print nothing on stderr except errors.")
    g.add_argument("--verbose", action="store_true", help="Show loading messages and Python tracebacks.")
    add_version_argument(p, prog)
    add_dash_aliases(p)
    return p


def script_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_args(parser, args)
    if args.quiet and args.verbose:
        parser.error("--quiet and --verbose cannot be combined")


def script_run(args: argparse.Namespace, con: Console) -> int:
    from omni import load_model

    con.status(f"loading μOmni from {args.ckpt_dir} ...")
    model = load_model(args.ckpt_dir, device=args.device, dtype=args.dtype, quantize=args.quantize,
                       threads=args.threads)
    return run_transcribe(model, args, con, Out())


def main(argv: list[str] | None, prog: str, description: str) -> int:
    return run_command(lambda: build_parser(prog, description), script_check, script_run, argv)
