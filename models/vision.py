"""ViTTiny: the image encoder. Only its CLS output feeds the Thinker (through `proj_v`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import RMSNorm, count_blocks


@dataclass
class ViTConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 2
    d_ff: int = 512
    patch: int = 16
    img_size: int = 224

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], n_heads: int = 2) -> "ViTConfig":
        d, _, patch, _ = sd["proj.weight"].shape
        grid = math.isqrt(sd["pos"].shape[1] - 1)
        return cls(d_model=d, n_layers=count_blocks(sd), n_heads=n_heads,
                   d_ff=sd["blocks.0.linear1.weight"].shape[0] if "blocks.0.linear1.weight" in sd else 4 * d,
                   patch=patch, img_size=grid * patch)


class ViTTiny(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_patches = (cfg.img_size // cfg.patch) ** 2
        self.proj = nn.Conv2d(3, cfg.d_model, cfg.patch, stride=cfg.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos = nn.Parameter(torch.zeros(1, 1 + n_patches, cfg.d_model))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, 3, H, W) in [0, 1] -> (cls (B, 1, d), patch grid (B, N, d)). An image of another size than the
        checkpoint's `img_size` (its `pos` table) is resized bilinearly to it first."""
        size = self.cfg.img_size
        if img.shape[-2:] != (size, size):
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
        x = self.proj(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, :1], x[:, 1:]


def sincos_positions(d: int, grid: int) -> torch.Tensor:
    """2-D sine/cosine position table (1, 1 + grid^2, d) with a zero row for the CLS slot: a starting `pos` for
    training a ViTTiny (tools/)."""
    q = d // 4
    omega = 1.0 / (100 ** (torch.arange(q).float() / q))
    ys, xs = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    oy, ox = ys.flatten()[:, None] * omega, xs.flatten()[:, None] * omega
    table = torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], 1)
    return torch.cat([torch.zeros(1, d), table], 0)[None]
