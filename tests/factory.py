"""Tiny random μOmni checkpoint trees in the trainers' layout, built with the project's own modules.

Self-contained tests use these instead of ../shared: every file is written the way the μOmni trainers
write it (wrapper keys, configs with `save_dir`, tokenizer beside the thinker)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import sentencepiece as spm
import torch

from models.audio import AudioEncoderConfig, AudioEncoderTiny
from models.layers import BlockConfig
from models.ocr import SPECIAL_TOKENS, OCRConfig, OCRModel
from models.talker import RVQ, TalkerConfig, TalkerTiny
from models.thinker import ThinkerConfig, ThinkerLM
from models.vision import ViTConfig, ViTTiny
from models.vocoder import HiFiGANConfig, HiFiGANGenerator

CORPUS = ("a red circle . a blue square . a green triangle . what do you see ? what did you hear ? "
          "describe what you see concisely . what is one plus two ? the answer is three . once upon a time "
          "there was a small yellow purple orange shape on a white background . hello world how are you")
CHARS = ["<BLANK>", "<UNK>", " "] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["'", ".", ",", "?"]

_TOKENIZER_CACHE: dict[int, bytes] = {}


def make_tokenizer(path: Path, vocab_size: int = 120) -> None:
    """A SentencePiece BPE model with unk 0, bos 1, eos 2 and no pad piece (cached per vocab size)."""
    if vocab_size not in _TOKENIZER_CACHE:
        work = path.parent / f".spm_{vocab_size}"
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / "corpus.txt"
        corpus.write_text("\n".join([CORPUS] * 20 + CORPUS.split(" . ")), encoding="utf-8")
        spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(work / "tok"), vocab_size=vocab_size,
                                       model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                       hard_vocab_limit=False, minloglevel=2)
        _TOKENIZER_CACHE[vocab_size] = (work / "tok.model").read_bytes()
        shutil.rmtree(work)
    path.write_bytes(_TOKENIZER_CACHE[vocab_size])


def thinker_config(attention: str = "gqa", ffn: str = "swiglu", moe: bool = False, d_model: int = 32,
                   n_layers: int = 2, n_heads: int = 4, vocab: int = 160, ctx_len: int = 128,
                   rope_theta: float = 10000.0, top_k: int = 2) -> ThinkerConfig:
    kv = n_heads if attention == "mha" else max(1, n_heads // 2)
    block = BlockConfig(d_model=d_model, n_heads=n_heads, n_kv_heads=kv, d_ff=2 * d_model,
                        fused_qkv=attention == "mha", ffn=ffn, num_experts=4 if moe else 0, num_experts_per_tok=top_k)
    return ThinkerConfig(vocab_size=vocab, n_layers=n_layers, block=block, rope_theta=rope_theta, ctx_len=ctx_len)


def random_init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic non-trivial weights (norm weights too, so a mis-wired norm changes the outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    return module.eval()


def compiled_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as torch.compile leaves them: `_orig_mod.` segments inside and in front."""
    return {("_orig_mod." + k if i % 2 else k.replace(".", "._orig_mod.", 1)): v for i, (k, v) in enumerate(sd.items())}


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def make_tree(root: Path, attention: str = "gqa", ffn: str = "swiglu", moe: bool = False, audio_downsample: int = 8,
              seed: int = 0, vocab: int = 160, ctx_len: int = 128, thinker_heads: int = 4,
              names: dict[str, str] | None = None, with_vocoder: bool = True) -> Path:
    """Write configs/ and the component dirs (thinker_tiny, omni_sft_tiny, audio_enc_tiny, vision_tiny,
    talker_tiny, vocoder_tiny — renamable through `names`) under `root`; returns `root`."""
    n = {"thinker": "thinker_tiny", "omni": "omni_sft_tiny", "audio": "audio_enc_tiny", "vision": "vision_tiny",
         "talker": "talker_tiny", "vocoder": "vocoder_tiny", **(names or {})}
    root.mkdir(parents=True, exist_ok=True)
    tcfg = thinker_config(attention, ffn, moe, vocab=vocab, ctx_len=ctx_len, n_heads=thinker_heads)
    thinker = random_init(ThinkerLM(tcfg), seed)
    thinker_json = {"vocab_size": vocab, "n_layers": tcfg.n_layers, "d_model": tcfg.d_model, "n_heads": thinker_heads,
                    "d_ff": tcfg.block.d_ff, "rope_theta": tcfg.rope_theta, "ctx_len": ctx_len,
                    "use_gqa": attention == "gqa", "use_swiglu": ffn == "swiglu", "use_moe": moe,
                    "num_experts": 4, "num_experts_per_tok": 2}
    (root / n["thinker"]).mkdir(exist_ok=True)
    torch.save({"model": thinker.state_dict(), "optimizer": {"state": {}, "param_groups": []}},
               root / n["thinker"] / "thinker.pt")
    make_tokenizer(root / n["thinker"] / "tokenizer.model")
    write_json(root / "configs" / "thinker_tiny.json", {**thinker_json, "save_dir": f"checkpoints/{n['thinker']}"})

    vit = random_init(ViTTiny(ViTConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32)), seed + 1)
    (root / n["vision"]).mkdir(exist_ok=True)
    torch.save({"vit": vit.state_dict(), "img_proj": torch.zeros(4, 16), "text_proj": torch.zeros(4, 4)},
               root / n["vision"] / "vision.pt")
    write_json(root / "configs" / "vision_tiny.json",
               {"img_size": 224, "patch": 16, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32,
                "save_dir": f"checkpoints/{n['vision']}"})

    enc = random_init(AudioEncoderTiny(AudioEncoderConfig(d_model=24, n_layers=1, n_heads=3, d_ff=48,
                                                          downsample=audio_downsample)), seed + 2)
    head = random_init(torch.nn.Linear(24, len(CHARS)), seed + 3)
    (root / n["audio"]).mkdir(exist_ok=True)
    torch.save({"enc": enc.state_dict(), "head": head.state_dict()}, root / n["audio"] / "audio_enc.pt")
    write_json(root / n["audio"] / "audio_enc_metadata.json",
               {"char_to_idx": {c: i for i, c in enumerate(CHARS)}, "vocab_size": len(CHARS)})
    write_json(root / "configs" / "audio_enc_tiny.json",
               {"d_model": 24, "n_layers": 1, "n_heads": 3, "d_ff": 48, "downsample_time": audio_downsample,
                "save_dir": f"checkpoints/{n['audio']}"})

    talker = random_init(TalkerTiny(TalkerConfig(codebook_size=128, n_layers=1, block=BlockConfig(
        d_model=24, n_heads=3, n_kv_heads=1, d_ff=48))), seed + 4)
    rvq = random_init(RVQ(128, 16, 128, 2), seed + 5)
    (root / n["talker"]).mkdir(exist_ok=True)
    torch.save({"rvq": rvq.state_dict(), "talker": talker.state_dict()}, root / n["talker"] / "talker.pt")
    write_json(root / "configs" / "talker_tiny.json",
               {"d_model": 24, "n_layers": 1, "n_heads": 3, "d_ff": 48, "rope_theta": 10000.0,
                "save_dir": f"checkpoints/{n['talker']}"})

    if with_vocoder:
        voc = random_init(HiFiGANGenerator(HiFiGANConfig(upsample_initial_channel=16)), seed + 6)
        (root / n["vocoder"]).mkdir(exist_ok=True)
        torch.save({"generator": voc.state_dict()}, root / n["vocoder"] / "vocoder.pt")
        write_json(root / "configs" / "vocoder_tiny.json",
                   {"upsample_initial_channel": 16, "resblock_kernel_sizes": [3, 5, 7],
                    "resblock_dilation_sizes": [[1, 2], [1, 2], [1, 2]], "save_dir": f"checkpoints/{n['vocoder']}"})

    proj_a = random_init(torch.nn.Linear(24, tcfg.d_model), seed + 7)
    proj_v = random_init(torch.nn.Linear(16, tcfg.d_model), seed + 8)
    (root / n["omni"]).mkdir(exist_ok=True)
    torch.save({"thinker": thinker.state_dict(), "proj_a": proj_a.state_dict(), "proj_v": proj_v.state_dict()},
               root / n["omni"] / "omni.pt")
    write_json(root / "configs" / "omni_sft_tiny.json",
               {"thinker_ckpt": f"checkpoints/{n['thinker']}", "audio_ckpt": f"checkpoints/{n['audio']}",
                "vision_ckpt": f"checkpoints/{n['vision']}", "talker_ckpt": f"checkpoints/{n['talker']}",
                "ctx_len": ctx_len, "thinker": thinker_json, "prompt": "You are an omni assistant.",
                "save_dir": f"checkpoints/{n['omni']}"})
    return root


