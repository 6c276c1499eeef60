"""Find every μOmni component under a user's `--ckpt_dir` (the trainers' layouts, spec §1) and build the networks
from their weights with utils.weights.components (a merged export is read by utils.weights.export_format).

Accepted directories: a thinker dir (text only), an omni_sft dir, a trainers' `checkpoints/` root holding the
component dirs, a single audio-encoder dir (for transcription), or a merged safetensors export.
"""
from __future__ import annotations

import os
import re
import stat
import warnings
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from utils.weights.components import (CTC_MAP_NAMES, VOCODER_NAMES, Components, build_audio, build_linear,
                              build_ocr, build_rvq, build_talker, build_thinker, build_vision, build_vocoder,
                              check_projector_fit, named_vocoder_file, ocr_vocabulary_near, read_ctc_metadata,
                              read_generation_config, set_ocr, set_tokenizer)
from utils.weights.checkpoint import (StateDict, find_config, find_weights_file, is_directory, is_regular, listing,
                                      path_mode, read_json, read_torch_file, unwrap)
from utils.base.errors import OmniError
from utils.weights.export_format import EXPORT_NAMES, load_export
from utils.media.tokenizer import Tokenizer

# Weights-file base names per trainer directory kind (spec §1).
KIND_FILES = {"omni": ("omni",), "thinker": ("thinker",), "audio": ("audio_enc",), "vision": ("vision",),
              "talker": ("talker",), "vocoder": VOCODER_NAMES, "ocr": ("ocr",)}
# Config keys of omni_sft_*.json that point at the component directories.
OMNI_POINTERS = {"thinker": "thinker_ckpt", "audio": "audio_ckpt", "vision": "vision_ckpt", "talker": "talker_ckpt"}
# A weights file the user named itself (`--ckpt_dir dir/omni_final.pt`): resolved dir -> (kind, file).
CHOSEN_FILES: ContextVar[dict[Path, tuple[str, Path]]] = ContextVar("CHOSEN_FILES", default={})
STANDARD_PT = re.compile(r"^(?:model|(?:%s)(?:_step_\d+)?)\.pt$"
                         % "|".join(n for names in KIND_FILES.values() for n in names))


# ---------------------------------------------------------------- directory kinds

def dir_kind(d: Path) -> str | None:
    """What a directory holds, judged by its file names (and a `model.pt`'s wrapper keys); without any standard
    name, by the wrapper keys of its one other `.pt` file (`omni_final.pt`, `thinker_best.pt`)."""
    chosen = CHOSEN_FILES.get().get(d.resolve())
    if chosen is not None:
        return chosen[0]
    names_here = [p.name for p in listing(d)]  # first: a directory that cannot be read is named itself
    if any(is_regular(d / n) for n in EXPORT_NAMES):
        return "export"
    for kind, names in KIND_FILES.items():
        for name in names:
            if is_regular(d / f"{name}.pt") or any(n.startswith(f"{name}_step_") and n.endswith(".pt")
                                                   for n in names_here):
                return kind
    if is_regular(d / "model.pt"):
        return model_pt_kind(d / "model.pt")
    others = other_pt_files(d)
    if len(others) == 1:
        try:
            return model_pt_kind(others[0])
        except OmniError:  # another program's file: not a μOmni directory (load_components says why)
            return None
    return None


def other_pt_files(d: Path) -> list[Path]:
    """`.pt` files in `d` without a standard μOmni name (e.g. `omni_final.pt`, `thinker_best.pt`)."""
    return [p for p in listing(d) if p.suffix == ".pt" and not STANDARD_PT.match(p.name) and is_regular(p)]


def several_weights_error(d: Path, shown: str | Path) -> OmniError:
    files = other_pt_files(d)
    return OmniError(f"{shown}: several weights files and none with a standard name "
                     f"({', '.join(p.name for p in files)}); pick one by passing the file itself, e.g. "
                     f"--ckpt_dir {Path(shown) / files[0].name}")


def model_dirs_below(d: Path, shown: str | Path) -> list[str]:
    """Directories under `d` (one or two levels) that --ckpt_dir would accept, spelled from `shown`: for the
    "did you mean checkpoints/demo?" hint."""
    found = []
    for child in child_dirs(d):
        try:
            if dir_kind(child) in ("export", "omni", "thinker") or any(
                    dir_kind(g) in ("export", "omni", "thinker") for g in child_dirs(child)):
                found.append(str(Path(shown) / child.name))
        except OmniError:  # an unreadable file below: not a suggestion
            continue
    return found


