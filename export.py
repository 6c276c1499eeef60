#!/usr/bin/env python3
"""Merge μOmni trainer checkpoints into one portable export directory (model.safetensors + support files).

Name the component directories, or let --ckpt_root find them under a trainers' checkpoints/ folder:

  python export.py --ckpt_root checkpoints --output_dir export
  python export.py --omni_ckpt checkpoints/omni_sft_tiny --thinker_ckpt checkpoints/thinker_tiny \\
      --audio_ckpt checkpoints/audio_enc_tiny --vision_ckpt checkpoints/vision_tiny \\
      --talker_ckpt checkpoints/talker_tiny --vocoder_ckpt checkpoints/vocoder_tiny --output_dir export

The thinker comes from omni.pt when an omni_sft directory is given (it is the fine-tuned one), else from the
thinker directory. --dtype float16/bfloat16 halves the file; --quantize int8 stores every nn.Linear weight of the
thinker, talker and encoders as int8 with per-output-channel scales (utils/quant.py documents the keys), the other
float tensors in --dtype (float16 unless named). The export is written into a temporary directory beside the target
and renamed into place at the end, so a failed export leaves nothing behind. infer_safetensors.py loads the result.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

from utils import loading as L
from utils.checkpoint import find_config, read_torch_file, unwrap
from utils.errors import OmniError
from utils.export_format import (COMPONENT_PREFIXES, STORAGE_DTYPES, dtype_name, export_config, generation_config,
                                 load_export, merged_state_dict, model_info, preprocessor_config)
from utils.quant import QUANT_METHOD

VERIFY_PROMPT = "Once upon a time there was"
# --<flag> -> (directory kind as utils.loading.dir_kind names it)
COMPONENT_FLAGS = {"omni_ckpt": "omni", "thinker_ckpt": "thinker", "audio_ckpt": "audio", "vision_ckpt": "vision",
                   "talker_ckpt": "talker", "vocoder_ckpt": "vocoder"}
SOURCE_LABELS = {"thinker": "thinker", "proj_a": "thinker", "proj_v": "thinker", "audio": "audio",
                 "ctc_head": "audio", "vision": "vision", "talker": "talker", "rvq": "talker", "vocoder": "vocoder"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_root", help="trainers' checkpoints/ folder: find every component directory under it "
                                       "(instead of naming them with the --*_ckpt flags)")
    p.add_argument("--omni_ckpt", help="omni_sft directory (omni.pt: fine-tuned thinker and projectors)")
    p.add_argument("--thinker_ckpt", help="thinker directory (tokenizer.model; thinker.pt when no --omni_ckpt)")
    p.add_argument("--audio_ckpt", help="audio encoder directory (audio_enc.pt with its CTC head)")
    p.add_argument("--vision_ckpt", help="vision encoder directory (vision.pt)")
    p.add_argument("--talker_ckpt", help="talker directory (talker.pt: talker and RVQ codec)")
    p.add_argument("--vocoder_ckpt", help="HiFi-GAN vocoder directory (vocoder.pt or hifigan.pt)")
    p.add_argument("--ocr_ckpt", help="not supported: this project has no OCR model")
    p.add_argument("--output_dir", required=True, help="export directory to create")
    p.add_argument("--output_file", default="model.safetensors", choices=L.EXPORT_NAMES,
                   help="weights file name inside --output_dir (default model.safetensors)")
    p.add_argument("--configs_dir", help="copy every *.json of this directory into <output_dir>/configs (default: "
                                         "the trainer configs that were used). Hyper-parameters are always read from "
                                         "the configs tied to each checkpoint directory; the table shows which")
    p.add_argument("--skip_component_configs", action="store_true", help="do not write <output_dir>/configs")
    p.add_argument("--dtype", choices=tuple(STORAGE_DTYPES), default=None,
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
    return p


# ---------------------------------------------------------------- finding the sources

def named_dir(flag: str, value: str, kind: str) -> Path:
    """A --*_ckpt directory, checked to hold the component its flag names."""
    d = Path(value)
    if not d.is_dir():
        raise OmniError(f"--{flag} {d}: {'is a file, not a directory' if d.exists() else 'no such directory'}")
    found = L.dir_kind(d)
    if found != kind:
        held = f"holds {found} weights" if found else "holds no μOmni weights"
        raise OmniError(f"--{flag} {d}: {held}, expected a {kind} checkpoint directory")
    return d


def discover(root: Path) -> dict[str, Path | None]:
    """Component directories under a checkpoints root: the omni config's pointers, else the one dir of each kind."""
    if not root.is_dir():
        raise OmniError(f"--ckpt_root {root}: {'is a file, not a directory' if root.exists() else 'no such directory'}")
    kind = L.dir_kind(root)
    if kind is not None:
        raise OmniError(f"--ckpt_root {root}: is itself a{'n' if kind[0] in 'aeio' else ''} {kind} directory; point "
                        f"it at the folder that holds the component directories, or name them with --*_ckpt flags")
    omni = L.subdirs_of_kind(root, "omni")
    if len(omni) > 1:
        raise OmniError(f"--ckpt_root {root}: several omni checkpoint directories ({', '.join(p.name for p in omni)});"
                        f" name one with --omni_ckpt")
    dirs: dict[str, Path | None] = {"omni": omni[0] if omni else None}
    pointers = {}
    if dirs["omni"] is not None:
        cfg, _ = find_config(dirs["omni"])
        pointers = {kind: cfg.get(key) for kind, key in L.OMNI_POINTERS.items()}
    for kind in ("thinker", "audio", "vision", "talker", "vocoder"):
        dirs[kind], where = L.locate_component(kind, root, pointers.get(kind))
        if dirs[kind] is None and kind != "thinker":
            print(f"note: no {kind} checkpoint (searched {where})", file=sys.stderr)
    if dirs["omni"] is None and dirs["thinker"] is None:
        raise OmniError(f"--ckpt_root {root}: no omni_sft or thinker checkpoint directory in it")
    return dirs


