"""TalkerTiny (an LM over two-codebook RVQ speech codes) and the RVQ codec that turns codes into mel frames."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import Block, BlockConfig, CausalStack, RMSNorm, Rotary, block_config_from_state, count_blocks


@dataclass
class TalkerConfig:
    codebook_size: int = 128
    n_layers: int = 4
    block: BlockConfig = None  # type: ignore[assignment]
    rope_theta: float = 10000.0
    max_frames: int = 2048

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], n_heads: int = 3, rope_theta: float = 10000.0,
                        max_frames: int = 2048) -> "TalkerConfig":
        return cls(codebook_size=sd["emb.weight"].shape[0], n_layers=count_blocks(sd),
                   block=block_config_from_state(sd, "blocks.0.", n_heads, 2), rope_theta=rope_theta,
                   max_frames=max_frames)


class TalkerTiny(CausalStack):
    def __init__(self, cfg: TalkerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.block.d_model
        self.emb = nn.Embedding(cfg.codebook_size, d)
        self.start = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(Block(cfg.block) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(d)
        self.base_head = nn.Linear(d, cfg.codebook_size)
        self.res_head = nn.Linear(d, cfg.codebook_size)
        # +2: the start slot and the initial [0, 0] frame come before the generated frames.
        self.rotary = Rotary(d // cfg.block.n_heads, cfg.max_frames + 2, cfg.rope_theta)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T, 2) -> emb(base) + emb(residual), one table shared by both codebooks."""
        return self.emb(codes[..., 0]) + self.emb(codes[..., 1])

    def embed_step(self, frames: torch.Tensor) -> torch.Tensor:
        """Code frames (B, 2) fed back at a decode step -> (B, 1, d)."""
        return self.embed(frames[:, None])

    def head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, residual) logits for normed hidden states (..., d)."""
        return self.base_head(x), self.res_head(x)

    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits predicting the frame after each input frame: (B, T, K) twice."""
        x = torch.cat([self.start.expand(codes.shape[0], -1, -1), self.embed(codes)], dim=1)
        base, res = self.head(self.hidden(x))
        return base[:, 1:], res[:, 1:]


class RVQ(nn.Module):
    """Two-stage residual vector quantiser between 128-bin mel frames and code pairs."""

    def __init__(self, codebook_size: int = 128, code_dim: int = 64, n_mels: int = 128, n_codebooks: int = 2) -> None:
        super().__init__()
        self.codebooks = nn.ModuleList(nn.Embedding(codebook_size, code_dim) for _ in range(n_codebooks))
        self.proj_in = nn.Linear(n_mels, code_dim)
        self.proj_out = nn.Linear(code_dim, n_mels)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "RVQ":
        k, dim = sd["codebooks.0.weight"].shape
        n = len({key.split(".")[1] for key in sd if key.startswith("codebooks.")})
        return cls(k, dim, sd["proj_in.weight"].shape[1], n)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., n_codebooks) -> mel frames (..., n_mels)."""
        z = sum(cb(codes[..., i]) for i, cb in enumerate(self.codebooks))
        return self.proj_out(z)

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel frames (..., n_mels) -> codes (..., n_codebooks), nearest code on the running residual."""
        residual = self.proj_in(mel)
        picks = []
        for cb in self.codebooks:
            dist = (residual.unsqueeze(-2) - cb.weight).pow(2).sum(-1)
            idx = dist.argmin(-1)
            picks.append(idx)
            residual = residual - cb(idx)
        return torch.stack(picks, dim=-1)
