"""Find every μOmni component under a user's `--ckpt_dir` and build the networks from their weights.

Accepted directories: a thinker dir (text only), an omni_sft dir, a trainers' `checkpoints/` root holding the
component dirs, a single audio-encoder dir (for transcription), or a merged safetensors export.
"""
from __future__ import annotations

import os
import re
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.audio import AudioEncoderConfig, AudioEncoderTiny
from models.talker import RVQ, TalkerConfig, TalkerTiny
from models.thinker import ThinkerConfig, ThinkerLM
from models.vision import ViTConfig, ViTTiny
from models.vocoder import HiFiGANConfig, HiFiGANGenerator
from utils.checkpoint import (StateDict, check_config_agrees, config_float, config_int, find_config,
                              find_weights_file, load_strict, read_json, read_torch_file, require,
                              short_repr, unwrap)
from utils.errors import OmniError
from utils.tokenizer import Tokenizer

EXPORT_NAMES = ("model.safetensors", "muomni.safetensors", "omni.safetensors")
# Weights-file base names per trainer directory kind (spec §1).
KIND_FILES = {"omni": ("omni",), "thinker": ("thinker",), "audio": ("audio_enc",), "vision": ("vision",),
              "talker": ("talker",), "vocoder": ("vocoder", "hifigan")}
# Config keys of omni_sft_*.json that point at the component directories.
OMNI_POINTERS = {"thinker": "thinker_ckpt", "audio": "audio_ckpt", "vision": "vision_ckpt", "talker": "talker_ckpt"}
CTC_MAP_NAMES = ("audio_enc_metadata.json", "ctc_vocab.json")
# A weights file the user named itself (`--ckpt_dir dir/omni_final.pt`): resolved dir -> (kind, file).
CHOSEN_FILES: ContextVar[dict[Path, tuple[str, Path]]] = ContextVar("CHOSEN_FILES", default={})
STANDARD_PT = re.compile(r"^(?:model|(?:%s)(?:_step_\d+)?)\.pt$"
                         % "|".join(n for names in KIND_FILES.values() for n in names))


@dataclass
class Components:
    """The loaded networks. A modality whose component is absent is None, with `searched` saying where we looked."""
    thinker: ThinkerLM | None = None
    tokenizer: Tokenizer | None = None
    ctx_len: int = 512
    vision: ViTTiny | None = None
    proj_v: nn.Linear | None = None
    audio: AudioEncoderTiny | None = None
    proj_a: nn.Linear | None = None
    ctc_head: nn.Linear | None = None
    ctc_chars: dict[int, str] | None = None
    talker: TalkerTiny | None = None
    rvq: RVQ | None = None
    vocoder: HiFiGANGenerator | None = None
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32  # float dtype the weights were stored in: the default compute dtype
    sources: dict[str, str] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)  # component -> the config file its settings came from
    searched: dict[str, str] = field(default_factory=dict)
    root: Path = Path(".")

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.thinker, self.vision, self.proj_v, self.audio, self.proj_a, self.ctc_head,
                            self.talker, self.rvq, self.vocoder) if m is not None]


# ---------------------------------------------------------------- directory kinds

def dir_kind(d: Path) -> str | None:
    """What a directory holds, judged by its file names (and a `model.pt`'s wrapper keys); without any standard
    name, by the wrapper keys of its one other `.pt` file (`omni_final.pt`, `thinker_best.pt`)."""
    chosen = CHOSEN_FILES.get().get(d.resolve())
    if chosen is not None:
        return chosen[0]
    if any((d / n).is_file() for n in EXPORT_NAMES):
        return "export"
    for kind, names in KIND_FILES.items():
        for name in names:
            if (d / f"{name}.pt").is_file() or any(d.glob(f"{name}_step_*.pt")):
                return kind
    if (d / "model.pt").is_file():
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
    try:
        return sorted(p for p in d.glob("*.pt") if p.is_file() and not STANDARD_PT.match(p.name))
    except OSError:
        return []


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
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".") and dir_kind(p) == kind)


