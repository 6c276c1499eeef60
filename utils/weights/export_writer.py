"""Writing a merged export (model.safetensors + support files) from μOmni trainer checkpoints: the library under
export.py, usable from Python:

    from utils.weights.export_writer import export_checkpoints
    result = export_checkpoints("export", ckpt_root="checkpoints/demo", quantize="int8", verify=True)

Sources are found (`find_sources`) and loaded strictly (`load_sources`); `write_export` writes the files into a
hidden temporary directory beside the target and renames it into place under a lock on the parent folder, so a
failed or interrupted export leaves nothing behind and concurrent exports into one folder take turns. Work
directories of killed runs are cleaned up on the next run. Error messages name export.py's flags, the interface
users meet them through.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from utils.weights import loading as L
from utils.weights.checkpoint import MAX_JSON_BYTES, find_config, listing, path_mode, read_json
from utils.weights.components import OCR_METADATA, check_config
from utils.base.errors import OmniError, one_line
from utils.base.export_names import COMPONENT_FLAGS, COMPONENT_PREFIXES, DEFAULT_OUTPUT_FILE, QUANT_METHOD
from utils.weights.export_format import (STORAGE_DTYPES, dtype_name, export_config, generation_config, load_export,
                                 merged_state_dict, model_info, preprocessor_config)

VERIFY_PROMPT = "Once upon a time there was"
Note = Callable[[str], None]


def stderr_note(message: str) -> None:
    print(f"note: {one_line(message)}", file=sys.stderr)


@dataclass
class ExportResult:
    """What was written: the export directory, its weights file, the merged tensors per component prefix (for a
    report), the storage dtype, whether Linear weights are int8, and the verification lines (empty without
    verify)."""
    out_dir: Path
    weights: Path
    components: L.Components
    merged: dict[str, dict[str, torch.Tensor]]
    dtype: torch.dtype
    int8: bool
    verify: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- finding the sources

def source_dir(flag: str, d: Path) -> Path:
    """`d`, checked to be a directory that can be listed; else an OmniError naming `flag` (e.g. "--ckpt_root")."""
    mode = path_mode(d, flag)
    if mode is None or not stat.S_ISDIR(mode):
        raise OmniError(f"{flag} {d}: {'is a file, not a directory' if mode is not None else 'no such directory'}")
    listing(d, flag)
    return d


def named_dir(flag: str, value: str, kind: str) -> Path:
    """A --*_ckpt directory, checked to hold the component its flag names."""
    d = source_dir(f"--{flag}", Path(value))
    found = L.dir_kind(d)
    if found != kind:
        held = f"holds {found} weights" if found else "holds no μOmni weights"
        raise OmniError(f"--{flag} {d}: {held}, expected a {kind} checkpoint directory")
    return d


def discover(root: Path, note: Note = stderr_note) -> dict[str, Path | None]:
    """Component directories under a checkpoints root: the omni config's pointers, else the one dir of each kind."""
    source_dir("--ckpt_root", root)
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
    for kind in ("thinker", "audio", "vision", "talker", "vocoder", "ocr"):
        dirs[kind], where = L.locate_component(kind, root, pointers.get(kind))
        if dirs[kind] is None and kind not in ("thinker", "ocr"):  # OCR is a trainer of its own, seldom run
            note(f"no {kind} checkpoint (searched {where})")
    if dirs["omni"] is None and dirs["thinker"] is None:
        raise OmniError(f"--ckpt_root {root}: no omni_sft or thinker checkpoint directory in it"
                        f"{L.did_you_mean(root, root)}")
    return dirs


