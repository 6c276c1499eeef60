"""AudioEncoderTiny: power-mel frames -> 12.5 Hz (or 25 Hz) embeddings, plus its CTC character head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import RMSNorm, count_blocks

N_MELS = 128
CONV_CHANNELS = 64


@dataclass
class AudioEncoderConfig:
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 3
    d_ff: int = 768
    downsample: int = 8

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], n_heads: int = 3) -> "AudioEncoderConfig":
        return cls(d_model=sd["proj.weight"].shape[0], n_layers=count_blocks(sd), n_heads=n_heads,
                   d_ff=sd["blocks.0.mlp.0.weight"].shape[0] if "blocks.0.mlp.0.weight" in sd else 0,
                   downsample=8 if "down.1.weight" in sd else 4)


def conv_s2(c_in: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, CONV_CHANNELS, 3, stride=2, padding=1)


class ConvDown4(nn.Module):
    """Two stride-2 convolutions: time and frequency shrink 4x."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(conv_s2(1), nn.GELU(), conv_s2(CONV_CHANNELS), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderBlock(nn.Module):
    """Pre-norm bidirectional self-attention block without positional encoding."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = RMSNorm(d_model)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm2 = RMSNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        qkv = self.qkv_proj(self.norm1(x)).view(B, T, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out_proj(att.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.norm2(x))


class AudioEncoderTiny(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.downsample == 8:
            self.down = nn.Sequential(ConvDown4(), conv_s2(CONV_CHANNELS), nn.GELU())
        else:
            self.down = ConvDown4()
        self.proj = nn.Linear(CONV_CHANNELS * N_MELS // cfg.downsample, cfg.d_model)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.d_model, cfg.n_heads, cfg.d_ff) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, T, 128) power spectrogram -> (B, ceil(T / downsample), d)."""
        x = self.down(mel.unsqueeze(1))
        B, C, T, Fq = x.shape
        x = self.proj(x.permute(0, 2, 1, 3).reshape(B, T, C * Fq))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def ctc_emissions(best: list[int]) -> list[tuple[int, int, int]]:
    """Greedy CTC alignment of per-frame argmax labels: (label, first frame, last frame) for each emitted
    character, i.e. each run of one label other than <BLANK> (0) and <UNK> (1)."""
    runs: list[tuple[int, int, int]] = []
    prev = None
    for t, i in enumerate(best):
        if i != prev and i > 1:
            runs.append((i, t, t))
        elif i == prev and i > 1:
            runs[-1] = (i, runs[-1][1], t)
        prev = i
    return runs


def ctc_greedy_decode(logits: torch.Tensor, idx_to_char: dict[int, str]) -> str:
    """Argmax per frame, collapse repeats, drop <BLANK> (0) and <UNK> (1)."""
    return "".join(idx_to_char.get(i, "") for i, _, _ in ctc_emissions(logits.argmax(-1).tolist()))
