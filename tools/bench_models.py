"""The random-weight models bench.py measures, written as the trainers write checkpoints (so bench.py loads them
through omni.load_model like any other tree).

"tiny": the real μOmni tiny configuration (Thinker: 4 layers, d 256, 4 heads, 2 KV heads, SwiGLU 1024, vocab
32000, ctx 512; ViT d 128 x4; audio encoder d 192 x4; Talker d 192 x4 + RVQ + HiFi-GAN), seeded.
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


def write_tree(root: Path) -> None:
    """Random weights for every component of the μOmni tiny configuration, saved the way the trainers save
    them (component directories, configs/*.json); the demo's tokenizer stands in (its 512 pieces fit)."""
    torch.manual_seed(SEED)
    thinker = ThinkerLM(ThinkerConfig(vocab_size=32000, n_layers=4, ctx_len=512,
                                      block=BlockConfig(d_model=256, n_heads=4, n_kv_heads=2, d_ff=1024)))
    vision = ViTTiny(ViTConfig(d_model=128, n_layers=4, n_heads=2, d_ff=512, img_size=224))
    audio = AudioEncoderTiny(AudioEncoderConfig(d_model=192, n_layers=4, n_heads=3, d_ff=768, downsample=8))
    talker = TalkerTiny(TalkerConfig(codebook_size=128, n_layers=4,
                                     block=BlockConfig(d_model=192, n_heads=3, n_kv_heads=1, d_ff=768)))
    with torch.no_grad():  # a non-zero start slot, as a trained talker has
        talker.start.normal_(0, 0.02)
    vocoder = HiFiGANGenerator(HiFiGANConfig(upsample_initial_channel=128))
    proj_a, proj_v = torch.nn.Linear(192, 256), torch.nn.Linear(128, 256)

    def save(obj: dict, rel: str) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, root / rel)

    def config(name: str, cfg: dict) -> None:
        (root / "configs").mkdir(parents=True, exist_ok=True)
        (root / "configs" / f"{name}.json").write_text(json.dumps({**cfg, "save_dir": f"checkpoints/{name}"}))

    thinker_cfg = {"vocab_size": 32000, "d_model": 256, "n_layers": 4, "n_heads": 4, "kv_groups": 2, "d_ff": 1024,
                   "use_gqa": True, "use_swiglu": True, "rope_theta": 10000.0, "ctx_len": 512}
    save({"model": thinker.state_dict()}, "thinker_tiny/thinker.pt")
    shutil.copy(DEMO / "thinker_tiny" / "tokenizer.model", root / "thinker_tiny" / "tokenizer.model")
    config("thinker_tiny", thinker_cfg)
    save({"vit": vision.state_dict()}, "vision_tiny/vision.pt")
    config("vision_tiny", {"img_size": 224, "patch": 16, "d_model": 128, "n_layers": 4, "n_heads": 2, "d_ff": 512})
    save({"enc": audio.state_dict()}, "audio_enc_tiny/audio_enc.pt")
    config("audio_enc_tiny", {"d_model": 192, "n_layers": 4, "n_heads": 3, "d_ff": 768, "downsample_time": 8})
    save({"talker": talker.state_dict(), "rvq": RVQ().state_dict()}, "talker_tiny/talker.pt")
    config("talker_tiny", {"d_model": 192, "n_layers": 4, "n_heads": 3, "d_ff": 768, "rope_theta": 10000.0})
    save({"generator": vocoder.state_dict()}, "vocoder_tiny/vocoder.pt")
    config("vocoder_tiny", {"upsample_initial_channel": 128})
    save({"thinker": thinker.state_dict(), "proj_a": proj_a.state_dict(), "proj_v": proj_v.state_dict()},
         "omni_sft_tiny/omni.pt")
    config("omni_sft_tiny", {"thinker_ckpt": "checkpoints/thinker_tiny", "audio_ckpt": "checkpoints/audio_enc_tiny",
                             "vision_ckpt": "checkpoints/vision_tiny", "talker_ckpt": "checkpoints/talker_tiny",
                             "ctx_len": 512, "thinker": thinker_cfg})