def find_sources(ckpt_root: str | os.PathLike | None = None, named: dict[str, str] | None = None,
                 note: Note = stderr_note) -> dict[str, Path | None]:
    """The component directories to export, by kind: found under `ckpt_root`, or as `named` ({flag of
    COMPONENT_FLAGS: directory}, each checked to hold its kind)."""
    named = {flag: value for flag, value in (named or {}).items() if value}
    unknown = set(named) - set(COMPONENT_FLAGS)
    if unknown:
        raise OmniError(f"unknown component source(s) {', '.join(sorted(unknown))} (known: {', '.join(COMPONENT_FLAGS)})")
    if ckpt_root:
        if named:
            raise OmniError(f"--ckpt_root finds every component itself; drop {', '.join('--' + f for f in named)} "
                            f"or name all components without --ckpt_root")
        return discover(Path(ckpt_root), note)
    if not (named.get("omni_ckpt") or named.get("thinker_ckpt")):
        raise OmniError("nothing to export: give --ckpt_root, or --omni_ckpt and/or --thinker_ckpt (plus the other "
                        "--*_ckpt directories to include)")
    return {kind: named_dir(flag, named[flag], kind) if flag in named else None
            for flag, kind in COMPONENT_FLAGS.items()}


def load_sources(dirs: dict[str, Path | None], note: Note = stderr_note) -> L.Components:
    """Build exactly the named components (strict loads: a wrong file fails here, before anything is written)."""
    omni, thinker = dirs["omni"], dirs["thinker"]
    comps = L.Components(root=omni or thinker)
    if omni is not None:
        L.load_omni_dir(comps, omni, omni.parent, thinker_dir=thinker, siblings=False)
    else:
        L.load_thinker_dir(comps, thinker)
    loaders = {"audio": L.load_audio_dir, "vision": L.load_vision_dir, "talker": L.load_talker_dir,
               "vocoder": L.load_vocoder_dir, "ocr": L.load_ocr_dir}
    for kind, loader in loaders.items():
        if dirs[kind] is not None:
            loader(comps, dirs[kind])
    L.check_projector_fit(comps, comps.sources["thinker"])
    if comps.ctc_head is not None and comps.ctc_chars is None:
        note(f"{dirs['audio']} has no audio_enc_metadata.json: the export's CTC head cannot transcribe")
    return comps


def source_generation_config(ckpt_root: str | os.PathLike | None, dirs: dict[str, Path | None]) -> dict[str, Any]:
    """The first generation_config.json among the checkpoints root, the omni dir and the thinker dir."""
    for d in ([Path(ckpt_root)] if ckpt_root else []) + [dirs["omni"], dirs["thinker"]]:
        if d is not None:
            gc = L.read_generation_config(d)
            if gc:
                return gc
    return {}


def config_files(configs_dir: str | os.PathLike | None, dirs: dict[str, Path | None]) -> dict[str, Path]:
    """{name inside configs/: source file} for the export's configs/ copies: every *.json of `configs_dir`, else
    the trainer config tied to each source directory."""
    if configs_dir:
        cdir = source_dir("--configs_dir", Path(configs_dir))
        files = {p.name: p for p in listing(cdir) if p.suffix == ".json"}
        for p in files.values():  # a FIFO would block the copy forever, /dev/zero would fill the disk
            mode = path_mode(p)
            if mode is None or not stat.S_ISREG(mode) or os.path.getsize(p) > MAX_JSON_BYTES:
                raise OmniError(f"--configs_dir {cdir}: {p.name} is not a regular JSON file of at most "
                                f"{MAX_JSON_BYTES:,} bytes")
        return files
    files = {}
    for d in dirs.values():
        if d is not None:
            _, path = find_config(d)
            if path is not None:
                files[f"{d.name}.json" if path.name == "config.json" else path.name] = path
    return files


# ---------------------------------------------------------------- writing

def output_path(value: str) -> Path:
    """--output_dir as an absolute, normalised path: '.', 'x/..' and '' would otherwise have no usable name."""
    if not value.strip():
        raise OmniError("--output_dir: the path is empty")
    out = Path(os.path.abspath(value))
    if not out.name:
        raise OmniError(f"--output_dir {value}: names the filesystem root; give a directory to create")
    if os.path.exists(out) and os.path.samefile(out, os.curdir):
        raise OmniError(f"--output_dir {value}: is the current directory, which the finished export would replace; "
                        f"name a directory to create (e.g. --output_dir export)")
    return out


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


