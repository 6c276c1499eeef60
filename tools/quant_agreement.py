#!/usr/bin/env python3
"""How often a quantized (or lower-precision) thinker picks the same next token as the float32 one.

  python tools/quant_agreement.py --ckpt_root checkpoints/demo                    # the int8 export
  python tools/quant_agreement.py --ckpt_root checkpoints/demo --method int4      # --quantize int4 at runtime

--method export-int8 (default) exports the checkpoints twice with the library behind export.py
(utils.weights.export_writer.export_checkpoints: float32, and int8) into a temporary directory and compares the two exports (both computed in float32: the number measures what int8
storage costs). int8 / int4 / bfloat16 compare `load_model(..., quantize=...)` (or dtype=bfloat16) with the
float32 model at runtime: the kernels the CLI's `--quantize` / `--dtype` use. Either way the float32 thinker
greedy-decodes --steps tokens from --prompt (EOS ignored, causal), then both thinkers run the KV-cached decode
steps teacher-forced over that sequence, and the positions whose argmax agrees are counted (teacher forcing
keeps one early disagreement from turning every later step into one). Prints one line on stdout.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from omni import load_model  # noqa: E402
from utils.weights.export_writer import export_checkpoints  # noqa: E402
from utils.base.errors import OmniError  # noqa: E402
from utils.base.options import SamplingOptions  # noqa: E402
from utils.engine.generation import forced_logits, generate  # noqa: E402

METHODS = ("export-int8", "int8", "int4", "bfloat16")


def decode_argmax(thinker, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """Argmax of each KV-cached decode step: after the prompt, then after each token of `continuation`."""
    opts = SamplingOptions(max_new_tokens=len(continuation) + 1, decode_attention="causal")
    with torch.inference_mode():
        emb = thinker.tok_emb(torch.tensor(prompt_ids))
    return forced_logits(thinker, emb, continuation, opts).argmax(-1)


def models_for(ckpt_root: Path, method: str, tmp: Path):
    """(float32 model, compared model)."""
    if method != "export-int8":
        compared = load_model(ckpt_root, device="cpu", dtype="bfloat16" if method == "bfloat16" else None,
                              quantize=None if method == "bfloat16" else method)
        return load_model(ckpt_root, device="cpu"), compared
    for name, quantize in (("fp32", None), ("int8", "int8")):
        export_checkpoints(tmp / name, ckpt_root=ckpt_root, quantize=quantize)
    return load_model(tmp / "fp32", device="cpu", dtype="float32"), load_model(tmp / "int8", device="cpu",
                                                                               dtype="float32")


def agreement(ckpt_root: Path, prompt: str, steps: int, method: str = "export-int8") -> tuple[int, int, int]:
    """(agreeing steps, steps, identical leading tokens when the compared model decodes on its own)."""
    with tempfile.TemporaryDirectory(prefix="quant_agreement-") as tmp:
        ref_model, model = models_for(ckpt_root, method, Path(tmp))
    ref, cand = ref_model.parts.thinker, model.parts.thinker
    prompt_ids = ref_model.parts.tokenizer.prompt_ids(prompt)
    if len(prompt_ids) + steps > ref.cfg.ctx_len:
        raise OmniError(f"--steps {steps}: the prompt ({len(prompt_ids)} tokens) plus {steps} steps exceed the "
                        f"context of {ref.cfg.ctx_len}; use fewer steps")
    opts = SamplingOptions(max_new_tokens=steps, ignore_eos=True, decode_attention="causal")
    with torch.inference_mode():
        greedy = list(generate(ref, ref.tok_emb(torch.tensor(prompt_ids))[None], opts, prompt_ids))
        own = list(generate(cand, cand.tok_emb(torch.tensor(prompt_ids))[None], opts, prompt_ids))
    a = decode_argmax(ref, prompt_ids, greedy[:-1])
    b = decode_argmax(cand, prompt_ids, greedy[:-1])
    prefix = next((i for i, (x, y) in enumerate(zip(greedy, own)) if x != y), len(greedy))
    return int((a == b).sum()), len(greedy), prefix


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quant_agreement.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_root", required=True, help="trainers' checkpoints folder (as for export.py --ckpt_root)")
    p.add_argument("--method", choices=METHODS, default="export-int8",
                   help="what to compare with float32 (default export-int8: the int8 export)")
    p.add_argument("--prompt", default="What is one plus two?", help="text the greedy decode starts from")
    p.add_argument("--steps", type=int, default=200, help="greedy steps to compare (default 200)")
    args = p.parse_args(argv)
    try:
        if args.steps < 1:
            raise OmniError(f"--steps {args.steps}: must be at least 1")
        agree, steps, prefix = agreement(Path(args.ckpt_root), args.prompt, args.steps, args.method)
    except OmniError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.method} vs float32 top-1 agreement: {agree / steps:.4f} ({agree}/{steps} teacher-forced greedy "
          f"steps); free-running {args.method} decode matches the first {prefix} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