def source_dirs(args: argparse.Namespace) -> dict[str, Path | None]:
    named = {flag: getattr(args, flag) for flag in COMPONENT_FLAGS if getattr(args, flag)}
    if args.ckpt_root:
        if named:
            raise OmniError(f"--ckpt_root finds every component itself; drop {', '.join('--' + f for f in named)} "
                            f"or name all components without --ckpt_root")
        return discover(Path(args.ckpt_root))
    if not (args.omni_ckpt or args.thinker_ckpt):
        raise OmniError("nothing to export: give --ckpt_root, or --omni_ckpt and/or --thinker_ckpt (plus the other "
                        "--*_ckpt directories to include)")
    return {kind: named_dir(flag, named[flag], kind) if flag in named else None
            for flag, kind in COMPONENT_FLAGS.items()}


def load_vocoder_dir(comps: L.Components, d: Path) -> None:
    path = L.weights_file(d, "vocoder")
    cfg, _ = find_config(d)
    comps.vocoder = L.build_vocoder(unwrap(read_torch_file(path), "vocoder", path), cfg, str(path))
    comps.sources["vocoder"] = str(path)


def load_sources(dirs: dict[str, Path | None]) -> L.Components:
    """Build exactly the named components (strict loads: a wrong file fails here, before anything is written)."""
    omni, thinker = dirs["omni"], dirs["thinker"]
    comps = L.Components(root=omni or thinker)
    if omni is not None:
        L.load_omni_dir(comps, omni, omni.parent, thinker_dir=thinker, siblings=False)
    else:
        L.load_thinker_dir(comps, thinker)
    loaders = {"audio": L.load_audio_dir, "vision": L.load_vision_dir, "talker": L.load_talker_dir,
               "vocoder": load_vocoder_dir}
    for kind, loader in loaders.items():
        if dirs[kind] is not None:
            loader(comps, dirs[kind])
    L.check_projector_fit(comps, comps.sources["thinker"])
    if comps.ctc_head is not None and comps.ctc_chars is None:
        print(f"note: {dirs['audio']} has no audio_enc_metadata.json: the export's CTC head cannot transcribe",
              file=sys.stderr)
    return comps


def source_generation_config(args: argparse.Namespace, dirs: dict[str, Path | None]) -> dict[str, Any]:
    """The first generation_config.json among the checkpoints root, the omni dir and the thinker dir."""
    for d in ([Path(args.ckpt_root)] if args.ckpt_root else []) + [dirs["omni"], dirs["thinker"]]:
        if d is not None:
            gc = L.read_generation_config(d)
            if gc:
                return gc
    return {}


def config_files(args: argparse.Namespace, dirs: dict[str, Path | None]) -> dict[str, Path]:
    """{name inside configs/: source file} for the export's configs/ copies."""
    if args.configs_dir:
        cdir = Path(args.configs_dir)
        if not cdir.is_dir():
            raise OmniError(f"--configs_dir {cdir}: no such directory")
        return {p.name: p for p in sorted(cdir.glob("*.json"))}
    files = {}
    for d in dirs.values():
        if d is not None:
            _, path = find_config(d)
            if path is not None:
                files[f"{d.name}.json" if path.name == "config.json" else path.name] = path
    return files


# ---------------------------------------------------------------- writing