def locate_component(kind: str, base: Path, pointer: str | None) -> tuple[Path | None, str]:
    """Directory of a component for an omni/root layout: the config's pointer (cwd-relative, else by basename
    among `base`'s children), else the one child directory of that kind. Returns (dir or None, what was searched)."""
    if pointer:
        p = Path(str(pointer).replace("\\", "/"))  # configs written on Windows
        tried = [p, base / p.name]
        for cand in tried:
            if cand.is_dir():
                sibling = tried[1]
                if cand is p and sibling.is_dir() and sibling.resolve() != p.resolve():
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

def heads(cfg: dict[str, Any], default: int, src: str) -> int:
    return config_int(cfg, "n_heads", default, src)


def shape_of(sd: StateDict, key: str, dims: int, src: str) -> tuple[int, ...]:
    """A tensor's shape, checked to have `dims` dimensions (a key that is present but malformed)."""
    shape = tuple(sd[key].shape)
    if len(shape) != dims:
        raise OmniError(f"{src}: wrong shape for {key} (expected {dims} dimensions, found {shape})")
    return shape


def read_architecture(fn, src: str):
    """Run a `from_state_dict` reader: a malformed state dict becomes one error naming the file."""
    try:
        return fn()
    except OmniError:
        raise
    except (KeyError, IndexError, ValueError, ZeroDivisionError, RuntimeError, TypeError) as exc:
        raise OmniError(f"{src}: cannot read the architecture off the tensor shapes ({type(exc).__name__}: "
                        f"{exc})") from exc


def check_attention_split(block: Any, sd: StateDict, src: str) -> None:
    """The KV heads read off `attn.k` must divide the configured query heads (GQA repeat_interleave)."""
    if block.n_kv_heads < 1 or block.n_heads % block.n_kv_heads:
        raise OmniError(f"{src}: n_heads {block.n_heads} is not a multiple of the {block.n_kv_heads} KV heads "
                        f"implied by the shape of blocks.0.attn.k.weight "
                        f"{tuple(sd['blocks.0.attn.k.weight'].shape) if 'blocks.0.attn.k.weight' in sd else ''}")


def build_thinker(sd: StateDict, cfg: dict[str, Any], src: str) -> ThinkerLM:
    require(sd, ("tok_emb.weight", "lm_head.weight", "blocks.0.norm1.weight"), src)
    n_heads = heads(cfg, 4, src)
    check_head_split(shape_of(sd, "tok_emb.weight", 2, src)[1], n_heads, src)
    tc = read_architecture(lambda: ThinkerConfig.from_state_dict(
        sd, n_heads=n_heads, rope_theta=config_float(cfg, "rope_theta", 10000.0, src),
        ctx_len=config_int(cfg, "ctx_len", 512, src),
        num_experts_per_tok=config_int(cfg, "num_experts_per_tok", 2, src)), src)
    check_config_agrees(cfg, {"vocab_size": tc.vocab_size, "d_model": tc.d_model, "n_layers": tc.n_layers}, src, src)
    check_head_split(tc.d_model, tc.block.n_heads, src)
    check_attention_split(tc.block, sd, src)
    model = ThinkerLM(tc)
    load_strict(model, sd, src)
    return model


def check_head_split(d_model: int, n_heads: int, src: str) -> None:
    if n_heads > d_model or d_model % n_heads:
        raise OmniError(f"{src}: n_heads {n_heads} does not divide d_model {d_model}")


def build_vision(sd: StateDict, cfg: dict[str, Any], src: str) -> ViTTiny:
    require(sd, ("proj.weight", "pos", "cls"), src)
    shape_of(sd, "proj.weight", 4, src)
    shape_of(sd, "pos", 3, src)
    vc = read_architecture(lambda: ViTConfig.from_state_dict(sd, n_heads=heads(cfg, 2, src)), src)
    check_config_agrees(cfg, {"d_model": vc.d_model, "n_layers": vc.n_layers}, src, src)
    check_head_split(vc.d_model, vc.n_heads, src)
    model = ViTTiny(vc)
    load_strict(model, sd, src)
    return model


def build_audio(sd: StateDict, cfg: dict[str, Any], src: str) -> AudioEncoderTiny:
    require(sd, ("proj.weight",), src)
    shape_of(sd, "proj.weight", 2, src)
    ac = read_architecture(lambda: AudioEncoderConfig.from_state_dict(sd, n_heads=heads(cfg, 3, src)), src)
    check_config_agrees(cfg, {"d_model": ac.d_model, "n_layers": ac.n_layers, "downsample_time": ac.downsample},
                        src, src)
    check_head_split(ac.d_model, ac.n_heads, src)
    model = AudioEncoderTiny(ac)
    load_strict(model, sd, src)
    return model


