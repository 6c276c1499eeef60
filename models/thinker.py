"""ThinkerLM: the decoder-only language model at the centre of μOmni."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import (Block, BlockConfig, KVCache, RMSNorm, Rotary, block_config_from_state, count_blocks,
                           linear)


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
        p = self.tok_emb.weight  # never quantized: the model's float dtype
        return KVCache(self.cfg.n_layers, batch, b.n_kv_heads, max_len or self.cfg.ctx_len,
                       b.d_model // b.n_heads, p.dtype, p.device)

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
            return self.head(self.norm(x[:, -1]))[:, None]
        return self.head(self.norm(x))

    def decode(self, tokens: torch.Tensor, pos: int, cache: KVCache, cos: torch.Tensor, rot_sin: torch.Tensor,
               mask: torch.Tensor | None = None, attn_out: list[torch.Tensor] | None = None,
               hidden: bool = False) -> torch.Tensor:
        """Logits (B, V) for one new token per row (`tokens`: (B,) long) written to cache column `pos`
        (with `hidden`, the final-normed hidden states (B, d) that `head` turns into logits).

        `cos`/`rot_sin`: rotary rows for the new tokens ((1, dk) from `rotary.tables`; (B, 1, dk) when rows sit
        at different positions). `mask`: None or a boolean (B, 1, 1, pos + 1) view of a preallocated key mask.
        `attn_out`: per-layer constant attention outputs (`reference_attention`), for the reference decode.
        """
        x = F.embedding(tokens, self.tok_emb.weight)
        for i, block in enumerate(self.blocks):
            x = block.decode(x, cos, rot_sin, i, cache, pos, mask, None if attn_out is None else attn_out[i])
        x = self.norm.fast(x)
        return x if hidden else self.head(x)

    @torch.no_grad()
    def reference_attention(self, cache: KVCache, anchors: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the attention output (B, 1, d) of a decode step that may see only cache column
        `anchors[b]` (each row's first real position): that key's value, whatever the query. Exact."""
        return [block.attn.single_key_output(cache.values_at(i, anchors)) for i, block in enumerate(self.blocks)]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """lm_head on normed hidden states (..., d) -> logits (..., V) (through `models.layers.linear`)."""
        return linear(self.lm_head, x)