def check_target(out: Path, force: bool) -> None:
    """Refuse to clobber: an existing export needs --force, anything else that is not empty is never replaced."""
    if out.is_symlink():
        raise OmniError(f"--output_dir {out}: is a symbolic link; give the real path")
    if out.exists():
        if not out.is_dir():
            raise OmniError(f"--output_dir {out}: exists and is not a directory")
        if any(out.iterdir()):
            if L.dir_kind(out) != "export":
                raise OmniError(f"--output_dir {out}: exists, is not empty and holds no μOmni export; refusing to "
                                f"replace it (even with --force)")
            if not force:
                raise OmniError(f"--output_dir {out}: already holds an export; pass --force to replace it")
    if not out.parent.is_dir():
        raise OmniError(f"--output_dir {out}: parent directory {out.parent} does not exist")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_files(tmp: Path, args: argparse.Namespace, comps: L.Components, dirs: dict[str, Path | None],
                merged: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype, int8: bool) -> None:
    """Every file of the export, into the not yet visible directory `tmp`."""
    tensors = {f"{prefix}.{k}": v for prefix, sd in merged.items() for k, v in sd.items()}
    n_int8 = sum(v.dtype == torch.int8 for v in tensors.values())
    save_file(tensors, str(tmp / args.output_file),
              metadata={"format": "pt", "model_type": "muomni", "torch_dtype": dtype_name(dtype),
                        "quantization": QUANT_METHOD if int8 else "none"})
    write_json(tmp / "config.json", export_config(comps, dtype, int8, n_int8))
    # safetensors creates its file owner-only; give it the permissions every other file of the export gets
    os.chmod(tmp / args.output_file, (tmp / "config.json").stat().st_mode & 0o777)
    source = source_generation_config(args, dirs)
    if args.decode_attention is not None:
        source = {**source, "decode_attention": args.decode_attention}
    write_json(tmp / "generation_config.json", generation_config(source))
    write_json(tmp / "preprocessor_config.json", preprocessor_config(comps))
    write_json(tmp / "model_info.json", model_info(comps, args.output_file, dtype, int8))
    shutil.copyfile(comps.tokenizer.path, tmp / "tokenizer.model")
    if comps.ctc_chars is not None:
        shutil.copyfile(Path(comps.sources["audio"]).parent / "audio_enc_metadata.json",
                        tmp / "audio_enc_metadata.json")
    if not args.skip_component_configs:
        (tmp / "configs").mkdir()
        for name, path in config_files(args, dirs).items():
            shutil.copyfile(path, tmp / "configs" / name)


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory to `out`; an export being replaced is moved aside first and removed last."""
    if not (out.exists() and any(out.iterdir())):
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


# ---------------------------------------------------------------- reporting

def print_table(comps: L.Components, merged: dict[str, dict[str, torch.Tensor]], weights: Path, dtype: torch.dtype,
                int8: bool) -> None:
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


def verify(source: L.Components, export_dir: Path, exact: bool) -> list[str]:
    """Reload the export and compare it with the source modules (report lines); a float32 export must match bit for
    bit."""
    exported = load_export(export_dir)
    ids = torch.tensor([source.tokenizer.prompt_ids(VERIFY_PROMPT)])
    with torch.inference_mode():
        a = source.thinker(source.thinker.tok_emb(ids))[0].float()
        b = exported.thinker(exported.thinker.tok_emb(ids))[0].float()
    logit_diff = (a - b).abs().max().item()
    agree = int((a.argmax(-1) == b.argmax(-1)).sum())
    weight_diff, n = 0.0, 0
    for attr in COMPONENT_PREFIXES:
        src, got = getattr(source, attr), getattr(exported, attr)
        if (src is None) != (got is None):
            raise OmniError(f"verify: {attr} is {'missing from' if got is None else 'unexpectedly in'} the export")
        if src is None:
            continue
        theirs = got.state_dict()
        for k, v in src.state_dict().items():
            weight_diff = max(weight_diff, (v.float() - theirs[k].float()).abs().max().item() if v.numel() else 0.0)
            n += 1
    if exact and (logit_diff != 0.0 or weight_diff != 0.0):
        raise OmniError(f"verify: the float32 export differs from its source checkpoints (logits {logit_diff:.6g}, "
                        f"weights {weight_diff:.6g}); nothing was written")
    return [f"verify: thinker logits on {VERIFY_PROMPT!r} ({ids.shape[1]} positions): max abs diff {logit_diff:.6g}, "
            f"top-1 agreement {agree}/{ids.shape[1]} ({100.0 * agree / ids.shape[1]:.2f}%)",
            f"verify: weights: max abs diff {weight_diff:.6g} over {n} tensors"]


# ---------------------------------------------------------------- main

def run(args: argparse.Namespace) -> int:
    if args.ocr_ckpt:
        raise OmniError("--ocr_ckpt: this project has no OCR model (models/ defines none), so OCR weights cannot be "
                        "exported or loaded; leave the flag out")
    out = Path(args.output_dir)
    check_target(out, args.force)
    int8 = args.quantize == "int8"
    dtype = STORAGE_DTYPES[args.dtype or ("float16" if int8 else "float32")]
    dirs = source_dirs(args)
    comps = load_sources(dirs)
    merged = merged_state_dict(comps, dtype, int8)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # mkdir, not mkdtemp: the export gets the user's usual permissions, not 0700
    try:
        write_files(tmp, args, comps, dirs, merged, dtype, int8)
        report = verify(comps, tmp, exact=dtype == torch.float32 and not int8) if args.verify else []
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print_table(comps, merged, out / args.output_file, dtype, int8)
    for line in report:
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (OmniError, OSError) as exc:  # OSError: permissions or a full disk; the partial export is already gone
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
