"""ThinkerLM: the decoder-only language model at the centre of μOmni."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import Block, BlockConfig, KVCache, RMSNorm, Rotary, block_config_from_state, count_blocks


@dataclass
class ThinkerConfig:
    vocab_size: int = 32000
    n_layers: int = 4
    block: BlockConfig = None  # type: ignore[assignment]
    rope_theta: float = 10000.0
    ctx_len: int = 512

    @property
    def d_model(self) -> int:
        return self.block.d_model

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], n_heads: int = 4, rope_theta: float = 10000.0,
                        ctx_len: int = 512, num_experts_per_tok: int = 2) -> "ThinkerConfig":
        return cls(vocab_size=sd["tok_emb.weight"].shape[0], n_layers=count_blocks(sd),
                   block=block_config_from_state(sd, "blocks.0.", n_heads, num_experts_per_tok),
                   rope_theta=rope_theta, ctx_len=ctx_len)


class ThinkerLM(nn.Module):
    def __init__(self, cfg: ThinkerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.block.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.blocks = nn.ModuleList(Block(cfg.block) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.rotary = Rotary(d // cfg.block.n_heads, cfg.ctx_len, cfg.rope_theta)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        b = self.cfg.block
        p = self.lm_head.weight
        return KVCache(self.cfg.n_layers, batch, b.n_kv_heads, max_len or self.cfg.ctx_len,
                       b.d_model // b.n_heads, p.dtype if p.is_floating_point() else torch.float32, p.device)

    def forward(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits for input embeddings `x` (B, T, d) placed at positions start..start+T.

        `positions` (B, T) and a boolean `mask` (B, 1, T, S) override the defaults for left-padded batches.
        """
        cos, sin = self.rotary.tables(start, x.shape[1], positions)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, i, cache, start, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))
