#!/usr/bin/env python3
"""How often an int8 export picks the same next token as the float32 export of the same checkpoints.

Exports the checkpoints under --ckpt_root twice with utils.export_writer.export_checkpoints (float32, and int8 as `export.py --quantize int8`) into a temporary
directory, greedy-decodes --steps tokens from --prompt with the float32 thinker (EOS ignored, causal decode), then
runs both thinkers teacher-forced over that same sequence and counts the positions whose argmax agrees. Teacher
forcing keeps one early disagreement from turning every later step into a disagreement. Both run in float32
compute, so the number measures what int8 storage costs. Prints the agreement (a fraction) on stdout.

  python tools/int8_agreement.py --ckpt_root checkpoints/demo
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from utils.errors import OmniError  # noqa: E402
from utils.export_format import load_export  # noqa: E402
from utils.export_writer import export_checkpoints  # noqa: E402
from utils.generation import SamplingOptions, generate  # noqa: E402
from utils.loading import Components  # noqa: E402


def teacher_forced_argmax(comps: Components, ids: list[int], first: int) -> torch.Tensor:
    """Argmax of the thinker's full causal forward over `ids`, at the positions predicting ids[first:]."""
    x = torch.tensor([ids[:-1]])
    with torch.inference_mode():
        logits = comps.thinker(comps.thinker.tok_emb(x))[0]
    return logits[first - 1:].argmax(-1)


def agreement(ckpt_root: Path, prompt: str, steps: int) -> tuple[int, int, int]:
    """(agreeing steps, steps, identical leading tokens when the int8 model decodes on its own)."""
    with tempfile.TemporaryDirectory(prefix="int8_agreement-") as tmp:
        dirs = {"fp32": Path(tmp) / "fp32", "int8": Path(tmp) / "int8"}
        for name, quantize in (("fp32", None), ("int8", "int8")):
            export_checkpoints(dirs[name], ckpt_root=ckpt_root, quantize=quantize)
        models = {name: load_export(d) for name, d in dirs.items()}
    for comps in models.values():
        for m in comps.modules():
            m.float().eval()
    fp32, int8 = models["fp32"], models["int8"]
    prompt_ids = fp32.tokenizer.prompt_ids(prompt)
    if len(prompt_ids) + steps > fp32.ctx_len:
        raise OmniError(f"--steps {steps}: the prompt ({len(prompt_ids)} tokens) plus {steps} steps exceed the "
                        f"context of {fp32.ctx_len}; use fewer steps")
    opts = SamplingOptions(max_new_tokens=steps, ignore_eos=True, decode_attention="causal")
    with torch.inference_mode():
        emb = fp32.thinker.tok_emb(torch.tensor(prompt_ids))[None]
        ref = list(generate(fp32.thinker, emb, opts, prompt_ids))
        emb8 = int8.thinker.tok_emb(torch.tensor(prompt_ids))[None]
        own = list(generate(int8.thinker, emb8, opts, prompt_ids))
    seq = prompt_ids + ref
    a = teacher_forced_argmax(fp32, seq, len(prompt_ids))
    b = teacher_forced_argmax(int8, seq, len(prompt_ids))
    prefix = next((i for i, (x, y) in enumerate(zip(ref, own)) if x != y), len(ref))
    return int((a == b).sum()), len(ref), prefix


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="int8_agreement.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_root", required=True, help="trainers' checkpoints folder (as for export.py --ckpt_root)")
    p.add_argument("--prompt", default="What is one plus two?", help="text the greedy decode starts from")
    p.add_argument("--steps", type=int, default=200, help="greedy steps to compare (default 200)")
    args = p.parse_args(argv)
    try:
        if args.steps < 1:
            raise OmniError(f"--steps {args.steps}: must be at least 1")
        agree, steps, prefix = agreement(Path(args.ckpt_root), args.prompt, args.steps)
    except OmniError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"int8 vs float32 top-1 agreement: {agree / steps:.4f} ({agree}/{steps} teacher-forced greedy steps); "
          f"free-running int8 decode matches the first {prefix} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
