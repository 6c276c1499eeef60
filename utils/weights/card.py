"""The model card (`--info`, like `ollama show`): what was loaded from where, the architecture and the
generation defaults, from the loaded components alone."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils.base.options import SamplingOptions
from utils.weights.components import Components


def model_card(c: Components, dtype: torch.dtype, device: torch.device, opts: SamplingOptions) -> dict[str, Any]:
    """Components with parameter counts and the weights and config files they came from, dtype, context,
    vocabulary, decode mode and the generation defaults `opts` (library < generation_config.json)."""
    export = any(Path(src).suffix == ".safetensors" for src in c.sources.values())
    parts = {"thinker": [c.thinker, c.proj_a, c.proj_v], "vision": [c.vision], "audio": [c.audio, c.ctc_head],
             "talker": [c.talker, c.rvq], "vocoder": [c.vocoder], "ocr": [c.ocr]}
    components = {}
    for name, modules in parts.items():
        if modules[0] is None:
            continue
        config = c.configs.get(name) or (str(c.root / "config.json") if export else "none found (spec defaults)")
        if name == "thinker" and "omni" in c.configs:
            config = f"{config}; omni config {c.configs['omni']}"
        components[name] = {"parameters": sum(p.numel() for m in modules if m is not None for p in m.parameters()),
                            "weights": c.sources.get(name, "?"), "config": config}
    tc = c.thinker.cfg if c.thinker is not None else None
    card: dict[str, Any] = {
        "path": str(c.root), "format": "merged safetensors export" if export else "μOmni trainer checkpoints",
        "components": components, "parameters": sum(v["parameters"] for v in components.values()),
        "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "context_length": c.ctx_len, "decode_attention": opts.decode_attention,
        "generation_defaults": {"max_new_tokens": opts.max_new_tokens, "temperature": opts.temperature,
                                "top_k": opts.top_k, "top_p": opts.top_p,
                                "repetition_penalty": opts.repetition_penalty},
        "generation_config": c.generation_defaults or None,
        "missing": {k: v for k, v in c.searched.items()},
    }
    if tc is not None:
        b = tc.block
        card["vocabulary"] = {"embedding_rows": tc.vocab_size, "tokenizer_pieces": c.tokenizer.vocab_size,
                              "tokenizer": str(c.tokenizer.path)}
        card["thinker"] = {"layers": tc.n_layers, "d_model": b.d_model, "heads": b.n_heads,
                           "kv_heads": b.n_kv_heads, "ffn": b.ffn, "d_ff": b.d_ff, "experts": b.num_experts,
                           "rope_theta": tc.rope_theta}
    if c.ocr is not None:
        o = c.ocr.cfg
        card["ocr"] = {"img_size": o.vision.img_size, "patch": o.vision.patch, "vision_layers": o.vision.n_layers,
                       "vision_d_model": o.vision.d_model, "vision_heads": o.vision.n_heads,
                       "decoder_layers": o.n_layers,
                       "decoder_d_model": o.d_model, "decoder_heads": o.n_heads, "decoder_kv_heads": o.n_kv_heads,
                       "ffn": o.ffn, "vocabulary": o.vocab_size}
    return card