def build_talker(sd: StateDict, cfg: dict[str, Any], src: str) -> TalkerTiny:
    require(sd, ("emb.weight", "start", "blocks.0.norm1.weight"), src)
    n_heads = heads(cfg, 3, src)
    check_head_split(shape_of(sd, "emb.weight", 2, src)[1], n_heads, src)
    tc = read_architecture(lambda: TalkerConfig.from_state_dict(
        sd, n_heads=n_heads, rope_theta=config_float(cfg, "rope_theta", 10000.0, src)), src)
    check_config_agrees(cfg, {"d_model": tc.block.d_model, "n_layers": tc.n_layers}, src, src)
    check_head_split(tc.block.d_model, tc.block.n_heads, src)
    check_attention_split(tc.block, sd, src)
    model = TalkerTiny(tc)
    load_strict(model, sd, src)
    return model


def build_rvq(sd: StateDict, src: str) -> RVQ:
    require(sd, ("codebooks.0.weight", "codebooks.1.weight", "proj_in.weight", "proj_out.weight"), src)
    shape_of(sd, "codebooks.0.weight", 2, src)
    model = read_architecture(lambda: RVQ.from_state_dict(sd), src)
    load_strict(model, sd, src)
    return model


MAX_DILATION = 1024  # HiFi-GAN uses 1-5; a larger one only makes the padding (and the memory) huge


def build_vocoder(sd: StateDict, cfg: dict[str, Any], src: str) -> HiFiGANGenerator:
    require(sd, ("conv_pre.weight", "ups.0.weight", "resblocks.0.convs1.0.weight", "conv_post.weight"), src)
    vc = read_architecture(lambda: HiFiGANConfig.from_state_dict(sd, int_lists(cfg, "resblock_dilation_sizes", 2, src),
                                                                 int_lists(cfg, "upsample_rates", 1, src)), src)
    check_vocoder_config(vc, sd, src)
    model = read_architecture(lambda: HiFiGANGenerator(vc), src)
    load_strict(model, sd, src)
    return model


def int_lists(cfg: dict[str, Any], key: str, depth: int, src: str) -> list | None:
    """cfg[key] as a list of integers (depth 1) or of lists of integers (depth 2), or None when absent."""
    value = cfg.get(key)
    if value is None:
        return None
    rows = value if depth == 2 else [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(row, list) and row and all(isinstance(v, int) and not isinstance(v, bool) for v in row)
            for row in rows):
        raise OmniError(f"config for {src}: '{key}' must be a non-empty list of "
                        f"{'lists of ' if depth == 2 else ''}integers, found {short_repr(value)}")
    return value


def check_vocoder_config(vc: HiFiGANConfig, sd: StateDict, src: str) -> None:
    """Every layer the config describes must be buildable and agree with the weights, at load time (not after
    the answer and the talker have run): upsampling rates 1..kernel (padding (kernel - rate) / 2 >= 0), one per
    upsampling layer; dilations 1..MAX_DILATION, one list per resblock kernel, as many as the weights' convs."""
    n_dil = len({k.split(".")[3] for k in sd if k.startswith("resblocks.0.convs1.")})
    if len(vc.upsample_rates) != len(vc.upsample_kernel_sizes):
        raise OmniError(f"config for {src}: upsample_rates {list(vc.upsample_rates)} has "
                        f"{len(vc.upsample_rates)} entries but the weights have {len(vc.upsample_kernel_sizes)} "
                        f"upsampling layers")
    for rate, kernel in zip(vc.upsample_rates, vc.upsample_kernel_sizes):
        if not 1 <= rate <= kernel:
            raise OmniError(f"config for {src}: upsample rate {rate} does not fit a kernel of {kernel} (each rate "
                            f"must be 1 to its kernel size; else the padding is negative)")
    if len(vc.resblock_dilation_sizes) != len(vc.resblock_kernel_sizes) or any(
            len(d) != n_dil for d in vc.resblock_dilation_sizes):
        raise OmniError(f"config for {src}: resblock_dilation_sizes {[list(d) for d in vc.resblock_dilation_sizes]} "
                        f"does not match the weights ({len(vc.resblock_kernel_sizes)} kernels x {n_dil} dilations)")
    bad = [d for row in vc.resblock_dilation_sizes for d in row if not 1 <= d <= MAX_DILATION]
    if bad:
        raise OmniError(f"config for {src}: dilation {bad[0]} must be 1 to {MAX_DILATION}")


