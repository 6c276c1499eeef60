"""The random-weight models bench.py measures, written as the trainers write checkpoints (so bench.py loads them
through omni.load_model like any other tree).

"tiny": the real μOmni tiny configuration (Thinker: 4 layers, d 256, 4 heads, 2 KV heads, SwiGLU 1024, vocab
32000, ctx 512; ViT d 128 x4; audio encoder d 192 x4; Talker d 192 x4 + RVQ + HiFi-GAN), seeded.
"base" and "large": larger thinkers alone (a thinker-only tree), to see how decoding scales past μOmni's sizes:
base d 512, 8 layers, 8 heads, 4 KV heads, SwiGLU 2048; large d 1024, 12 layers, 16 heads, 8 KV heads, SwiGLU
4096; both vocab 32000, ctx 512, seeded.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import torch  # noqa: E402

from models.audio import AudioEncoderConfig, AudioEncoderTiny  # noqa: E402
from models.layers import BlockConfig  # noqa: E402
from models.talker import RVQ, TalkerConfig, TalkerTiny  # noqa: E402
from models.thinker import ThinkerConfig, ThinkerLM  # noqa: E402
from models.vision import ViTConfig, ViTTiny  # noqa: E402
from models.vocoder import HiFiGANConfig, HiFiGANGenerator  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "checkpoints" / "demo"
SEED = 0
# thinker shapes: d_model, n_layers, n_heads, d_ff (KV heads: n_heads // 2, as the trainers build them)
THINKERS = {"tiny": (256, 4, 4, 1024), "base": (512, 8, 8, 2048), "large": (1024, 12, 16, 4096)}


def thinker_config(name: str) -> dict:
    """The configs/thinker_tiny.json of the thinker `name` (a key of THINKERS)."""
    d, layers, heads, ff = THINKERS[name]
    return {"vocab_size": 32000, "d_model": d, "n_layers": layers, "n_heads": heads, "kv_groups": heads // 2,
            "d_ff": ff, "use_gqa": True, "use_swiglu": True, "rope_theta": 10000.0, "ctx_len": 512}


def random_thinker(name: str) -> ThinkerLM:
    """The thinker `name` with random weights from the fixed seed (the same weights every call)."""
    cfg = thinker_config(name)
    torch.manual_seed(SEED)
    return ThinkerLM(ThinkerConfig(vocab_size=cfg["vocab_size"], n_layers=cfg["n_layers"], ctx_len=cfg["ctx_len"],
                                   block=BlockConfig(d_model=cfg["d_model"], n_heads=cfg["n_heads"],
                                                     n_kv_heads=cfg["n_heads"] // 2, d_ff=cfg["d_ff"])))


def save(obj: dict, root: Path, rel: str) -> None:
    """torch.save `obj` at `root`/`rel`, as the trainers save a component."""
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, root / rel)


def config(root: Path, name: str, cfg: dict) -> None:
    """configs/`name`.json under `root`, its save_dir naming the component directory as the trainers write it."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / f"{name}.json").write_text(json.dumps({**cfg, "save_dir": f"checkpoints/{name}"}))


def write_thinker_tree(root: Path, name: str) -> None:
    """The random thinker `name` alone, as a thinker trainer saves it (thinker_tiny/, configs/thinker_tiny.json),
    with the demo's tokenizer standing in (its 512 pieces fit)."""
    save({"model": random_thinker(name).state_dict()}, root, "thinker_tiny/thinker.pt")
    shutil.copy(DEMO / "thinker_tiny" / "tokenizer.model", root / "thinker_tiny" / "tokenizer.model")
    config(root, "thinker_tiny", thinker_config(name))


def write_tree(root: Path) -> None:
    """Random weights for every component of the μOmni tiny configuration, saved the way the trainers save
    them (component directories, configs/*.json); the demo's tokenizer stands in (its 512 pieces fit)."""
    thinker = random_thinker("tiny")
    vision = ViTTiny(ViTConfig(d_model=128, n_layers=4, n_heads=2, d_ff=512, img_size=224))
    audio = AudioEncoderTiny(AudioEncoderConfig(d_model=192, n_layers=4, n_heads=3, d_ff=768, downsample=8))
    talker = TalkerTiny(TalkerConfig(codebook_size=128, n_layers=4,
                                     block=BlockConfig(d_model=192, n_heads=3, n_kv_heads=1, d_ff=768)))
    with torch.no_grad():  # a non-zero start slot, as a trained talker has
        talker.start.normal_(0, 0.02)
    vocoder = HiFiGANGenerator(HiFiGANConfig(upsample_initial_channel=128))
    proj_a, proj_v = torch.nn.Linear(192, 256), torch.nn.Linear(128, 256)
    thinker_cfg = thinker_config("tiny")
    save({"model": thinker.state_dict()}, root, "thinker_tiny/thinker.pt")
    shutil.copy(DEMO / "thinker_tiny" / "tokenizer.model", root / "thinker_tiny" / "tokenizer.model")
    config(root, "thinker_tiny", thinker_cfg)
    save({"vit": vision.state_dict()}, root, "vision_tiny/vision.pt")
    config(root, "vision_tiny", {"img_size": 224, "patch": 16, "d_model": 128, "n_layers": 4, "n_heads": 2,
                                 "d_ff": 512})
    save({"enc": audio.state_dict()}, root, "audio_enc_tiny/audio_enc.pt")
    config(root, "audio_enc_tiny", {"d_model": 192, "n_layers": 4, "n_heads": 3, "d_ff": 768, "downsample_time": 8})
    save({"talker": talker.state_dict(), "rvq": RVQ().state_dict()}, root, "talker_tiny/talker.pt")
    config(root, "talker_tiny", {"d_model": 192, "n_layers": 4, "n_heads": 3, "d_ff": 768, "rope_theta": 10000.0})
    save({"generator": vocoder.state_dict()}, root, "vocoder_tiny/vocoder.pt")
    config(root, "vocoder_tiny", {"upsample_initial_channel": 128})
    save({"thinker": thinker.state_dict(), "proj_a": proj_a.state_dict(), "proj_v": proj_v.state_dict()},
         root, "omni_sft_tiny/omni.pt")
    config(root, "omni_sft_tiny", {"thinker_ckpt": "checkpoints/thinker_tiny",
                                   "audio_ckpt": "checkpoints/audio_enc_tiny", "vision_ckpt": "checkpoints/vision_tiny",
                                   "talker_ckpt": "checkpoints/talker_tiny", "ctx_len": 512, "thinker": thinker_cfg})
