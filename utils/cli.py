"""The command-line interface shared by infer_chat.py and infer_safetensors.py."""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Sequence

from utils.errors import OmniError


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", required=True,
                   help="checkpoint directory: thinker dir, omni_sft dir, trainers' checkpoints/ root, "
                        "audio encoder dir (with --transcribe) or merged export")
    p.add_argument("--text", help="the question or instruction")
    p.add_argument("--prompt", help="text used when --text is absent (default: a built-in prompt per modality)")
    p.add_argument("--image", help="image file to ask about")
    p.add_argument("--audio_in", help="audio file (wav/flac/ogg) to ask about")
    p.add_argument("--max_new_tokens", type=int, default=None, help="most tokens to generate")
    p.add_argument("--decode_attention", choices=("reference", "causal"), default=None,
                   help="'reference' (default) reproduces the μOmni reference decode, where each generated token "
                        "attends to the first position only; 'causal' attends to every earlier position")
    p.add_argument("--transcribe", action="store_true", help="print the CTC transcript of --audio_in and exit")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer on stdout")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps")
    p.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    return p


def run(args: argparse.Namespace) -> int:
    from omni import load_model

    model = load_model(args.ckpt_dir, device=args.device)
    if args.transcribe:
        if not args.audio_in:
            raise OmniError("--transcribe needs --audio_in")
        text = model.transcribe(args.audio_in)
        print(json.dumps({"text": text}) if args.json else text, flush=True)
        return 0
    ans = model.answer(args.text, image=args.image, audio=args.audio_in, prompt=args.prompt,
                       max_new_tokens=args.max_new_tokens, decode_attention=args.decode_attention)
    for note in ans.warnings:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps({"text": ans.text, "token_ids": ans.token_ids, "prompt_tokens": ans.prompt_tokens,
                          "generated_tokens": ans.generated_tokens, "timing": ans.timing}), flush=True)
    else:
        print(ans.text, flush=True)
    return 0


def main(argv: Sequence[str] | None, prog: str, description: str) -> int:
    parser = build_parser(prog, description)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except OmniError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