def build_linear(sd: StateDict, src: str) -> nn.Linear:
    require(sd, ("weight", "bias"), src)
    out_f, in_f = shape_of(sd, "weight", 2, src)
    layer = nn.Linear(in_f, out_f)
    load_strict(layer, sd, src)
    return layer


def read_ctc_chars(path: Path) -> dict[int, str]:
    meta = read_json(path)
    table = meta.get("char_to_idx")
    if not isinstance(table, dict):
        raise OmniError(f"{path}: missing 'char_to_idx'")
    chars: dict[int, str] = {}
    for c, i in table.items():  # "one", NaN, [0], 2.5, true or a repeated index would misread the head
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(table) or i in chars:
            raise OmniError(f"{path}: 'char_to_idx' maps {short_repr(c)} to {short_repr(i)}; each character needs "
                            f"its own integer index from 0 to {len(table) - 1}")
        chars[i] = c
    return chars


# ---------------------------------------------------------------- layouts

def load_components(ckpt_dir: str | Path) -> Components:
    """Discover and load everything under `ckpt_dir` (see the module docstring for accepted layouts)."""
    # Siblings and ../configs, ../../configs are found through the parents: '.', 'x/..' or a bare relative name
    # must name the real directories (lexically normalised: a symlinked run directory keeps its own siblings).
    d = Path(os.path.normpath(Path(ckpt_dir).absolute()))
    if not d.exists():
        raise OmniError(f"--ckpt_dir {d}: no such directory")
    if d.is_file():
        return load_weights_file(d)
    kind = dir_kind(d)
    if kind == "export":
        from utils.export_format import load_export  # the safetensors layout lives with its writer
        return load_export(d)
    comps = Components(root=d)
    if kind == "thinker":
        load_thinker_dir(comps, d)
        comps.searched.update({m: f"{d} (a thinker-only directory)" for m in ("vision", "audio", "talker")})
    elif kind == "omni":
        load_omni_dir(comps, d, d.parent)
    elif kind == "audio":
        load_audio_dir(comps, d)
        comps.searched["thinker"] = f"{d} (an audio-encoder directory: use it with --transcribe)"
    elif kind is None:
        omni = subdirs_of_kind(d, "omni")
        if len(omni) > 1:
            raise OmniError(f"--ckpt_dir {d}: several omni checkpoint directories ({', '.join(p.name for p in omni)})")
        if omni:
            load_omni_dir(comps, omni[0], d)
        else:
            thinker, where = locate_component("thinker", d, None)
            if thinker is None and (d / "checkpoints").is_dir() and d.name != "checkpoints":
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
    if not tok.is_file():
        raise OmniError(f"tokenizer {tok}: not found (the thinker directory must hold tokenizer.model)")
    set_tokenizer(comps, Tokenizer(tok))


def set_tokenizer(comps: Components, tok: Tokenizer) -> None:
    vocab = comps.thinker.cfg.vocab_size
    if tok.vocab_size > vocab:
        raise OmniError(f"tokenizer {tok.path}: {tok.vocab_size} pieces but the thinker embedding has only "
                        f"{vocab} rows")
    comps.tokenizer = tok


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
        if thinker_dir is None and (d / "tokenizer.model").is_file():
            thinker_dir = d
        if thinker_dir is None:
            raise OmniError(f"{path}: no thinker directory with tokenizer.model found (searched {where})")
    thinker_cfg = dict(cfg.get("thinker") or {})
    if "ctx_len" in cfg:
        thinker_cfg.setdefault("ctx_len", cfg["ctx_len"])
    comps.root = d
    sd = unwrap(obj, "thinker", path)
    tcfg, thinker_cfg_path = find_config(thinker_dir)
    comps.configs["thinker"] = config_label(thinker_cfg_path) + (f" + the omni config's overrides"
                                                                 if thinker_cfg else "")
    cfg_merged = {**tcfg, **thinker_cfg}
    comps.thinker = build_thinker(sd, cfg_merged, str(path))
    comps.ctx_len = comps.thinker.cfg.ctx_len
    comps.sources["thinker"] = str(path)
    tok = thinker_dir / "tokenizer.model"
    if not tok.is_file():
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


