"""ThinkerLM: the decoder-only language model at the centre of μOmni."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import (Block, BlockConfig, CausalStack, KVCache, RMSNorm, Rotary, block_config_from_state,
                           count_blocks, linear)


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


class ThinkerLM(CausalStack):
    def __init__(self, cfg: ThinkerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.block.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.blocks = nn.ModuleList(Block(cfg.block) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.rotary = Rotary(d // cfg.block.n_heads, cfg.ctx_len, cfg.rope_theta)

    def forward(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits for input embeddings `x` (B, T, d) placed at positions start..start+T ((B, 1, V) with
        `last_only`). `positions` and `mask` as for `CausalStack.hidden`."""
        h = self.hidden(x, start, cache, positions, mask, last_only)
        return self.head(h[:, None] if last_only else h)

    def embed_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B,) fed back at a decode step -> (B, 1, d)."""
        return self.tok_emb(tokens).unsqueeze(1)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """lm_head on normed hidden states (..., d) -> logits (..., V) (through `models.layers.linear`)."""
        return linear(self.lm_head, x)