OCR_CHARS = list(SPECIAL_TOKENS) + list(" 0123456789abcdefghijklmnopqrstuvwxyz")


def ocr_config(attention: str = "gqa", ffn: str = "gelu", img_size: int = 64, d_model: int = 32,
               n_heads: int = 4) -> OCRConfig:
    """A small OCR model: GQA (KV heads h // 2, as train_ocr.py makes them) or MHA, GELU or SwiGLU."""
    return OCRConfig(vision=ViTConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, patch=16, img_size=img_size),
                     vocab_size=len(OCR_CHARS), d_model=d_model, n_layers=2, n_heads=n_heads,
                     n_kv_heads=n_heads if attention == "mha" else max(1, n_heads // 2), d_ff=2 * d_model,
                     fused_qkv=attention == "mha", ffn=ffn)


def make_ocr_dir(d: Path, cfg: OCRConfig, seed: int = 0, vocab_inside: bool = False) -> Path:
    """An `ocr_tiny`-style directory as train_ocr.py leaves it: ocr.pt ({"model"}; with `vocab_inside` also the
    int-keyed vocabulary, else ocr_metadata.json with string keys) and configs/ocr_tiny.json beside it."""
    model = random_init(OCRModel(cfg), seed)
    d.mkdir(parents=True, exist_ok=True)
    obj: dict = {"model": model.state_dict()}
    vocab = {"char_to_idx": {c: i for i, c in enumerate(OCR_CHARS)}, "idx_to_char": dict(enumerate(OCR_CHARS))}
    if vocab_inside:
        obj.update(vocab)
    else:
        write_json(d / "ocr_metadata.json", {"step": 10, "epoch": 1, "char_to_idx": vocab["char_to_idx"],
                                             "idx_to_char": {str(i): c for i, c in vocab["idx_to_char"].items()},
                                             "vocab_size": len(OCR_CHARS), "max_text_length": 12})
    torch.save(obj, d / "ocr.pt")
    v = cfg.vision
    write_json(d.parent / "configs" / f"{d.name}.json",
               {"save_dir": f"checkpoints/{d.name}", "img_size": v.img_size, "patch": v.patch,
                "vision_d_model": v.d_model, "vision_layers": v.n_layers, "vision_heads": v.n_heads,
                "vision_d_ff": v.d_ff, "decoder_d_model": cfg.d_model, "decoder_layers": cfg.n_layers,
                "decoder_heads": cfg.n_heads, "decoder_d_ff": cfg.d_ff, "use_gqa": not cfg.fused_qkv,
                "use_swiglu": cfg.ffn == "swiglu", "dropout": 0.1, "rope_theta": 10000.0})
    return d