def write_files(tmp: Path, comps: L.Components, merged: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype,
                int8: bool, output_file: str, generation: dict[str, Any], configs: dict[str, Path] | None,
                shown: str | os.PathLike) -> None:
    """Every file of the export, into the not yet visible directory `tmp` (`shown`: the target, for messages)."""
    tensors = {f"{prefix}.{k}": v for prefix, sd in merged.items() for k, v in sd.items()}
    n_int8 = sum(v.dtype == torch.int8 for v in tensors.values())
    try:
        save_file(tensors, str(tmp / output_file),
                  metadata={"format": "pt", "model_type": "muomni", "torch_dtype": dtype_name(dtype),
                            "quantization": QUANT_METHOD if int8 else "none"})
    except Exception as exc:  # SafetensorError: a full disk (ENOSPC), the file-size limit (EFBIG), ...
        raise OmniError(f"--output_dir {shown}: cannot write {output_file} "
                        f"({' '.join(str(exc).split())[:200]})") from exc
    write_json(tmp / "config.json", export_config(comps, dtype, int8, n_int8))
    # safetensors creates its file owner-only; give it the permissions every other file of the export gets
    os.chmod(tmp / output_file, (tmp / "config.json").stat().st_mode & 0o777)
    write_json(tmp / "generation_config.json", generation_config(generation))
    write_json(tmp / "preprocessor_config.json", preprocessor_config(comps))
    write_json(tmp / "model_info.json", model_info(comps, output_file, dtype, int8))
    shutil.copyfile(comps.tokenizer.path, tmp / "tokenizer.model")
    if comps.ctc_chars is not None:
        shutil.copyfile(Path(comps.sources["audio"]).parent / "audio_enc_metadata.json",
                        tmp / "audio_enc_metadata.json")
    if comps.ocr_chars is not None:  # the OCR vocabulary (MUOMNI_OCR §1's metadata keys)
        write_json(tmp / OCR_METADATA, {"char_to_idx": {c: i for i, c in enumerate(comps.ocr_chars)},
                                        "idx_to_char": {str(i): c for i, c in enumerate(comps.ocr_chars)},
                                        "vocab_size": len(comps.ocr_chars)})
    if configs is not None:
        (tmp / "configs").mkdir()
        for name, path in configs.items():
            shutil.copyfile(path, tmp / "configs" / name)


def work_name(out: Path, kind: str) -> Path:
    """A hidden sibling of `out` for this process: `.NAME.tmp-PID-HEX` (the export being written) or
    `.NAME.old-PID-HEX` (the export being replaced). The pid lets a later run prove it stale."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # no such process: its work directory is stale
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(out: Path) -> list[str]:
    """Remove the work directories that runs killed without cleanup (SIGKILL, a power cut) left beside `out`:
    only those whose process is gone. A replaced export left aside with no export in its place is restored."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    notes = []
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or not p.is_dir() or p.is_symlink() or pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(out):
            os.rename(p, out)
            notes.append(f"restored {out} from {p.name}, left aside by the dead process {m.group(2)}")
        else:
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed {p}, left by the dead process {m.group(2)}")
    return notes