def did_you_mean(d: Path, shown: str | Path) -> str:
    found = model_dirs_below(d, shown)
    return f"; did you mean {' or '.join(found[:5])}?" if found else ""


def model_pt_kind(path: Path) -> str:
    obj = read_torch_file(path)
    if is_ocr_state(obj.get("model", obj)):  # train_ocr.py wraps its model in "model", as the thinker trainer does
        return "ocr"
    # Wrapper keys (spec §1); an omni checkpoint is told from a thinker one by its projectors.
    by_key = [("proj_a", "omni"), ("proj_v", "omni"), ("thinker", "thinker"), ("model", "thinker"),
              ("enc", "audio"), ("vit", "vision"), ("talker", "talker"), ("rvq", "talker"), ("generator", "vocoder")]
    for key, kind in by_key:
        if key in obj:
            return kind
    # A bare state dict: judge by parameter names, `_orig_mod.` segments removed (torch.compile'd trainers).
    names = {k.replace("_orig_mod.", "") for k in obj}
    by_param = [("tok_emb.weight", "thinker"), ("cls", "vision"), ("proj.weight", "audio"), ("start", "talker"),
                ("conv_pre.weight", "vocoder")]
    for key, kind in by_param:
        if key in names:
            return kind
    raise OmniError(f"checkpoint {path}: cannot tell which μOmni component it holds (keys {sorted(obj)[:8]})")


def is_ocr_state(sd: Any) -> bool:
    """An OCRModel state dict (MUOMNI_OCR §3), `_orig_mod.` segments or not."""
    return isinstance(sd, dict) and any(
        isinstance(k, str) and k.replace("_orig_mod.", "") == "decoder.char_embed.weight" for k in sd)


def weights_file(d: Path, kind: str) -> Path:
    chosen = CHOSEN_FILES.get().get(d.resolve())
    if chosen is not None and chosen[0] == kind:
        return chosen[1]
    for name in KIND_FILES[kind]:
        found = find_weights_file(d, name)
        if found:
            return found
    others = other_pt_files(d)
    if len(others) == 1:
        warnings.warn(f"no standard {kind} weights name in {d}: using its only .pt file, {others[0].name}")
        return others[0]
    if len(others) > 1:
        raise several_weights_error(d, d)
    raise OmniError(f"no {kind} weights in {d} (looked for {KIND_FILES[kind][0]}.pt, model.pt, "
                    f"{KIND_FILES[kind][0]}_step_N.pt)")


def subdirs_of_kind(parent: Path, kind: str) -> list[Path]:
    return [p for p in child_dirs(parent) if dir_kind(p) == kind]


def locate_component(kind: str, base: Path, pointer: str | None) -> tuple[Path | None, str]:
    """Directory of a component for an omni/root layout: the config's pointer (cwd-relative, else by basename
    among `base`'s children), else the one child directory of that kind. Returns (dir or None, what was searched)."""
    if pointer:
        p = Path(str(pointer).replace("\\", "/"))  # configs written on Windows
        tried = [p, base / p.name]
        for cand in tried:
            if is_directory(cand):
                sibling = tried[1]
                if cand is p and is_directory(sibling) and sibling.resolve() != p.resolve():
                    warnings.warn(f"the omni config's {OMNI_POINTERS.get(kind, kind)} '{pointer}' is taken relative "
                                  f"to the current directory ({p.resolve()}), not the sibling {sibling}")
                return cand, str(cand)
        return None, " and ".join(str(t) for t in tried)
    found = subdirs_of_kind(base, kind)
    if len(found) > 1:
        raise OmniError(f"several {kind} checkpoint directories in {base} ({', '.join(p.name for p in found)}): "
                        f"name one in the omni config's '{OMNI_POINTERS.get(kind, kind)}' or point --ckpt_dir at it")
    return (found[0] if found else None), f"the subdirectories of {base}"


# ---------------------------------------------------------------- per-component builders


# ---------------------------------------------------------------- layouts

