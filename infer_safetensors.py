#!/usr/bin/env python3
"""Chat with a μOmni model from a merged safetensors export (made by export.py, float32/float16/bfloat16 or int8,
or the μOmni reference export). The weights are memory-mapped by safetensors: no pickle is involved."""
if __name__ == "__main__":  # first, so the signal policy covers every line below (utils.base.errors.run_script)
    from utils.base.errors import run_script
    run_script("infer_safetensors")

import sys
from pathlib import Path

from utils.base.errors import OmniError
from utils.cli.args import build_parser, check_args
from utils.cli.console import utf8_streams
from utils.cli.main import main as cli_main

PROG = "infer_safetensors.py"


def refuse_non_export(argv: list[str]) -> int | None:
    """Exit status 1 with one `error:` line when --ckpt_dir is a directory without a merged export: this CLI reads
    exports only (infer_chat.py reads trainer checkpoints). Usage errors and --help exit here exactly as in main;
    a missing directory is left to the shared CLI's own message."""
    utf8_streams()
    parser = build_parser(PROG, __doc__)
    args = parser.parse_args(argv)
    check_args(parser, args)
    ckpt_dir = Path(args.ckpt_dir)
    if ckpt_dir.is_file() and ckpt_dir.suffix != ".safetensors":
        print(f"error: --ckpt_dir {ckpt_dir}: not a .safetensors file; infer_safetensors.py reads merged exports only "
              f"(use infer_chat.py for trainer checkpoints)", file=sys.stderr)
        return 1
    if not ckpt_dir.is_dir():
        return None
    from omni import export_file  # after parsing: --help and --version do not import torch
    try:
        export_file(ckpt_dir)
    except OmniError as exc:
        print(f"error: --ckpt_dir {exc}; infer_safetensors.py reads merged exports only (make one with export.py, "
              f"or use infer_chat.py for trainer checkpoint directories)", file=sys.stderr)
        return 1
    return None


def main() -> int:
    """Refuse a directory without an export, else the shared CLI (signals as in infer_chat.py)."""
    status = refuse_non_export(sys.argv[1:])
    return status if status is not None else cli_main(None, PROG, __doc__)
