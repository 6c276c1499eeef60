"""The loaded μOmni networks (`Components`) and how each is built from a state dict and its config.

Both ways of storing a model use these builders: the trainers' checkpoint directories (utils.weights.loading finds them)
and the merged safetensors export (utils.weights.export_format reads it). A builder reads the architecture off the
tensor shapes, takes head counts and the like from the config, checks that they agree, and loads strictly: a
missing, unexpected or mis-shaped tensor is an OmniError naming the file and key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.audio import AudioEncoderConfig, AudioEncoderTiny
from models.ocr import SPECIAL_TOKENS, OCRConfig, OCRModel
from models.talker import RVQ, TalkerConfig, TalkerTiny
from models.thinker import ThinkerConfig, ThinkerLM
from models.vision import ViTConfig, ViTTiny
from models.vocoder import HiFiGANConfig, HiFiGANGenerator
from utils.weights.checkpoint import (StateDict, check_config_agrees, config_float, config_int, find_weights_file,
                              load_strict, read_json, require, short_repr)
from utils.base.errors import OmniError
from utils.media.tokenizer import Tokenizer

VOCODER_NAMES = ("vocoder", "hifigan")  # HiFi-GAN weights files: vocoder.pt, or the older hifigan.pt (spec §1)

CTC_MAP_NAMES = ("audio_enc_metadata.json", "ctc_vocab.json")

OCR_METADATA = "ocr_metadata.json"  # a finished OCR run's only vocabulary (MUOMNI_OCR §1)


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
    language: str | None = None  # what the CTC head transcribes, when audio_enc_metadata.json says ("en")
    talker: TalkerTiny | None = None
    rvq: RVQ | None = None
    vocoder: HiFiGANGenerator | None = None
    ocr: OCRModel | None = None
    ocr_chars: list[str] | None = None  # the OCR vocabulary: id -> character (ids 0-3 the special tokens)
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32  # float dtype the weights were stored in: the default compute dtype
    sources: dict[str, str] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)  # component -> the config file its settings came from
    searched: dict[str, str] = field(default_factory=dict)
    root: Path = Path(".")

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.thinker, self.vision, self.proj_v, self.audio, self.proj_a, self.ctc_head,
                            self.talker, self.rvq, self.vocoder, self.ocr) if m is not None]


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
    check_rotary_heads(tc.d_model, tc.block.n_heads, src)
    check_attention_split(tc.block, sd, src)
    model = ThinkerLM(tc)
    load_strict(model, sd, src)
    return model


# What the builders read from a config, by the check each goes through; COMPONENT_KEYS name the nested objects
# loading reads a component's settings from (an omni config's thinker overrides, an export's config.json).
CONFIG_INTS = ("n_heads", "ctx_len", "num_experts_per_tok")
CONFIG_FLOATS = ("rope_theta",)
CONFIG_INT_LISTS = {"resblock_dilation_sizes": 2, "upsample_rates": 1}
COMPONENT_KEYS = ("thinker", "audio", "vision", "talker", "vocoder")


def check_config(cfg: dict[str, Any], src: str) -> None:
    """Every setting a builder would read from `cfg` or its per-component objects, checked as the builder checks
    it: a config copied somewhere without building from it (export.py's configs/) is held to the rules loading
    applies, so what is written can be loaded again."""
    for part in [cfg] + [cfg[k] for k in COMPONENT_KEYS if isinstance(cfg.get(k), dict)]:
        for key in CONFIG_INTS:
            if key in part:
                config_int(part, key, 1, src)
        for key in CONFIG_FLOATS:
            if key in part:
                config_float(part, key, 1.0, src)
        for key, depth in CONFIG_INT_LISTS.items():
            int_lists(part, key, depth, src)


def check_head_split(d_model: int, n_heads: int, src: str) -> None:
    if n_heads > d_model or d_model % n_heads:
        raise OmniError(f"{src}: n_heads {n_heads} does not divide d_model {d_model}")


def check_rotary_heads(d_model: int, n_heads: int, src: str) -> None:
    """Rotary positions turn pairs of a head's dimensions: an odd head dimension cannot take them (the torch step
    would fail on the rotary table's shape, the C step refuses it)."""
    if (d_model // n_heads) % 2:
        raise OmniError(f"{src}: d_model {d_model} over n_heads {n_heads} gives heads of {d_model // n_heads} "
                        f"dimensions; rotary positions need an even head dimension")


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


def ocr_shape_entries(oc: OCRConfig) -> dict[str, Any]:
    """The OCR config keys (MUOMNI_OCR §1) that the tensor shapes decide, as the weights have them: a config
    saying otherwise is an error. (The head counts are not in the shapes: they are read from the config.)"""
    v = oc.vision
    return {"vocab_size": oc.vocab_size, "decoder_kv_heads": oc.n_kv_heads, "img_size": v.img_size, "patch": v.patch, "vision_d_model": v.d_model, "vision_layers": v.n_layers,
            "vision_d_ff": v.d_ff, "decoder_d_model": oc.d_model, "decoder_layers": oc.n_layers,
            "decoder_d_ff": oc.d_ff, "use_gqa": not oc.fused_qkv, "use_swiglu": oc.ffn == "swiglu"}


def build_ocr(sd: StateDict, cfg: dict[str, Any], src: str) -> OCRModel:
    """The OCR model (ViT + character decoder); `vision_heads` and `decoder_heads` from the config (defaults 2, 4)."""
    require(sd, ("vision_encoder.proj.weight", "vision_encoder.pos", "decoder.char_embed.weight",
                 "decoder.head.weight", "decoder.blocks.0.norm1.weight"), src)
    shape_of(sd, "vision_encoder.proj.weight", 4, src)
    shape_of(sd, "vision_encoder.pos", 3, src)
    d = shape_of(sd, "decoder.char_embed.weight", 2, src)[1]
    vision_heads = config_int(cfg, "vision_heads", 2, src)
    decoder_heads = config_int(cfg, "decoder_heads", 4, src)
    check_head_split(sd["vision_encoder.proj.weight"].shape[0], vision_heads, src)
    check_head_split(d, decoder_heads, src)
    check_rotary_heads(d, decoder_heads, src)
    oc = read_architecture(lambda: OCRConfig.from_state_dict(sd, vision_heads, decoder_heads), src)
    check_config_agrees(cfg, ocr_shape_entries(oc), src, src)
    if oc.n_kv_heads < 1 or oc.n_heads % oc.n_kv_heads:
        raise OmniError(f"{src}: decoder_heads {oc.n_heads} is not a multiple of the {oc.n_kv_heads} KV heads "
                        f"implied by the shape of decoder.blocks.0.self_attn.k.weight")
    model = OCRModel(oc)
    load_strict(model, sd, src)
    return model


def ocr_vocabulary(obj: dict[str, Any], src: str) -> list[str] | None:
    """The characters by id from a vocabulary holder (ocr_metadata.json, or an ocr.pt that has one): its
    `idx_to_char` (int keys, or the strings JSON and resumed runs leave), else its `char_to_idx` inverted; both
    present must agree. None when it holds neither."""
    tables = []
    if "idx_to_char" in obj:
        table = obj["idx_to_char"]
        if not isinstance(table, dict):
            raise OmniError(f"{src}: 'idx_to_char' must be an object, found {type(table).__name__}")
        pairs = []
        for key, char in table.items():
            if isinstance(key, str) and key.isdigit() and key.isascii():
                key = int(key)
            pairs.append((key, char))
        tables.append(("idx_to_char", pairs))
    if "char_to_idx" in obj:
        table = obj["char_to_idx"]
        if not isinstance(table, dict):
            raise OmniError(f"{src}: 'char_to_idx' must be an object, found {type(table).__name__}")
        tables.append(("char_to_idx", [(i, c) for c, i in table.items()]))
    found = []
    for name, pairs in tables:
        chars: dict[int, str] = {}
        for i, c in pairs:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(pairs) or i in chars \
                    or not isinstance(c, str) or not c:
                raise OmniError(f"{src}: '{name}' pairs {short_repr(i)} with {short_repr(c)}; each character needs "
                                f"its own integer id from 0 to {len(pairs) - 1}")
            chars[i] = c
        found.append([chars[i] for i in range(len(pairs))])
    if len(found) == 2 and found[0] != found[1]:
        raise OmniError(f"{src}: 'idx_to_char' and 'char_to_idx' disagree")
    if not found:
        return None
    size = obj.get("vocab_size", len(found[0]))
    if size != len(found[0]):
        raise OmniError(f"{src}: 'vocab_size' is {short_repr(size)} but the vocabulary has {len(found[0])} entries")
    if tuple(found[0][:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise OmniError(f"{src}: the OCR vocabulary must start with {', '.join(SPECIAL_TOKENS)} (ids 0-3), found "
                        f"{short_repr(found[0][:len(SPECIAL_TOKENS)])}")
    return found[0]


def ocr_vocabulary_near(d: Path, obj: dict[str, Any], path: Path) -> tuple[list[str], str]:
    """The OCR vocabulary for weights read from `path` (its contents `obj`: {} when there is no such file) in
    directory `d`: ocr_metadata.json there, or the one inside `path`; both present must agree. Returns the
    characters and where they came from."""
    meta = d / OCR_METADATA
    found = []
    if os.path.lexists(meta):  # present but not a regular file (a FIFO) is an error, not "no vocabulary"
        chars = ocr_vocabulary(read_json(meta), str(meta))
        if chars is None:
            raise OmniError(f"{meta}: holds no OCR vocabulary (no 'idx_to_char' or 'char_to_idx')")
        found.append((chars, str(meta)))
    inside = ocr_vocabulary(obj, str(path))
    if inside is not None:
        found.append((inside, str(path)))
    if not found:
        raise OmniError(f"OCR weights {path}: no vocabulary ({meta} not found, and {path} holds no 'idx_to_char' "
                        f"or 'char_to_idx')")
    if len(found) == 2 and found[0][0] != found[1][0]:
        raise OmniError(f"the OCR vocabularies of {found[0][1]} and {found[1][1]} disagree")
    return found[0]


def set_ocr(comps: Components, model: OCRModel, chars: list[str], src: str, vocab_src: str) -> None:
    """Install the OCR model with its vocabulary, which must have one character per row of the head."""
    if len(chars) != model.cfg.vocab_size:
        raise OmniError(f"{vocab_src}: the OCR vocabulary has {len(chars)} entries but the decoder head in {src} "
                        f"has {model.cfg.vocab_size} rows")
    comps.ocr, comps.ocr_chars = model, chars


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
    check_rotary_heads(tc.block.d_model, tc.block.n_heads, src)
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


def read_ctc_metadata(path: Path) -> tuple[dict[int, str], str | None]:
    """The CTC head's character map (`char_to_idx`) and, when the file names it, its `language` (a code such as
    "en"; the μOmni trainers do not write one, tools/train_demo.py does)."""
    meta = read_json(path)
    language = meta.get("language")
    if language is not None and (not isinstance(language, str) or not language.strip()):
        raise OmniError(f"{path}: 'language' must be a language code such as \"en\", found {short_repr(language)}")
    table = meta.get("char_to_idx")
    if not isinstance(table, dict):
        raise OmniError(f"{path}: missing 'char_to_idx'")
    chars: dict[int, str] = {}
    for c, i in table.items():  # "one", NaN, [0], 2.5, true or a repeated index would misread the head
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(table) or i in chars:
            raise OmniError(f"{path}: 'char_to_idx' maps {short_repr(c)} to {short_repr(i)}; each character needs "
                            f"its own integer index from 0 to {len(table) - 1}")
        chars[i] = c
    return chars, language


def set_tokenizer(comps: Components, tok: Tokenizer) -> None:
    vocab = comps.thinker.cfg.vocab_size
    if tok.vocab_size > vocab:
        raise OmniError(f"tokenizer {tok.path}: {tok.vocab_size} pieces but the thinker embedding has only "
                        f"{vocab} rows")
    comps.tokenizer = tok


def check_projector_fit(comps: Components, src: str) -> None:
    if comps.vision is not None and comps.proj_v is not None and comps.proj_v.in_features != comps.vision.cfg.d_model:
        raise OmniError(f"{src}: proj_v expects {comps.proj_v.in_features} vision features but the vision encoder "
                        f"({comps.sources['vision']}) has d_model {comps.vision.cfg.d_model}")
    if comps.audio is not None and comps.proj_a is not None and comps.proj_a.in_features != comps.audio.cfg.d_model:
        raise OmniError(f"{src}: proj_a expects {comps.proj_a.in_features} audio features but the audio encoder "
                        f"({comps.sources['audio']}) has d_model {comps.audio.cfg.d_model}")


def read_generation_config(d: Path) -> dict[str, Any]:
    path = d / "generation_config.json"
    return read_json(path) if os.path.lexists(path) else {}


def to_device(comps: Components, device: torch.device, dtype: torch.dtype | None) -> None:
    for m in comps.modules():
        m.eval()
        m.to(device=device, dtype=dtype) if dtype is not None else m.to(device)


def named_vocoder_file(d: Path) -> Path | None:
    """`vocoder.pt`/`hifigan.pt` (or their highest step) lying in `d`: never a `model.pt` of another kind."""
    for name in VOCODER_NAMES:
        path = find_weights_file(d, name)
        if path is not None and path.name != "model.pt":
            return path
    return None
