"""Building blocks shared by the Thinker and the Talker: RMSNorm, RoPE, attention, FFNs, MoE, KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear():
    """torch.ops.mkldnn._linear_pointwise when this build has it (and it gives the right answer), else None."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        x, w, b = torch.ones(2, 4), torch.ones(3, 4), torch.arange(3.0)
        if not torch.equal(op(x, w, b, "none", [], ""), torch.tensor([[4.0, 5.0, 6.0]] * 2)):
            return None
        return op
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`; for a float32 nn.Linear on CPU at inference (no autograd) through oneDNN's matmul, which
    measured about 2x faster than the BLAS behind nn.Linear for every shape of these models on the AMD CPU
    used for development (1 to 512 rows: decode, batches, prefill). Same maths, other rounding order."""
    if (_ONEDNN_LINEAR is not None and type(layer) is nn.Linear and x.device.type == "cpu"
            and x.dtype == torch.float32 and layer.weight.dtype == torch.float32 and not torch.is_grad_enabled()):
        out = _ONEDNN_LINEAR(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])
    return layer(x)


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * weight, computed in float32 for half-precision stability."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class Rotary(nn.Module):
    """Rotate-half RoPE with cos/sin tables precomputed once for `max_len` positions.

    `rot_sin` is the sin table with its first half negated, so that rotate_half(x) * sin equals
    x.roll(half) * rot_sin exactly (negation is exact): one roll instead of two slices, a negation and a cat.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        emb = torch.cat([ang, ang], dim=-1)
        sin = emb.sin()
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("rot_sin", torch.cat([-sin[:, :head_dim // 2], sin[:, head_dim // 2:]], dim=-1),
                             persistent=False)

    @property
    def max_len(self) -> int:
        return self.cos.shape[0]

    def tables(self, start: int, length: int, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, rot_sin) shaped to broadcast over (B, heads, T, dk): contiguous from `start`, or gathered per
        row from `positions` (B, T). Pass them to `apply_rotary` (or to the blocks) as they are."""
        if positions is None:
            return self.cos[start:start + length], self.rot_sin[start:start + length]
        return self.cos[positions].unsqueeze(1), self.rot_sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, rot_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with the tables from `Rotary.tables` (rot_sin: sin, first half negated)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * rot_sin


class KVCache:
    """Keys and values for every layer, allocated once per generation and written in place."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v for positions start..start+T and return views of everything cached so far."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def values_at(self, layer: int, columns: torch.Tensor) -> torch.Tensor:
        """The cached values of `layer` at one column per row (`columns`: (B,) long): (B, kv_heads, head_dim)."""
        rows = torch.arange(self.v.shape[1], device=self.v.device)
        return self.v[layer, rows, :, columns]


class Attention(nn.Module):
    """Causal self-attention with RoPE. GQA form: separate q/k/v; MHA form: one stacked `qkv`."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, fused_qkv: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        else:
            self.q = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
            self.k = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
            self.v = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | None, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.fused_qkv:
            q, k, v = linear(self.qkv, x).chunk(3, dim=-1)
        else:
            q, k, v = linear(self.q, x), linear(self.k, x), linear(self.v, x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        group = self.n_heads // self.n_kv_heads
        if T == 1 and group > 1 and (mask is None or mask.shape[-2] == 1):
            # One query per head: fold the heads sharing a KV head into the query axis, so no K/V copy.
            # A (B, 1, 1, S) mask broadcasts over the folded heads unchanged.
            out = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_heads, group, self.head_dim), k, v,
                                                 attn_mask=mask)
            out = out.reshape(B, self.n_heads, 1, self.head_dim)
        else:
            causal = mask is None and T > 1 and k.shape[2] == T
            if mask is None and T > 1 and not causal:
                mask = causal_mask(start, T, k.shape[2], x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 enable_gqa=group > 1)
        return linear(self.o, out.transpose(1, 2).reshape(B, T, -1))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, rot_sin: torch.Tensor, layer: int, cache: KVCache,
               pos: int, mask: torch.Tensor | None) -> torch.Tensor:
        """One new position per row (x: (B, 1, d)) written to cache column `pos`, attending to columns 0..pos.

        Same arithmetic as `forward` with T == 1, minus the transposes: with a single query the (B, 1, h*dk)
        projections are already laid out as (B, heads, 1, dk), and the query heads sharing a KV head are
        folded into the query axis (B, kv_heads, group, dk) so K/V are never repeated. `mask`: None (all
        columns) or a boolean (B, 1, 1, pos + 1) view of a preallocated mask.
        """
        B = x.shape[0]
        g, dk = self.n_kv_heads, self.head_dim
        if self.fused_qkv:
            q, k, v = linear(self.qkv, x).chunk(3, dim=-1)
        else:
            q, k, v = linear(self.q, x), linear(self.k, x), linear(self.v, x)
        q = apply_rotary(q.view(B, g, self.n_heads // g, dk), cos, rot_sin)
        k = apply_rotary(k.view(B, g, 1, dk), cos, rot_sin)
        keys, values = cache.update(layer, pos, k, v.view(B, g, 1, dk))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return linear(self.o, out.view(B, 1, -1))

    def single_key_output(self, values: torch.Tensor) -> torch.Tensor:
        """The attention output of a query allowed to see exactly one key: softmax over one score is exactly
        1, so each head returns that key's value unchanged. `values` (B, kv_heads, dk) -> (B, 1, d) after `o`."""
        group = self.n_heads // self.n_kv_heads
        heads = values.repeat_interleave(group, dim=1) if group > 1 else values
        return linear(self.o, heads.reshape(values.shape[0], 1, -1))


def causal_mask(start: int, length: int, total: int, device: torch.device) -> torch.Tensor:
    """Boolean (length, total) mask letting query start+i see keys 0..start+i."""
    q_pos = torch.arange(start, start + length, device=device)[:, None]
    return torch.arange(total, device=device)[None, :] <= q_pos


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.down_proj, F.silu(linear(self.gate_proj, x)) * linear(self.up_proj, x))


class GeluMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.fc2, F.gelu(linear(self.fc1, x)))


def make_ffn(kind: str, d_model: int, d_ff: int) -> nn.Module:
    return SwiGLU(d_model, d_ff) if kind == "swiglu" else GeluMLP(d_model, d_ff)


class MoE(nn.Module):
    """Top-k softmax router over FFN experts; weights renormalised as p_k / (sum p_k + 1e-8)."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, ffn: str) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(make_ffn(ffn, d_model, d_ff) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.router(flat), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        top_p = top_p / (top_p.sum(-1, keepdim=True) + 1e-8)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * top_p[rows, slot, None])
        return out.view_as(x)


@dataclass
class BlockConfig:
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    fused_qkv: bool = False
    ffn: str = "swiglu"
    num_experts: int = 0
    num_experts_per_tok: int = 2


class Block(nn.Module):
    """Pre-norm residual block: x += attn(norm1(x)); x += ffn(norm2(x))."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.fused_qkv)
        self.norm2 = RMSNorm(cfg.d_model)
        if cfg.num_experts:
            self.moe = MoE(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.num_experts_per_tok, cfg.ffn)
        else:
            self.mlp = make_ffn(cfg.ffn, cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | None, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, layer, cache, start, mask)
        ffn = self.moe if hasattr(self, "moe") else self.mlp
        return x + ffn(self.norm2(x))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, rot_sin: torch.Tensor, layer: int, cache: KVCache,
               pos: int, mask: torch.Tensor | None, attn_out: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step (x: (B, 1, d)). `attn_out`, when given, replaces the attention sub-layer's output:
        the decode of `decode_attention="reference"`, where every new token sees only its row's first key,
        makes that output one constant per row (see `Attention.single_key_output`)."""
        if attn_out is None:
            attn_out = self.attn.decode(self.norm1(x), cos, rot_sin, layer, cache, pos, mask)
        x = x + attn_out
        ffn = self.moe if hasattr(self, "moe") else self.mlp
        return x + ffn(self.norm2(x))


def block_config_from_state(sd: dict[str, torch.Tensor], prefix: str, n_heads: int,
                            top_k: int) -> BlockConfig:
    """Read a Block's architecture off the tensor shapes under `prefix` (e.g. 'blocks.0.')."""
    if f"{prefix}attn.qkv.weight" in sd:
        d_model = sd[f"{prefix}attn.qkv.weight"].shape[1]
        fused, n_kv = True, n_heads
    else:
        d_model = sd[f"{prefix}attn.q.weight"].shape[1]
        fused = False
        n_kv = max(1, sd[f"{prefix}attn.k.weight"].shape[0] // (d_model // n_heads))
    ffn_prefix = f"{prefix}mlp."
    n_experts = 0
    if f"{prefix}moe.router.weight" in sd:
        n_experts = sd[f"{prefix}moe.router.weight"].shape[0]
        ffn_prefix = f"{prefix}moe.experts.0."
    if f"{ffn_prefix}gate_proj.weight" in sd:
        ffn, d_ff = "swiglu", sd[f"{ffn_prefix}gate_proj.weight"].shape[0]
    else:
        ffn, d_ff = "gelu", sd[f"{ffn_prefix}fc1.weight"].shape[0]
    return BlockConfig(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv, d_ff=d_ff, fused_qkv=fused,
                       ffn=ffn, num_experts=n_experts, num_experts_per_tok=min(top_k, max(n_experts, 1)))


def count_blocks(sd: dict[str, torch.Tensor], prefix: str = "blocks.") -> int:
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


class CausalStack(nn.Module):
    """What the Thinker and the Talker share: Blocks over RoPE and a final norm, run over a whole prompt
    (`hidden`) or over one new position per row against a KV cache (`decode_hidden`). Subclasses define
    `blocks`, `norm` and `rotary`, plus `embed_step` (the ids fed back at a decode step -> (B, 1, d)) and `head`
    (normed hidden states -> logits), so one decode engine (utils.generation.Decoder) serves both models."""

    blocks: nn.ModuleList
    norm: RMSNorm
    rotary: Rotary

    def cache_spec(self) -> tuple[int, int, int, torch.Tensor]:
        """(layers, kv_heads, head_dim, a float parameter giving the cache's dtype and device)."""
        b = self.blocks[0].attn
        return len(self.blocks), b.n_kv_heads, b.head_dim, self.norm.weight

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        layers, kv_heads, head_dim, p = self.cache_spec()
        return KVCache(layers, batch, kv_heads, max_len or self.rotary.max_len, head_dim, p.dtype, p.device)

    def hidden(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None,
               positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               last_only: bool = False) -> torch.Tensor:
        """Normed hidden states for input embeddings `x` (B, T, d) at positions start..start+T ((B, d) of the
        last position with `last_only`). `positions` (B, T) and a boolean `mask` (B, 1, T, S) override the
        defaults for left-padded batches."""
        cos, sin = self.rotary.tables(start, x.shape[1], positions)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, i, cache, start, mask)
        return self.norm(x[:, -1] if last_only else x)

    def decode_hidden(self, x: torch.Tensor, pos: int, cache: KVCache, cos: torch.Tensor | None,
                      rot_sin: torch.Tensor | None, mask: torch.Tensor | None = None,
                      attn_out: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Normed hidden states (B, d) for one new position per row (`x`: (B, 1, d), from `embed_step`) written
        to cache column `pos`. `cos`/`rot_sin`: its rotary rows ((B, 1, 1, dk) when rows sit at different
        positions). `mask`: None or a boolean (B, 1, 1, pos + 1) view of a preallocated key mask. `attn_out`:
        per-layer constant attention outputs (`reference_attention`), for the reference decode."""
        for i, block in enumerate(self.blocks):
            x = block.decode(x, cos, rot_sin, i, cache, pos, mask, None if attn_out is None else attn_out[i])
        return self.norm(x[:, 0])

    @torch.no_grad()
    def reference_attention(self, cache: KVCache, anchors: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the attention output (B, 1, d) of a decode step that may see only cache column
        `anchors[b]` (each row's first real position): that key's value, whatever the query. Exact."""
        return [block.attn.single_key_output(cache.values_at(i, anchors)) for i, block in enumerate(self.blocks)]