def check_projector_fit(comps: Components, src: str) -> None:
    if comps.vision is not None and comps.proj_v is not None and comps.proj_v.in_features != comps.vision.cfg.d_model:
        raise OmniError(f"{src}: proj_v expects {comps.proj_v.in_features} vision features but the vision encoder "
                        f"({comps.sources['vision']}) has d_model {comps.vision.cfg.d_model}")
    if comps.audio is not None and comps.proj_a is not None and comps.proj_a.in_features != comps.audio.cfg.d_model:
        raise OmniError(f"{src}: proj_a expects {comps.proj_a.in_features} audio features but the audio encoder "
                        f"({comps.sources['audio']}) has d_model {comps.audio.cfg.d_model}")


def load_siblings(comps: Components, base: Path, pointers: dict[str, Any]) -> None:
    """Vision, audio and talker directories beside the omni/thinker directory (or under a checkpoints root)."""
    loaders = {"vision": load_vision_dir, "audio": load_audio_dir, "talker": load_talker_dir}
    for kind, loader in loaders.items():
        found, where = locate_component(kind, base, pointers.get(kind))
        if found is None:
            comps.searched[kind] = where
        else:
            loader(comps, found)


def load_vision_dir(comps: Components, d: Path) -> None:
    path = weights_file(d, "vision")
    cfg, cfg_path = find_config(d)
    comps.configs["vision"] = config_label(cfg_path)
    comps.vision = build_vision(unwrap(read_torch_file(path), "vision_encoder", path), cfg, str(path))
    comps.sources["vision"] = str(path)


def load_audio_dir(comps: Components, d: Path) -> None:
    path = weights_file(d, "audio")
    obj = read_torch_file(path)
    cfg, cfg_path = find_config(d)
    comps.configs["audio"] = config_label(cfg_path)
    comps.audio = build_audio(unwrap(obj, "audio_encoder", path), cfg, str(path))
    comps.sources["audio"] = str(path)
    if "head" in obj:
        comps.ctc_head = build_linear(unwrap(obj, "ctc_head", path), f"{path} [head]")
        meta = next((d / n for n in CTC_MAP_NAMES if os.path.lexists(d / n)), d / CTC_MAP_NAMES[0])
        if os.path.lexists(meta):  # present but not a regular file (a FIFO) is an error, not "no map"
            comps.ctc_chars = read_ctc_chars(meta)
            if len(comps.ctc_chars) != comps.ctc_head.out_features:
                raise OmniError(f"{meta}: {len(comps.ctc_chars)} characters but the CTC head in {path} has "
                                f"{comps.ctc_head.out_features} outputs")
        else:
            comps.searched["ctc_chars"] = str(meta)


def load_talker_dir(comps: Components, d: Path) -> None:
    path = weights_file(d, "talker")
    obj = read_torch_file(path)
    cfg, cfg_path = find_config(d)
    comps.configs["talker"] = config_label(cfg_path)
    comps.talker = build_talker(unwrap(obj, "talker", path), cfg, str(path))
    comps.rvq = build_rvq(unwrap(obj, "rvq", path), f"{path} [rvq]")
    comps.sources["talker"] = str(path)


def child_dirs(parent: Path) -> list[Path]:
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))


def named_vocoder_file(d: Path) -> Path | None:
    """`vocoder.pt`/`hifigan.pt` (or their highest step) lying in `d`: never a `model.pt` of another kind."""
    for name in KIND_FILES["vocoder"]:
        path = find_weights_file(d, name)
        if path is not None and path.name != "model.pt":
            return path
    return None


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


def read_generation_config(d: Path) -> dict[str, Any]:
    path = d / "generation_config.json"
    return read_json(path) if os.path.lexists(path) else {}


def to_device(comps: Components, device: torch.device, dtype: torch.dtype | None) -> None:
    for m in comps.modules():
        m.eval()
        m.to(device=device, dtype=dtype) if dtype is not None else m.to(device)
