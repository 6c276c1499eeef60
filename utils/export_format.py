"""The merged safetensors export: one `model.safetensors` with prefixed component keys plus support files."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from utils.checkpoint import StateDict, find_weights_file, read_json, read_torch_file, split_prefixed, unwrap
from utils.errors import OmniError
from utils.tokenizer import Tokenizer

PREFIXES = ("thinker", "audio_encoder", "vision_encoder", "talker", "rvq", "proj_a", "proj_v", "ocr", "ctc_head",
            "vocoder")


def read_safetensors(path: Path) -> StateDict:
    """All tensors of a safetensors file (memory-mapped by the library; no pickle involved)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise OmniError(f"safetensors file {path}: unreadable or truncated ({exc})") from exc


def export_file(d: Path) -> Path:
    from utils.loading import EXPORT_NAMES
    for name in EXPORT_NAMES:
        if (d / name).is_file():
            return d / name
    raise OmniError(f"{d}: no merged export ({', '.join(EXPORT_NAMES)})")


def component_config(cfg: dict[str, Any], d: Path, key: str, configs_name: str) -> dict[str, Any]:
    """Nested object of config.json, else the copy in `configs/`."""
    if isinstance(cfg.get(key), dict):
        return cfg[key]
    copy = d / "configs" / configs_name
    return read_json(copy) if copy.is_file() else {}


def load_export(d: Path):
    """Build Components from a merged export directory."""
    from utils import loading as L

    path = export_file(d)
    sd = read_safetensors(path)
    cfg_path = d / "config.json"
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    comps = L.Components(root=d)
    parts = {p: split_prefixed(sd, p) for p in PREFIXES}
    unknown = sorted({k.split(".", 1)[0] for k in sd} - set(PREFIXES))
    if unknown:
        raise OmniError(f"{path}: unexpected key prefix(es) {', '.join(unknown)}")
    src = lambda p: f"{path} [{p}.*]"  # noqa: E731 - tiny label helper
    if not parts["thinker"]:
        raise OmniError(f"{path}: no thinker.* tensors")
    thinker_cfg = component_config(cfg, d, "thinker", "thinker_tiny.json")
    comps.thinker = L.build_thinker(parts["thinker"], thinker_cfg, src("thinker"))
    comps.ctx_len = comps.thinker.cfg.ctx_len
    comps.sources["thinker"] = str(path)
    tok = d / "tokenizer.model"
    if not tok.is_file():
        raise OmniError(f"tokenizer {tok}: not found (an export directory must hold tokenizer.model)")
    L.set_tokenizer(comps, Tokenizer(tok))
    if parts["vision_encoder"]:
        comps.vision = L.build_vision(parts["vision_encoder"], component_config(cfg, d, "vision", "vision_tiny.json"),
                                      src("vision_encoder"))
        comps.sources["vision"] = str(path)
    if parts["audio_encoder"]:
        comps.audio = L.build_audio(parts["audio_encoder"], component_config(cfg, d, "audio", "audio_enc_tiny.json"),
                                    src("audio_encoder"))
        comps.sources["audio"] = str(path)
    for name in ("proj_a", "proj_v"):
        if parts[name]:
            setattr(comps, name, L.build_linear(parts[name], src(name)))
    if parts["talker"]:
        comps.talker = L.build_talker(parts["talker"], component_config(cfg, d, "talker", "talker_tiny.json"),
                                      src("talker"))
        comps.sources["talker"] = str(path)
    if parts["rvq"]:
        comps.rvq = L.build_rvq(parts["rvq"], src("rvq"))
    if parts["ctc_head"]:
        comps.ctc_head = L.build_linear(parts["ctc_head"], src("ctc_head"))
        for name in L.CTC_MAP_NAMES:
            if (d / name).is_file():
                comps.ctc_chars = L.read_ctc_chars(d / name)
    vocoder_cfg = component_config(cfg, d, "vocoder", "vocoder_tiny.json")
    if parts["vocoder"]:
        comps.vocoder = L.build_vocoder(parts["vocoder"], vocoder_cfg, src("vocoder"))
        comps.sources["vocoder"] = str(path)
    else:
        for name in ("vocoder", "hifigan"):
            vpath = find_weights_file(d, name)
            if vpath and vpath.name != "model.pt":
                comps.vocoder = L.build_vocoder(unwrap(read_torch_file(vpath), "vocoder", vpath), vocoder_cfg,
                                                str(vpath))
                comps.sources["vocoder"] = str(vpath)
                break
    for kind, key in (("vision", "vision_encoder"), ("audio", "audio_encoder"), ("talker", "talker")):
        if not parts[key]:
            comps.searched[kind] = f"{path} (no {key}.* tensors)"
    L.check_projector_fit(comps, str(path))
    comps.generation_defaults = L.read_generation_config(d)
    return comps