def load_components(ckpt_dir: str | Path) -> Components:
    """Discover and load everything under `ckpt_dir` (see the module docstring for accepted layouts)."""
    # Siblings and ../configs, ../../configs are found through the parents: '.', 'x/..' or a bare relative name
    # must name the real directories (lexically normalised: a symlinked run directory keeps its own siblings).
    d = Path(os.path.normpath(Path(ckpt_dir).absolute()))
    mode = path_mode(d, "--ckpt_dir")
    if mode is None:
        raise OmniError(f"--ckpt_dir {d}: no such directory")
    if stat.S_ISREG(mode):
        return load_weights_file(d)
    if not stat.S_ISDIR(mode):
        raise OmniError(f"--ckpt_dir {d}: is neither a directory nor a weights file")
    listing(d, "--ckpt_dir")  # an unreadable directory is named as what the user gave, not by a file inside it
    kind = dir_kind(d)
    if kind == "export":
        return load_export(d)
    comps = Components(root=d)
    if kind == "thinker":
        load_thinker_dir(comps, d)
        comps.searched.update({m: f"{d} (a thinker-only directory)" for m in ("vision", "audio", "talker", "ocr")})
    elif kind == "omni":
        load_omni_dir(comps, d, d.parent)
    elif kind == "audio":
        load_audio_dir(comps, d)
        comps.searched["thinker"] = f"{d} (an audio-encoder directory: use it with --transcribe)"
    elif kind == "ocr":
        load_ocr_dir(comps, d)
        comps.searched["thinker"] = f"{d} (an OCR directory: use it with --ocr)"
    elif kind is None:
        omni = subdirs_of_kind(d, "omni")
        if len(omni) > 1:
            raise OmniError(f"--ckpt_dir {d}: several omni checkpoint directories ({', '.join(p.name for p in omni)})")
        if omni:
            load_omni_dir(comps, omni[0], d)
        else:
            thinker, where = locate_component("thinker", d, None)
            if thinker is None and is_directory(d / "checkpoints") and d.name != "checkpoints":
                return load_components(d / "checkpoints")  # the μOmni repository root
            exports = subdirs_of_kind(d, "export") if thinker is None else []
            if len(exports) == 1:
                return load_components(exports[0])  # a folder holding one merged export
            others = other_pt_files(d) if thinker is None else []
            if len(others) > 1:
                raise several_weights_error(d, ckpt_dir)
            if len(others) == 1:
                model_pt_kind(others[0])  # it was not readable as μOmni weights: say why
            if thinker is None:
                raise OmniError(f"--ckpt_dir {d}: no μOmni checkpoint found (no {', '.join(EXPORT_NAMES)}, no "
                                f"thinker/omni weights here or in its subdirectories){did_you_mean(d, ckpt_dir)}")
            load_thinker_dir(comps, thinker)
            load_siblings(comps, d, {})
    else:
        raise OmniError(f"--ckpt_dir {d}: holds only {kind} weights; point it at a thinker, omni_sft, "
                        f"checkpoints root or export directory")
    load_vocoder_near(comps, d)
    comps.generation_defaults = read_generation_config(d)
    return comps


def load_weights_file(path: Path) -> Components:
    """`--ckpt_dir dir/omni_final.pt`: these weights for their component, everything else found around them
    exactly as for `dir` (llama.cpp's `-m model.gguf`)."""
    if path.suffix == ".safetensors":
        if dir_kind(path.parent) == "export" and path.name in EXPORT_NAMES:
            return load_components(path.parent)
        raise OmniError(f"--ckpt_dir {path}: not a merged export's weights file (expected one of "
                        f"{', '.join(EXPORT_NAMES)} beside config.json)")
    if path.suffix != ".pt":
        raise OmniError(f"--ckpt_dir {path}: is a file but not a weights file (.pt or .safetensors); give the "
                        f"checkpoint directory or its weights file")
    try:
        kind = model_pt_kind(path)
    except OmniError as exc:
        raise OmniError(f"--ckpt_dir {path}: is a file, read as a weights file: {exc}") from exc
    token = CHOSEN_FILES.set({**CHOSEN_FILES.get(), path.parent.resolve(): (kind, path)})
    try:
        return load_components(path.parent)
    finally:
        CHOSEN_FILES.reset(token)


