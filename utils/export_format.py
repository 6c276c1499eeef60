"""The merged safetensors export: one `model.safetensors` with prefixed component keys plus support files.

This module owns the layout on both sides: `merged_state_dict`/`export_config` (what export.py writes) and
`load_export` (what every CLI reads). Exports may store their float tensors in float32, float16 or bfloat16 and may
hold int8 Linear weights (see utils/quant.py for that key convention); loading dequantizes int8 weights and leaves
the modules in the file's float dtype, recorded in `Components.dtype` so callers default to it.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn

from utils.audio import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WIN_LENGTH
from utils.checkpoint import (StateDict, read_json, read_torch_file, split_prefixed,
                              strip_compile_prefix, unwrap)
from utils.errors import OmniError
from utils.image import IMAGE_SIZE
from utils.quant import QUANT_METHOD, SCALE_SUFFIX, dequantize_state_dict, linear_weight_names, quantize_state_dict
from utils.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

if TYPE_CHECKING:
    from models.layers import BlockConfig
    from utils.loading import Components

PREFIXES = ("thinker", "audio_encoder", "vision_encoder", "talker", "rvq", "proj_a", "proj_v", "ocr", "ctc_head",
            "vocoder")
# Components attribute -> key prefix in model.safetensors (spec §1), in the order they are written.
COMPONENT_PREFIXES = {"thinker": "thinker", "proj_a": "proj_a", "proj_v": "proj_v", "audio": "audio_encoder",
                      "ctc_head": "ctc_head", "vision": "vision_encoder", "talker": "talker", "rvq": "rvq",
                      "vocoder": "vocoder"}
# Components whose nn.Linear weights `--quantize int8` stores as int8: the thinker, the encoders and talker.pt (talker
# and its RVQ codec's projections). The small projectors, the CTC head and the convolutional vocoder stay float.
QUANTIZED_COMPONENTS = ("thinker", "audio", "vision", "talker", "rvq")
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    """All tensors of a safetensors file and its metadata (no pickle involved). The header is validated by the
    library before any tensor is touched: a header longer than 100 MB, offsets past the end of the file or
    disagreeing with a tensor's shape and dtype are refused, so a header claiming terabytes allocates nothing."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise OmniError(f"safetensors file {path}: cannot read ({exc.strerror or exc})") from exc
    if size < 8:
        raise OmniError(f"safetensors file {path}: truncated ({size} bytes; even the 8-byte header length is "
                        f"missing)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError, OSError, ValueError, TypeError, MemoryError ... on bad data
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise OmniError(f"safetensors file {path}: unreadable, truncated or corrupt ({detail})") from exc


def export_file(d: Path) -> Path:
    from utils.loading import EXPORT_NAMES
    for name in EXPORT_NAMES:
        if (d / name).is_file():
            return d / name
    raise OmniError(f"{d}: no merged export ({', '.join(EXPORT_NAMES)})")


def component_config(cfg: dict[str, Any], d: Path, key: str, configs_name: str) -> dict[str, Any]:
    """Nested object of config.json, else (thinker) the keys repeated at its top level, else the `configs/` copy."""
    if isinstance(cfg.get(key), dict):
        return cfg[key]
    if key == "thinker" and any(k in cfg for k in ("n_heads", "vocab_size", "d_model")):
        return {k: v for k, v in cfg.items() if not isinstance(v, (dict, list))}
    copy = d / "configs" / configs_name
    return read_json(copy) if copy.is_file() else {}


def stored_float_dtype(sd: StateDict) -> torch.dtype:
    """The one float dtype of the file's weights (int8 scales aside); float32 when they mix several."""
    found = {v.dtype for k, v in sd.items()
             if v.is_floating_point() and not (k.endswith(SCALE_SUFFIX) and k[:-len(SCALE_SUFFIX)] in sd)}
    return found.pop() if len(found) == 1 else torch.float32


def check_quantization(cfg: dict[str, Any], meta: dict[str, str], path: Path) -> None:
    """Refuse a quantization scheme this code does not know rather than misreading its tensors."""
    declared = {meta.get("quantization", "none")}
    if isinstance(cfg.get("quantization"), dict):
        declared.add(str(cfg["quantization"].get("method")))
    unknown = declared - {"none", QUANT_METHOD}
    if unknown:
        raise OmniError(f"{path}: quantization {', '.join(sorted(unknown))} is not supported (only {QUANT_METHOD})")


def load_export(d: Path) -> Components:
    """Build Components from a merged export directory: int8 weights dequantized, modules in the file's float
    dtype (recorded in `Components.dtype`)."""
    from utils import loading as L

    path = export_file(d)
    raw, meta = read_safetensors(path)
    cfg_path = d / "config.json"
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    check_quantization(cfg, meta, path)
    comps = L.Components(root=d, dtype=stored_float_dtype(raw))
    sd = strip_compile_prefix(dequantize_state_dict(raw, str(path)))
    parts = {p: split_prefixed(sd, p) for p in PREFIXES}
    unknown = sorted({k.split(".", 1)[0] for k in sd} - set(PREFIXES))
    if unknown:
        raise OmniError(f"{path}: unexpected key prefix(es) {', '.join(unknown)}")
    if parts["ocr"]:
        raise OmniError(f"{path}: holds ocr.* tensors, but this project has no OCR model to load them into")
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
    elif (vpath := L.named_vocoder_file(d)) is not None:
        comps.vocoder = L.build_vocoder(unwrap(read_torch_file(vpath), "vocoder", vpath), vocoder_cfg, str(vpath))
        comps.sources["vocoder"] = str(vpath)
    for kind, key in (("vision", "vision_encoder"), ("audio", "audio_encoder"), ("talker", "talker")):
        if not parts[key]:
            comps.searched[kind] = f"{path} (no {key}.* tensors)"
    L.check_projector_fit(comps, str(path))
    comps.generation_defaults = L.read_generation_config(d)
    for m in comps.modules():  # a half-precision export runs in half precision unless the caller asks otherwise
        m.to(comps.dtype)
    return comps


# ---------------------------------------------------------------- writer side (export.py)

def component_state_dict(name: str, module: nn.Module, dtype: torch.dtype, int8: bool) -> StateDict:
    """One component's tensors as stored: int8 Linear weights (+ float32 scales) when asked, other floats in
    `dtype`. Quantization starts from the source precision, not from an already rounded half copy."""
    sd = {k: v.detach() for k, v in module.state_dict().items()}
    quantized = set()
    if int8 and name in QUANTIZED_COMPONENTS:
        names = linear_weight_names(module)
        sd = quantize_state_dict(sd, names)
        quantized = set(names)
    out: StateDict = {}
    for k, v in sd.items():
        keep = k in quantized or (k.endswith(SCALE_SUFFIX) and k[:-len(SCALE_SUFFIX)] in quantized)
        if v.is_floating_point() and not keep:
            v = v.to(dtype)
            if not torch.isfinite(v).all():
                raise OmniError(f"{name} tensor {k} does not fit in {dtype_name(dtype)} (values overflow); "
                                f"use --dtype bfloat16 or float32")
        out[k] = v.contiguous()
    return out


def merged_state_dict(comps: Components, dtype: torch.dtype, int8: bool) -> dict[str, StateDict]:
    """{prefix: tensors} for every present component, in the spec's key layout."""
    merged = {}
    for attr, prefix in COMPONENT_PREFIXES.items():
        module = getattr(comps, attr)
        if module is not None:
            merged[prefix] = component_state_dict(attr, module, dtype, int8)
    return merged


def block_entries(b: BlockConfig) -> dict[str, Any]:
    """The Block architecture of a Thinker/Talker as config keys (every dimension the loader will rebuild)."""
    return {"d_model": b.d_model, "n_heads": b.n_heads, "n_kv_heads": b.n_kv_heads, "head_dim": b.d_model // b.n_heads,
            "d_ff": b.d_ff, "use_gqa": not b.fused_qkv, "use_swiglu": b.ffn == "swiglu", "ffn": b.ffn,
            "use_moe": b.num_experts > 0, "num_experts": b.num_experts,
            "num_experts_per_tok": b.num_experts_per_tok}


def export_config(comps: Components, dtype: torch.dtype, int8: bool, quantized_tensors: int) -> dict[str, Any]:
    """config.json: model_type muomni, one nested object per component, thinker keys repeated at top level."""
    t = comps.thinker.cfg
    thinker = {"vocab_size": t.vocab_size, "n_layers": t.n_layers, **block_entries(t.block),
               "rope_theta": t.rope_theta, "ctx_len": t.ctx_len}
    cfg: dict[str, Any] = {"model_type": "muomni", "architectures": ["ThinkerLM"], "torch_dtype": dtype_name(dtype),
                           "thinker": thinker}
    if comps.audio is not None:
        a = comps.audio.cfg
        cfg["audio"] = {"d_model": a.d_model, "n_layers": a.n_layers, "n_heads": a.n_heads, "d_ff": a.d_ff,
                        "downsample_time": a.downsample, "mel_bins": N_MELS, "sample_rate": SAMPLE_RATE,
                        "frame_hop": HOP_LENGTH, "frame_win": WIN_LENGTH}
        if comps.ctc_head is not None:
            cfg["audio"]["ctc_vocab_size"] = comps.ctc_head.out_features
    if comps.vision is not None:
        v = comps.vision.cfg
        cfg["vision"] = {"d_model": v.d_model, "n_layers": v.n_layers, "n_heads": v.n_heads, "d_ff": v.d_ff,
                         "patch": v.patch, "img_size": v.img_size}
    if comps.talker is not None:
        k = comps.talker.cfg
        cfg["talker"] = {"n_layers": k.n_layers, **block_entries(k.block), "rope_theta": k.rope_theta,
                         "codebook_size": k.codebook_size, "codebooks": len(comps.rvq.codebooks),
                         "code_dim": comps.rvq.codebooks[0].embedding_dim, "n_mels": comps.rvq.proj_out.out_features,
                         "frame_rate": 12.5}
    if comps.vocoder is not None:
        cfg["vocoder"] = {**asdict(comps.vocoder.cfg), "hop_length": comps.vocoder.cfg.hop_length,
                          "sample_rate": SAMPLE_RATE}
    if int8:
        cfg["quantization"] = {
            "method": QUANT_METHOD, "bits": 8, "symmetric": True, "granularity": "per_output_channel",
            "weight_dtype": "int8", "scale_key_suffix": SCALE_SUFFIX, "scale_dtype": "float32",
            "dequantize": "weight.float() * weight_scale[:, None]",
            "modules": "nn.Linear weights of " + ", ".join(COMPONENT_PREFIXES[c] for c in QUANTIZED_COMPONENTS),
            "quantized_tensors": quantized_tensors}
    cfg.update(thinker)
    return cfg


def generation_config(source: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: the μOmni special ids, greedy causal decoding defaults, and the source directory's
    own settings (decode_attention among them) when it had a generation_config.json."""
    from utils.generation import SamplingOptions
    opts = SamplingOptions()
    gc: dict[str, Any] = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
                          "max_new_tokens": opts.max_new_tokens, "do_sample": False, "temperature": 1.0,
                          "top_p": opts.top_p, "repetition_penalty": opts.repetition_penalty,
                          "decode_attention": opts.decode_attention}
    for key in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                "decode_attention"):
        if key in source:
            gc[key] = source[key]
    return gc


def preprocessor_config(comps: Components) -> dict[str, Any]:
    """preprocessor_config.json: the image and audio front ends of spec §3."""
    size = comps.vision.cfg.img_size if comps.vision is not None else IMAGE_SIZE
    return {"image_processor": {"size": {"height": size, "width": size}, "resample": "bilinear",
                                "rescale_factor": 1 / 255, "do_normalize": False, "channel_order": "RGB"},
            "audio_processor": {"sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop_length": HOP_LENGTH,
                                "win_length": WIN_LENGTH, "n_mels": N_MELS, "f_min": 0.0, "f_max": SAMPLE_RATE / 2,
                                "mel_scale": "htk", "power": 2.0, "log": False, "center": True,
                                "pad_mode": "reflect"}}


def model_info(comps: Components, weights_name: str, dtype: torch.dtype, int8: bool) -> dict[str, Any]:
    """model_info.json: which components the export holds and how its weights are stored."""
    present = {"thinker": comps.thinker, "audio_encoder": comps.audio, "vision_encoder": comps.vision,
               "talker": comps.talker, "vocoder": comps.vocoder, "ctc_head": comps.ctc_head}
    return {"model_type": "muomni", "components": {**{k: v is not None for k, v in present.items()}, "ocr": False},
            "weights": weights_name, "tokenizer": "tokenizer.model", "torch_dtype": dtype_name(dtype),
            "quantization": QUANT_METHOD if int8 else None}
