#!/usr/bin/env python3
"""Merge μOmni trainer checkpoints into one portable export directory (model.safetensors + support files).

Name the component directories, or let --ckpt_root find them under a trainers' checkpoints/ folder:

  python export.py --ckpt_root checkpoints/demo --output_dir export
  python export.py --omni_ckpt checkpoints/demo/omni_sft_tiny --thinker_ckpt checkpoints/demo/thinker_tiny \\
      --audio_ckpt checkpoints/demo/audio_enc_tiny --vision_ckpt checkpoints/demo/vision_tiny \\
      --talker_ckpt checkpoints/demo/talker_tiny --output_dir export

The thinker comes from omni.pt when an omni_sft directory is given (it is the fine-tuned one), else from the
thinker directory. --dtype float16/bfloat16 halves the file; --quantize int8 stores every nn.Linear weight of the
thinker, talker and encoders as int8 with per-output-channel scales (utils/weights/quant.py documents the keys), the other
float tensors in --dtype (float16 unless named). The export is written into a temporary directory beside the target
and renamed into place at the end, so a failed export leaves nothing behind. infer_safetensors.py loads the result.
The work is done by utils/weights/export_writer.py (export_checkpoints, reached through omni.py); this script is its
command line.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, so the signal policy covers every line below (utils.base.errors.run_script)
    from utils.base.errors import run_script
    run_script("export")

import argparse
import sys
import traceback
from pathlib import Path
from typing import Sequence

import torch

from omni import ExportResult, dtype_name, export_checkpoints, find_config
from utils.base.defaults import DTYPE_NAMES
from utils.base.errors import OmniError, Terminated, interrupt_status, one_line, quiet_stdout
from utils.base.export_names import COMPONENT_FLAGS, COMPONENT_PREFIXES, DEFAULT_OUTPUT_FILE, EXPORT_NAMES, QUANT_METHOD
from utils.cli.args import Parser, add_dash_aliases, add_version_argument

SOURCE_LABELS = {"thinker": "thinker", "proj_a": "thinker", "proj_v": "thinker", "audio": "audio",
                 "ctc_head": "audio", "vision": "vision", "talker": "talker", "rvq": "talker", "vocoder": "vocoder",
                 "ocr": "ocr"}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_root", "--ckpt_dir", "-m", "--model", dest="ckpt_root", help="trainers' checkpoints/ folder: find every component directory under it "
                                       "(instead of naming them with the --*_ckpt flags)")
    p.add_argument("--omni_ckpt", help="omni_sft directory (omni.pt: fine-tuned thinker and projectors)")
    p.add_argument("--thinker_ckpt", help="thinker directory (tokenizer.model; thinker.pt when no --omni_ckpt)")
    p.add_argument("--audio_ckpt", help="audio encoder directory (audio_enc.pt with its CTC head)")
    p.add_argument("--vision_ckpt", help="vision encoder directory (vision.pt)")
    p.add_argument("--talker_ckpt", help="talker directory (talker.pt: talker and RVQ codec)")
    p.add_argument("--vocoder_ckpt", help="HiFi-GAN vocoder directory (vocoder.pt or hifigan.pt)")
    p.add_argument("--ocr_ckpt", help="OCR directory (ocr.pt with ocr_metadata.json, as train_ocr.py leaves it)")
    p.add_argument("--output_dir", required=True, help="export directory to create")
    p.add_argument("--output_file", default=DEFAULT_OUTPUT_FILE, choices=EXPORT_NAMES,
                   help="weights file name inside --output_dir (default model.safetensors)")
    p.add_argument("--configs_dir", help="copy every *.json of this directory into <output_dir>/configs (default: "
                                         "the trainer configs that were used). Hyper-parameters are always read from "
                                         "the configs tied to each checkpoint directory; the table shows which")
    p.add_argument("--skip_component_configs", action="store_true", help="do not write <output_dir>/configs")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="float storage type (default float32; float16 for the unquantized tensors of --quantize int8)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8: nn.Linear weights of thinker, talker and encoders as int8 with per-channel scales")
    p.add_argument("--decode_attention", choices=("causal", "reference"), default=None,
                   help="the decode mode written to generation_config.json (default: the source's "
                        "generation_config.json, else causal; 'reference' reproduces a defect, for comparison only)")
    p.add_argument("--verify", action="store_true",
                   help="reload the export and compare its thinker logits and weights with the sources "
                        "(exit 1 if a float32 export differs at all)")
    p.add_argument("--force", action="store_true", help="replace an existing export in --output_dir")
    p.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    add_version_argument(p, "export.py")
    add_dash_aliases(p)
    return p


# ---------------------------------------------------------------- reporting

def print_table(result: ExportResult) -> None:
    """Per component: tensors, int8 tensors, bytes, and the weights and config file it came from."""
    comps, merged, weights, dtype, int8 = result.components, result.merged, result.weights, result.dtype, result.int8
    rows = [("component", "tensors", "int8", "bytes", "source", "config")]
    total_t = total_q = total_b = 0
    for attr, prefix in COMPONENT_PREFIXES.items():
        if prefix not in merged:
            continue
        sd = merged[prefix]
        n_t, n_q = len(sd), sum(v.dtype == torch.int8 for v in sd.values())
        n_b = sum(v.numel() * v.element_size() for v in sd.values())
        total_t, total_q, total_b = total_t + n_t, total_q + n_q, total_b + n_b
        label = SOURCE_LABELS[attr]
        _, cfg = find_config(Path(comps.sources[label]).parent)
        rows.append((prefix, str(n_t), str(n_q), f"{n_b:,}", comps.sources[label], str(cfg or "(spec defaults)")))
    rows.append(("total", str(total_t), str(total_q), f"{total_b:,}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i in (1, 2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
              .rstrip())
    stored = dtype_name(dtype) + (f", Linear weights int8 ({QUANT_METHOD})" if int8 else "")
    print(f"wrote {weights} ({weights.stat().st_size:,} bytes; {stored})")


# ---------------------------------------------------------------- main

def run(args: argparse.Namespace) -> int:
    result = export_checkpoints(args.output_dir, ckpt_root=args.ckpt_root,
                                named={flag: getattr(args, flag) for flag in COMPONENT_FLAGS},
                                dtype=args.dtype, quantize=args.quantize, verify=args.verify, force=args.force,
                                output_file=args.output_file, configs_dir=args.configs_dir,
                                component_configs=not args.skip_component_configs,
                                decode_attention=args.decode_attention)
    print_table(result)
    for line in result.verify:
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # paths in the table: a non-UTF-8 name prints as its bytes
        sys.stdout.reconfigure(errors="surrogateescape")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (KeyboardInterrupt, Terminated) as exc:  # the temp directory is already removed
        print("interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc), file=sys.stderr)
        return interrupt_status(exc)
    except BrokenPipeError:  # stdout's reader left (`| head -c 1`): the export is complete, only the table is lost
        quiet_stdout()
        return 0
    except (OmniError, OSError) as exc:  # OSError: permissions or a full disk; the partial export is already gone
        if args.verbose:
            traceback.print_exc()
        message = str(exc) if isinstance(exc, OmniError) else \
            f"cannot write the export ({exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''})"
        print(f"error: {one_line(message)}", file=sys.stderr)
        return 1