def config_label(path: Path | None) -> str:
    return str(path) if path is not None else "none found (spec defaults)"


def load_thinker_dir(comps: Components, d: Path, sd: StateDict | None = None,
                     cfg_override: dict[str, Any] | None = None) -> None:
    path = weights_file(d, "thinker")
    cfg, cfg_path = find_config(d)
    comps.configs["thinker"] = config_label(cfg_path)
    if cfg_override:
        cfg = {**cfg, **cfg_override}
    src = str(path)
    if sd is None:
        sd = unwrap(read_torch_file(path), "thinker", path)
    comps.thinker = build_thinker(sd, cfg, src)
    comps.ctx_len = comps.thinker.cfg.ctx_len
    comps.sources["thinker"] = src
    tok = d / "tokenizer.model"
    if not is_regular(tok):
        raise OmniError(f"tokenizer {tok}: not found (the thinker directory must hold tokenizer.model)")
    set_tokenizer(comps, Tokenizer(tok))


def load_omni_dir(comps: Components, d: Path, base: Path, thinker_dir: Path | None = None,
                  siblings: bool = True) -> None:
    """Thinker and projectors from omni.pt; `thinker_dir` (tokenizer, config) and `siblings=False` let export.py
    name every component itself instead of discovering them."""
    path = weights_file(d, "omni")
    obj = read_torch_file(path)
    cfg, omni_cfg_path = find_config(d)
    comps.configs["omni"] = config_label(omni_cfg_path)
    pointers = {kind: cfg.get(key) for kind, key in OMNI_POINTERS.items()}
    if thinker_dir is None:
        thinker_dir, where = locate_component("thinker", base, pointers["thinker"])
        if thinker_dir is None and is_regular(d / "tokenizer.model"):
            thinker_dir = d
        if thinker_dir is None:
            raise OmniError(f"{path}: no thinker directory with tokenizer.model found (searched {where})")
    thinker_cfg = dict(cfg.get("thinker") or {})
    if "ctx_len" in cfg:
        thinker_cfg.setdefault("ctx_len", cfg["ctx_len"])
    comps.root = d
    sd = unwrap(obj, "thinker", path)
    tcfg, thinker_cfg_path = find_config(thinker_dir)
    comps.configs["thinker"] = config_label(thinker_cfg_path) + (" + the omni config's overrides"
                                                                 if thinker_cfg else "")
    cfg_merged = {**tcfg, **thinker_cfg}
    comps.thinker = build_thinker(sd, cfg_merged, str(path))
    comps.ctx_len = comps.thinker.cfg.ctx_len
    comps.sources["thinker"] = str(path)
    tok = thinker_dir / "tokenizer.model"
    if not is_regular(tok):
        raise OmniError(f"tokenizer {tok}: not found")
    set_tokenizer(comps, Tokenizer(tok))
    d_model = comps.thinker.cfg.d_model
    for name in ("proj_a", "proj_v"):
        if name not in obj:
            raise OmniError(f"checkpoint {path}: missing '{name}' (the omni checkpoint must hold both projectors)")
        layer = build_linear(unwrap(obj, name, path), f"{path} [{name}]")
        if layer.out_features != d_model:
            raise OmniError(f"checkpoint {path}: {name} outputs {layer.out_features} features but the thinker "
                            f"d_model is {d_model}")
        setattr(comps, name, layer)
    if siblings:
        load_siblings(comps, base, pointers)
    check_projector_fit(comps, str(path))


def load_siblings(comps: Components, base: Path, pointers: dict[str, Any]) -> None:
    """Vision, audio and talker directories beside the omni/thinker directory (or under a checkpoints root)."""
    loaders = {"vision": load_vision_dir, "audio": load_audio_dir, "talker": load_talker_dir, "ocr": load_ocr_dir}
    for kind, loader in loaders.items():
        found, where = locate_component(kind, base, pointers.get(kind))
        if found is None:
            comps.searched[kind] = where
        else:
            loader(comps, found)


def read_component(comps: Components, d: Path, kind: str) -> tuple[Path, Any, dict[str, Any]]:
    """(weights file, its unpickled contents, config) of a `kind` directory, recorded in comps.sources/configs."""
    path = weights_file(d, kind)
    obj = read_torch_file(path)
    cfg, cfg_path = find_config(d)
    comps.configs[kind] = config_label(cfg_path)
    comps.sources[kind] = str(path)
    return path, obj, cfg