# ---------------------------------------------------------------- in-memory twins and merged exports

def reference_modules(attention: str = "gqa", ffn: str = "swiglu", moe: bool = False, audio_downsample: int = 8,
                      seed: int = 0, vocab: int = 160, ctx_len: int = 128, thinker_heads: int = 4,
                      rope_theta: float = 10000.0, top_k: int = 2, vision_heads: int = 2, audio_heads: int = 3,
                      talker_heads: int = 3, talker_rope_theta: float = 10000.0) -> dict[str, torch.nn.Module]:
    """The modules `make_tree` writes for the same arguments, built in memory with explicit configurations
    (no loader involved): what a correct loader must reproduce. Heads, rope_theta and top-k only change the
    computation, not the weights, so they can differ from what the tree's configs say."""
    tcfg = thinker_config(attention, ffn, moe, vocab=vocab, ctx_len=ctx_len, n_heads=thinker_heads,
                          rope_theta=rope_theta, top_k=top_k)
    tk_kv = max(1, 8 // (24 // talker_heads))  # the factory talker's k projection has 8 rows (1 KV head of 8)
    return {
        "thinker": random_init(ThinkerLM(tcfg), seed),
        "vision": random_init(ViTTiny(ViTConfig(d_model=16, n_layers=1, n_heads=vision_heads, d_ff=32)), seed + 1),
        "audio": random_init(AudioEncoderTiny(AudioEncoderConfig(d_model=24, n_layers=1, n_heads=audio_heads, d_ff=48,
                                                                 downsample=audio_downsample)), seed + 2),
        "ctc_head": random_init(torch.nn.Linear(24, len(CHARS)), seed + 3),
        "talker": random_init(TalkerTiny(TalkerConfig(codebook_size=128, n_layers=1, rope_theta=talker_rope_theta,
                                                      block=BlockConfig(d_model=24, n_heads=talker_heads,
                                                                        n_kv_heads=tk_kv, d_ff=48))), seed + 4),
        "rvq": random_init(RVQ(128, 16, 128, 2), seed + 5),
        "vocoder": random_init(HiFiGANGenerator(HiFiGANConfig(upsample_initial_channel=16)), seed + 6),
        "proj_a": random_init(torch.nn.Linear(24, tcfg.d_model), seed + 7),
        "proj_v": random_init(torch.nn.Linear(16, tcfg.d_model), seed + 8),
    }


def make_export(tree: Path, out: Path, name: str = "model.safetensors", compiled: bool = False,
                with_vocoder: bool = True) -> Path:
    """A merged export of a `make_tree` tree, written independently of the project's export.py: the component
    state dicts under the spec's prefixes in one safetensors file, plus config.json (nested component objects and
    the thinker keys at top level), tokenizer.model, generation_config.json, model_info.json and vocoder.pt.
    `compiled` puts `_orig_mod.` segments inside the keys, as a torch.compile'd trainer would leave them."""
    from safetensors.torch import save_file

    def load(path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)

    def configs_for(key: str) -> dict:
        for p in (tree / "configs").glob("*.json"):
            cfg = json.loads(p.read_text())
            if cfg.get("save_dir", "").endswith(f"/{key}") or p.stem == key:
                return {k: v for k, v in cfg.items() if k != "save_dir"}
        return {}

    omni, audio = load(tree / "omni_sft_tiny" / "omni.pt"), load(tree / "audio_enc_tiny" / "audio_enc.pt")
    talker = load(tree / "talker_tiny" / "talker.pt")
    parts = {"thinker": omni["thinker"], "proj_a": omni["proj_a"], "proj_v": omni["proj_v"],
             "audio_encoder": audio["enc"], "ctc_head": audio["head"],
             "vision_encoder": load(tree / "vision_tiny" / "vision.pt")["vit"],
             "talker": talker["talker"], "rvq": talker["rvq"]}
    merged = {}
    for prefix, sd in parts.items():
        sd = compiled_keys(sd) if compiled else sd
        merged.update({f"{prefix}.{k}": v.contiguous() for k, v in sd.items()})
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / name), metadata={"format": "pt"})
    thinker = configs_for("thinker_tiny")
    write_json(out / "config.json", {"model_type": "muomni", "thinker": thinker, "audio": configs_for("audio_enc_tiny"),
                                     "vision": configs_for("vision_tiny"), "talker": configs_for("talker_tiny"),
                                     **thinker})
    shutil.copy(tree / "thinker_tiny" / "tokenizer.model", out / "tokenizer.model")
    shutil.copy(tree / "audio_enc_tiny" / "audio_enc_metadata.json", out / "audio_enc_metadata.json")
    write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                                "max_new_tokens": 16, "do_sample": False, "temperature": 1.0,
                                                "top_p": 1.0, "repetition_penalty": 1.0})
    write_json(out / "model_info.json", {"model_type": "muomni", "components": {
        "thinker": True, "audio_encoder": True, "vision_encoder": True, "talker": True, "ocr": False}})
    if with_vocoder and (tree / "vocoder_tiny" / "vocoder.pt").is_file():
        shutil.copy(tree / "vocoder_tiny" / "vocoder.pt", out / "vocoder.pt")
    return out
