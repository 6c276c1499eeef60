"""The merged safetensors export: one `model.safetensors` with prefixed component keys plus support files.

This module owns the layout on both sides: `merged_state_dict`/`export_config` (what export.py writes) and
`load_export` (what every CLI reads). Exports may store their float tensors in float32, float16 or bfloat16 and may
hold int8 Linear weights (see utils/weights/quant.py for that key convention); loading dequantizes int8 weights and leaves
the modules in the file's float dtype, recorded in `Components.dtype` so callers default to it.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from torch import nn

from utils.media.audio import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WIN_LENGTH
from utils.weights.checkpoint import (StateDict, read_json, read_torch_file, regular_file_size, split_prefixed,
                              strip_compile_prefix, unwrap)
from utils.base.errors import OmniError
from utils.media.image import IMAGE_SIZE
from utils.base.export_names import QUANT_METHOD
from utils.weights.quant import SCALE_SUFFIX, dequantize_state_dict, linear_weight_names, quantize_state_dict
from utils.weights.components import (CTC_MAP_NAMES, Components, build_audio, build_linear, build_ocr, build_rvq,
                              build_talker, build_thinker, build_vision, build_vocoder, check_projector_fit,
                              named_vocoder_file, ocr_shape_entries, ocr_vocabulary_near, read_ctc_metadata,
                              read_generation_config, set_ocr, set_tokenizer)
from utils.base.defaults import BOS_ID, DECODE_ATTENTION, DEFAULT_MAX_NEW_TOKENS, EOS_ID, PAD_ID
from utils.base.export_names import COMPONENT_PREFIXES, EXPORT_NAMES
from utils.media.tokenizer import Tokenizer

if TYPE_CHECKING:
    from models.layers import BlockConfig

PREFIXES = ("thinker", "audio_encoder", "vision_encoder", "talker", "rvq", "proj_a", "proj_v", "ocr", "ctc_head",
            "vocoder")
# Components whose nn.Linear weights `--quantize int8` stores as int8: the thinker, the encoders, talker.pt (talker
# and its RVQ codec's projections) and the OCR model. The small projectors, the CTC head and the convolutional
# vocoder stay float.
QUANTIZED_COMPONENTS = ("thinker", "audio", "vision", "talker", "rvq", "ocr")
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    """All tensors of a safetensors file and its metadata (no pickle involved). The header is validated by the
    library before any tensor is touched: a header longer than 100 MB, offsets past the end of the file or
    disagreeing with a tensor's shape and dtype are refused, so a header claiming terabytes allocates nothing."""
    path = Path(path)
    size = regular_file_size(path, "safetensors file")
    if size < 8:
        raise OmniError(f"safetensors file {path}: truncated ({size} bytes; even the 8-byte header length is "
                        f"missing)")
    check_safetensors_header(path)
    try:
        if utf8_name(path):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        # the library takes UTF-8 paths only: read the (header-checked) file ourselves
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        return safetensors_load(data), dict(meta)
    except Exception as exc:  # SafetensorError, OSError, ValueError, TypeError, MemoryError ... on bad data
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise OmniError(f"safetensors file {path}: unreadable, truncated or corrupt ({detail})") from exc


MAX_HEADER_BYTES = 16 << 20  # a μOmni export's header is a few tens of kB
MAX_TENSORS = 65536  # ... and names a few hundred tensors