@contextmanager
def locked(directory: Path):
    """An exclusive flock on `directory` (no lock file to leave behind): export.py runs into the same folder
    check and rename their targets one at a time, so check-then-rename is atomic between them."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished directory to `out` (under the folder's lock, after checking the target again: another
    run may have finished first). An export being replaced is moved aside first and removed last."""
    with locked(out.parent):
        check_target(out, force)
        if not (out.exists() and any(out.iterdir())):
            os.rename(tmp, out)  # POSIX: replaces only an empty directory, never a filled one
            return
        old = work_name(out, "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
    try:
        shutil.rmtree(old)
    except BaseException:  # interrupted: the new export is in place, finish removing the old one, then stop
        shutil.rmtree(old, ignore_errors=True)
        raise


def verify_export(source: L.Components, export_dir: Path, exact: bool) -> list[str]:
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


# ---------------------------------------------------------------- the export

def storage_dtype(dtype: str | None, quantize: str | None) -> tuple[torch.dtype, bool]:
    """(float storage dtype, int8 Linear weights): float32 by default, float16 beside int8 weights."""
    if quantize not in (None, "int8"):
        raise OmniError(f"--quantize {quantize}: unknown (use int8)")
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise OmniError(f"--dtype {dtype}: unknown (use {', '.join(STORAGE_DTYPES)})")
    int8 = quantize == "int8"
    return STORAGE_DTYPES[dtype or ("float16" if int8 else "float32")], int8


def prepare_target(out_dir: str | os.PathLike, force: bool, note: Note = stderr_note) -> Path:
    """The export directory as an absolute path, after removing what killed runs left beside it and checking
    that it may be written (an existing export needs `force`)."""
    out = output_path(os.fspath(out_dir))
    if out.parent.is_dir():
        for message in clean_stale(out):
            note(message)
    check_target(out, force)
    return out


def write_export(components: L.Components, out_dir: str | os.PathLike, dtype: str | None = None,
                 quantize: str | None = None, verify: bool = False, force: bool = False,
                 output_file: str = DEFAULT_OUTPUT_FILE, generation: dict[str, Any] | None = None,
                 configs: dict[str, Path] | None = None, note: Note = stderr_note) -> ExportResult:
    """Write `components` (as load_sources builds them) as a merged export in `out_dir`: float tensors in `dtype`
    ('float32' default, 'float16', 'bfloat16'), Linear weights int8 with `quantize='int8'`; `generation`: the
    source generation_config.json to carry over; `configs`: {name: file} copied into configs/ (None: no
    configs/). With `verify` the written export is reloaded and compared (a float32 export must match bit for
    bit, else nothing is written). Atomic: nothing appears at `out_dir` unless everything succeeded."""
    if output_file not in L.EXPORT_NAMES:
        raise OmniError(f"--output_file {output_file}: use one of {', '.join(L.EXPORT_NAMES)}")
    out = prepare_target(out_dir, force, note)
    torch_dtype, int8 = storage_dtype(dtype, quantize)
    for path in (configs or {}).values():  # a copy loading would refuse must not make a finished export
        check_config(read_json(path), str(path))
    merged = merged_state_dict(components, torch_dtype, int8)
    tmp = work_name(out, "tmp")
    tmp.mkdir()  # mkdir, not mkdtemp: the export gets the user's usual permissions, not 0700
    try:
        write_files(tmp, components, merged, torch_dtype, int8, output_file, generation or {}, configs, out_dir)
        report = verify_export(components, tmp, exact=torch_dtype == torch.float32 and not int8) if verify else []
        move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, out / output_file, components, merged, torch_dtype, int8, report)


def export_checkpoints(out_dir: str | os.PathLike, ckpt_root: str | os.PathLike | None = None,
                       named: dict[str, str] | None = None, dtype: str | None = None, quantize: str | None = None,
                       verify: bool = False, force: bool = False, output_file: str = DEFAULT_OUTPUT_FILE,
                       configs_dir: str | os.PathLike | None = None, component_configs: bool = True,
                       decode_attention: str | None = None, note: Note = stderr_note) -> ExportResult:
    """Find, load and export trainer checkpoints (what export.py does): the components under `ckpt_root` or the
    `named` directories; the target is checked before anything is loaded. `decode_attention` overrides the
    decode mode the source generation_config.json gives."""
    prepare_target(out_dir, force, note)
    storage_dtype(dtype, quantize)
    dirs = find_sources(ckpt_root, named, note)
    comps = load_sources(dirs, note)
    generation = source_generation_config(ckpt_root, dirs)
    if decode_attention is not None:
        generation = {**generation, "decode_attention": decode_attention}
    configs = config_files(configs_dir, dirs) if component_configs else None
    return write_export(comps, out_dir, dtype, quantize, verify, force, output_file, generation, configs, note)