def load_vision_dir(comps: Components, d: Path) -> None:
    path, obj, cfg = read_component(comps, d, "vision")
    comps.vision = build_vision(unwrap(obj, "vision_encoder", path), cfg, str(path))


def load_audio_dir(comps: Components, d: Path) -> None:
    path, obj, cfg = read_component(comps, d, "audio")
    comps.audio = build_audio(unwrap(obj, "audio_encoder", path), cfg, str(path))
    if "head" in obj:
        comps.ctc_head = build_linear(unwrap(obj, "ctc_head", path), f"{path} [head]")
        meta = next((d / n for n in CTC_MAP_NAMES if os.path.lexists(d / n)), d / CTC_MAP_NAMES[0])
        if os.path.lexists(meta):  # present but not a regular file (a FIFO) is an error, not "no map"
            comps.ctc_chars, comps.language = read_ctc_metadata(meta)
            if len(comps.ctc_chars) != comps.ctc_head.out_features:
                raise OmniError(f"{meta}: {len(comps.ctc_chars)} characters but the CTC head in {path} has "
                                f"{comps.ctc_head.out_features} outputs")
        else:
            comps.searched["ctc_chars"] = str(meta)


def load_ocr_dir(comps: Components, d: Path) -> None:
    """ocr.pt (a finished run's `{"model"}` or a periodic checkpoint's `{"model", "char_to_idx", "idx_to_char"}`)
    with its vocabulary from ocr_metadata.json or from inside ocr.pt (both present: they must agree)."""
    path, obj, cfg = read_component(comps, d, "ocr")
    model = build_ocr(unwrap(obj, "ocr", path), cfg, str(path))
    chars, src = ocr_vocabulary_near(d, obj, path)
    set_ocr(comps, model, chars, str(path), src)


def load_vocoder_dir(comps: Components, d: Path) -> None:
    """A HiFi-GAN directory named explicitly (export.py --vocoder_ckpt); `load_vocoder_near` searches instead."""
    path, obj, cfg = read_component(comps, d, "vocoder")
    comps.vocoder = build_vocoder(unwrap(obj, "vocoder", path), cfg, str(path))


def load_talker_dir(comps: Components, d: Path) -> None:
    path, obj, cfg = read_component(comps, d, "talker")
    comps.talker = build_talker(unwrap(obj, "talker", path), cfg, str(path))
    comps.rvq = build_rvq(unwrap(obj, "rvq", path), f"{path} [rvq]")


def child_dirs(parent: Path) -> list[Path]:
    if not is_directory(parent):
        return []
    return [p for p in listing(parent) if not p.name.startswith(".") and is_directory(p)]


def vocoder_config(d: Path) -> dict[str, Any]:
    cfg, _ = find_config(d)
    if cfg.get("model_type") == "muomni":  # an export's config.json: its nested object or its configs/ copy
        nested = cfg.get("vocoder")
        copy = d / "configs" / "vocoder_tiny.json"
        return nested if isinstance(nested, dict) else read_json(copy) if os.path.lexists(copy) else {}
    return cfg


def load_vocoder_near(comps: Components, d: Path) -> None:
    """HiFi-GAN weights (spec §1: `vocoder.pt`, older `hifigan.pt`): lying in the checkpoint dir itself, else a
    vocoder directory among its subdirectories or its siblings, else such a file in one of those directories
    (an export's copy). None found: speech falls back to Griffin-Lim."""
    near = list(dict.fromkeys([d, comps.root]))
    around = [p for p in dict.fromkeys(child_dirs(d) + child_dirs(comps.root.parent)) if p not in near]
    found = next(((c, p) for c in near if (p := named_vocoder_file(c))), None)
    if found is None:
        found = next(((c, weights_file(c, "vocoder")) for c in around if dir_kind(c) == "vocoder"), None)
    if found is None:
        found = next(((c, p) for c in around if (p := named_vocoder_file(c))), None)
    if found is not None:
        c, path = found
        comps.vocoder = build_vocoder(unwrap(read_torch_file(path), "vocoder", path), vocoder_config(c), str(path))
        comps.sources["vocoder"] = str(path)