def utf8_name(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_safetensors_header(path: Path) -> None:
    """Bound the header before the library parses it (it accepts 100 MB, and a million tensor entries take it
    most of a minute and gigabytes): at most MAX_HEADER_BYTES, at most MAX_TENSORS entries."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise OmniError(f"safetensors file {path}: header of {n:,} bytes, over the limit of {MAX_HEADER_BYTES:,} "
                            f"(header too large)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        return  # not JSON: the library's own message names the problem
    if isinstance(header, dict) and len(header) > MAX_TENSORS + 1:  # + the __metadata__ entry
        raise OmniError(f"safetensors file {path}: header lists {len(header) - 1:,} tensors, over the limit of "
                        f"{MAX_TENSORS:,}")


def export_file(d: Path) -> Path:
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
    return read_json(copy) if os.path.lexists(copy) else {}  # present but not a regular file: an error


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

    path = export_file(d)
    raw, meta = read_safetensors(path)
    cfg_path = d / "config.json"
    cfg = read_json(cfg_path) if os.path.lexists(cfg_path) else {}
    check_quantization(cfg, meta, path)
    comps = Components(root=d, dtype=stored_float_dtype(raw))
    sd = strip_compile_prefix(dequantize_state_dict(raw, str(path)))
    parts = {p: split_prefixed(sd, p) for p in PREFIXES}
    unknown = sorted({k.split(".", 1)[0] for k in sd} - set(PREFIXES))
    if unknown:
        raise OmniError(f"{path}: unexpected key prefix(es) {', '.join(unknown)}")
    src = lambda p: f"{path} [{p}.*]"  # noqa: E731 - tiny label helper
    if parts["ocr"]:
        load_export_ocr(comps, parts["ocr"], component_config(cfg, d, "ocr", "ocr_tiny.json"), path)
    if not parts["thinker"]:
        if comps.ocr is None:
            raise OmniError(f"{path}: no thinker.* tensors")
        return ocr_only_export(comps, path, d)
    thinker_cfg = component_config(cfg, d, "thinker", "thinker_tiny.json")
    comps.thinker = build_thinker(parts["thinker"], thinker_cfg, src("thinker"))
    comps.ctx_len = comps.thinker.cfg.ctx_len
    comps.sources["thinker"] = str(path)
    tok = d / "tokenizer.model"
    if not tok.is_file():
        raise OmniError(f"tokenizer {tok}: not found (an export directory must hold tokenizer.model)")
    set_tokenizer(comps, Tokenizer(tok))
    if parts["vision_encoder"]:
        comps.vision = build_vision(parts["vision_encoder"], component_config(cfg, d, "vision", "vision_tiny.json"),
                                      src("vision_encoder"))
        comps.sources["vision"] = str(path)
    if parts["audio_encoder"]:
        comps.audio = build_audio(parts["audio_encoder"], component_config(cfg, d, "audio", "audio_enc_tiny.json"),
                                    src("audio_encoder"))
        comps.sources["audio"] = str(path)
    for name in ("proj_a", "proj_v"):
        if parts[name]:
            setattr(comps, name, build_linear(parts[name], src(name)))
    if parts["talker"]:
        comps.talker = build_talker(parts["talker"], component_config(cfg, d, "talker", "talker_tiny.json"),
                                      src("talker"))
        comps.sources["talker"] = str(path)
    if parts["rvq"]:
        comps.rvq = build_rvq(parts["rvq"], src("rvq"))
    if parts["ctc_head"]:
        comps.ctc_head = build_linear(parts["ctc_head"], src("ctc_head"))
        for name in CTC_MAP_NAMES:
            if os.path.lexists(d / name):
                comps.ctc_chars, comps.language = read_ctc_metadata(d / name)
    vocoder_cfg = component_config(cfg, d, "vocoder", "vocoder_tiny.json")
    if parts["vocoder"]:
        comps.vocoder = build_vocoder(parts["vocoder"], vocoder_cfg, src("vocoder"))
        comps.sources["vocoder"] = str(path)
    elif (vpath := named_vocoder_file(d)) is not None:
        comps.vocoder = build_vocoder(unwrap(read_torch_file(vpath), "vocoder", vpath), vocoder_cfg, str(vpath))
        comps.sources["vocoder"] = str(vpath)
    for kind, key in (("vision", "vision_encoder"), ("audio", "audio_encoder"), ("talker", "talker"), ("ocr", "ocr")):
        if not parts[key]:
            comps.searched[kind] = f"{path} (no {key}.* tensors)"
    check_projector_fit(comps, str(path))
    comps.generation_defaults = read_generation_config(d)
    for m in comps.modules():  # a half-precision export runs in half precision unless the caller asks otherwise
        m.to(comps.dtype)
    return comps


def load_export_ocr(comps: Components, sd: StateDict, cfg: dict[str, Any], path: Path) -> None:
    """The export's OCR model (`ocr.*` of weights file `path`) with its vocabulary: ocr_metadata.json beside it,
    or the copy of the source ocr.pt that the reference export.py leaves there."""
    src = f"{path} [ocr.*]"
    model = build_ocr(sd, cfg, src)
    holder = path.parent / "ocr.pt"
    obj = read_torch_file(holder) if os.path.lexists(holder) else {}
    chars, vocab_src = ocr_vocabulary_near(path.parent, obj, holder)
    set_ocr(comps, model, chars, src, vocab_src)
    comps.sources["ocr"] = str(path)


def ocr_only_export(comps: Components, path: Path, d: Path) -> Components:
    """An export of the OCR model alone (what the reference export.py writes for an OCR run): no chat."""
    comps.searched.update({"thinker": f"{path} (no thinker.* tensors: an OCR-only export, use it with --ocr)",
                           **{k: f"{path} (an OCR-only export)" for k in ("vision", "audio", "talker")}})
    comps.generation_defaults = read_generation_config(d)
    comps.ocr.to(comps.dtype)
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
    if comps.ocr is not None:
        o = comps.ocr.cfg
        cfg["ocr"] = {**ocr_shape_entries(o), "vision_heads": o.vision.n_heads, "decoder_heads": o.n_heads}
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
    gc: dict[str, Any] = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
                          "max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False, "temperature": 1.0,
                          "top_p": 1.0, "repetition_penalty": 1.0, "decode_attention": DECODE_ATTENTION[0]}
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
    return {"model_type": "muomni", "components": {**{k: v is not None for k, v in present.items()}, "ocr": comps.ocr is not None},
            "weights": weights_name, "tokenizer": "tokenizer.model", "torch_dtype": dtype_name(dtype),
            "quantization": QUANT_METHOD if int8 else None}
