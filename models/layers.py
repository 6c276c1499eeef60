"""Building blocks shared by the Thinker and the Talker: RMSNorm, RoPE, attention, FFNs, MoE, KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


ONEDNN_MIN_ROWS = 32  # below this many rows oneDNN's per-call setup costs more than its faster kernel saves


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`. A float32 nn.Linear on CPU at inference (no autograd) with many rows (prefill, encoders) goes
    through oneDNN's matmul, which measured up to 2x faster than the BLAS behind nn.Linear there; with a few
    rows (decode steps) oneDNN's per-call setup (14-17 µs) costs more than the product, so plain F.linear.
    Same maths, other rounding order."""
    if type(layer) is not nn.Linear:
        return layer(x)
    if (_ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and layer.weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1]):
        out = _ONEDNN_LINEAR(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])
    return F.linear(x, layer.weight, layer.bias)


def fuse_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One module computing `cat([layer(x) for layer in layers], -1)` in a single product (q/k/v, gate/up):
    fewer, larger matmuls per decode step. Float nn.Linear layers are concatenated here; other linear types
    fuse through their own `fuse` classmethod (utils.weights.quant's int8/int4 layers). None when they cannot fuse.
    The result holds copies of the weights (the originals stay what state_dict() and exports see)."""
    first = layers[0]
    if any(type(layer) is not type(first) for layer in layers):
        return None
    if type(first) is nn.Linear:
        if any(layer.weight.dtype != first.weight.dtype or layer.weight.device != first.weight.device
               or (layer.bias is None) != (first.bias is None) for layer in layers):
            return None
        fused = nn.Linear(first.in_features, sum(layer.out_features for layer in layers),
                          bias=first.bias is not None, device="meta")
        fused.weight = nn.Parameter(torch.cat([layer.weight.detach() for layer in layers]), requires_grad=False)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]), requires_grad=False)
        return fused
    fuse = getattr(type(first), "fuse", None)
    return fuse(layers) if fuse is not None else None


def weights_key(layers: list[nn.Module]) -> tuple:
    """What a fused copy depends on: identity, version, dtype and device of every tensor of `layers`."""
    key = []
    for layer in layers:
        for t in (*layer.parameters(), *layer.buffers()):
            key.append((t.data_ptr(), t.dtype, t.device, None if t.is_inference() else t._version))
    return tuple(key)


class Fused:
    """A lazily built `fuse_linears` of sibling layers `names` of `owner`, rebuilt by `refresh` when any of
    them changed (new weights, `.to(...)`, quantization replacing them). Not a submodule: state_dict(),
    exports and `.to()` see only the original layers."""

    def __init__(self, owner: nn.Module, names: tuple[str, ...]) -> None:
        self.owner, self.names = owner, names
        self.key: tuple | None = None
        self.module: nn.Module | None = None

    def refresh(self) -> None:
        layers = [getattr(self.owner, name) for name in self.names]
        key = (tuple(id(layer) for layer in layers), weights_key(layers))
        if key != self.key:
            with torch.no_grad():
                self.module = fuse_linears(layers)
            self.key = key

    def get(self) -> nn.Module | None:
        if self.key is None:
            self.refresh()
        return self.module


def refresh_fused(module: nn.Module) -> None:
    """Bring every fused copy and Block decode step inside `module` up to date with its layers: once per
    generation (and whenever the weights may have changed), not per step."""
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, Fused):
                value.refresh()
    for m in module.modules():
        if isinstance(m, Block):
            m.refresh_step()


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

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` through F.rms_norm for float32 (decode steps: one call instead of six; rounding may differ
        in the last bit); other dtypes go through `forward`, which computes in float32."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.forward(x)


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
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)  # views, so a step indexes less

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v for positions start..start+T and return views of everything cached so far."""
        end = start + k.shape[2]
        keys, values = self.k_layers[layer], self.v_layers[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def first_rows(self, n: int) -> "KVCache":
        """The first `n` rows as a cache of their own: views of the same storage, no copy (a continuous batch
        decodes its running rows in the slots at the front)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, :n], self.v[:, :n]
        view.k_layers, view.v_layers = view.k.unbind(0), view.v.unbind(0)
        return view

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
            self._qkv = Fused(self, ("q", "k", "v"))
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
        self._gate_up = Fused(self, ("gate_proj", "up_proj"))

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


def attend_rows(qkv: torch.Tensor, cos: torch.Tensor, rot_sin: torch.Tensor, layer: int, cache: KVCache, pos: int,
                mask: torch.Tensor | None, h: int, g: int, dk: int) -> torch.Tensor:
    """The heads' outputs (B, h * dk), before `o`, for one new position per row from its q, k and v side by side
    (B, (h + 2g) dk), written to cache column `pos` and attending to columns 0..pos.

    Same arithmetic as `Attention.forward` with T == 1, in fewer ops: RoPE on q and k at once, no transposes
    (with a single query the projections are already laid out as (B, heads, dk)), and the query heads sharing
    a KV head folded into the query axis (B, g, h / g, dk), so K/V are never repeated. `cos`/`rot_sin`: (1, dk),
    or (B, 1, dk) for rows at different positions. `mask`: None (all columns) or a boolean (B, 1, 1, pos + 1)
    view of a preallocated mask."""
    B = qkv.shape[0]
    qk = apply_rotary(qkv[:, :(h + g) * dk].view(B, h + g, dk), cos, rot_sin)
    keys, values = cache.update(layer, pos, qk[:, h:].unsqueeze(2), qkv[:, (h + g) * dk:].view(B, g, 1, dk))
    out = F.scaled_dot_product_attention(qk[:, :h].view(B, g, h // g, dk), keys, values, attn_mask=mask)
    return out.view(B, h * dk)


Rows = Callable[[torch.Tensor], torch.Tensor]
ResidualRows = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def row_norm(norm: RMSNorm) -> Rows:
    """`norm.fast` on decode rows with its tensors bound once (a module's parameter lookups cost about as
    much as the F.rms_norm call itself at decode sizes)."""
    if norm.weight.dtype != torch.float32:
        return norm.forward
    weight, shape, eps, forward = norm.weight.detach(), tuple(norm.weight.shape), norm.eps, norm.forward
    return lambda x: F.rms_norm(x, shape, weight, eps) if x.dtype == torch.float32 else forward(x)


def row_linear(layer: nn.Module) -> Rows:
    """`layer` on decode rows (B, k). A float nn.Linear becomes F.linear on its tensors: at decode sizes a
    module call and `linear`'s dispatch checks cost about as much as the product. Other linears (int8, int4)
    are called as they are."""
    if type(layer) is not nn.Linear:
        return layer
    weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    return lambda x: F.linear(x, weight, bias)


def row_linears(layers: list[nn.Module], fused: Fused) -> Rows:
    """cat([layer(x) for layer in layers], -1) on decode rows: one product through `fused` (their fused copy)
    where the layers fuse (`fuse_linears`), else one product per layer."""
    if fused.get() is not None:
        return row_linear(fused.get())
    parts = [row_linear(layer) for layer in layers]
    return lambda x: torch.cat([part(x) for part in parts], dim=-1)


def row_residual(layer: nn.Module) -> ResidualRows:
    """(x, residual) -> residual + layer(x) on decode rows; a float nn.Linear without bias adds the residual
    inside its matmul (torch.addmm: one op instead of two)."""
    if type(layer) is nn.Linear and layer.bias is None:
        weight_t = layer.weight.detach().t()
        return lambda x, residual: torch.addmm(residual, x, weight_t)
    rows = row_linear(layer)
    return lambda x, residual: residual + rows(x)


def row_ffn(ffn: nn.Module) -> ResidualRows:
    """(normed rows h, residual x) -> x + ffn(h) on decode rows: SwiGLU's gate and up in one product, the
    down projection adding the residual; GELU likewise; MoE through its module."""
    if isinstance(ffn, SwiGLU):
        gate_up, down, d_ff = row_linears([ffn.gate_proj, ffn.up_proj], ffn._gate_up), row_residual(ffn.down_proj), \
            ffn.down_proj.in_features

        def swiglu(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            both = gate_up(h)
            return down(F.silu(both[:, :d_ff]) * both[:, d_ff:], x)
        return swiglu
    if isinstance(ffn, GeluMLP):
        fc1, fc2 = row_linear(ffn.fc1), row_residual(ffn.fc2)
        return lambda h, x: fc2(F.gelu(fc1(h)), x)
    return lambda h, x: ffn(h) + x


@dataclass(frozen=True, slots=True)
class DecodeStep:
    """A Block's decode step bound to its current weights (`Block.refresh_step`): fused q/k/v and gate/up
    copies and bare tensor ops in place of module calls, which cost a demo-size thinker about a fifth of its
    step. Built once per generation (`refresh_fused`), never per token."""
    norm1: Rows
    qkv: Rows              # normed rows -> q, k, v side by side (B, (h + 2g) dk)
    heads: tuple[int, int, int]  # (h, g, dk)
    o: ResidualRows        # (heads' outputs, residual) -> residual + o(heads)
    norm2: Rows
    ffn: ResidualRows      # (normed rows, residual) -> residual + ffn(rows)


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
        self._step: DecodeStep | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | None, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, layer, cache, start, mask)
        ffn = self.moe if hasattr(self, "moe") else self.mlp
        return x + ffn(self.norm2(x))

    def __getstate__(self) -> dict:
        """Copies and pickles carry no DecodeStep (its closures point at this block's own tensors): a copy
        builds its own on first use."""
        return {**self.__dict__, "_step": None}

    def refresh_step(self) -> DecodeStep:
        """This block's DecodeStep for its current weights and fused copies (called by `refresh_fused`, after
        the fused copies, so a step never outlives the weights it was made from)."""
        attn = self.attn
        qkv = row_linear(attn.qkv) if attn.fused_qkv else row_linears([attn.q, attn.k, attn.v], attn._qkv)
        self._step = DecodeStep(norm1=row_norm(self.norm1), qkv=qkv, heads=(attn.n_heads, attn.n_kv_heads, attn.head_dim),
                                o=row_residual(attn.o), norm2=row_norm(self.norm2),
                                ffn=row_ffn(self.moe if hasattr(self, "moe") else self.mlp))
        return self._step

    def decode(self, x: torch.Tensor, cos: torch.Tensor, rot_sin: torch.Tensor, layer: int, cache: KVCache,
               pos: int, mask: torch.Tensor | None, attn_out: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` for one new position per row, x (B, d), at cache column `pos` (see `attend_rows` for cos,
        rot_sin and mask), through the DecodeStep (built here if `refresh_fused` has not run yet). `attn_out`
        (B, 1, d), when given, replaces the attention sub-layer's output: the reference decode mode
        (decode_attention "reference"), where every new token sees only its row's first key, makes that output
        one constant per row (see `Attention.single_key_output`)."""
        step = self._step or self.refresh_step()
        if attn_out is None:
            x = step.o(attend_rows(step.qkv(step.norm1(x)), cos, rot_sin, layer, cache, pos, mask, *step.heads), x)
        else:
            x = x + attn_out.view_as(x)
        return step.ffn(step.norm2(x), x)


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
    (normed hidden states -> logits), so the decode engine's slots (utils.engine.generation.Slots) serve both models."""

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
        to cache column `pos`. `cos`/`rot_sin`: its rotary rows ((1, dk), or (B, 1, dk) when rows sit at
        different positions). `mask`: None or a boolean (B, 1, 1, pos + 1) view of a preallocated key mask.
        `attn_out`: per-layer constant attention outputs (`reference_attention`), for the reference decode.
        The blocks run on (B, d) rows (`Block.decode`): no transposes, fused projections."""
        x = x.reshape(x.shape[0], x.shape[-1])
        for i, block in enumerate(self.blocks):
            x = block.decode(x, cos, rot_sin, i, cache, pos, mask, None if attn_out is None else attn_out[i])
        return self.norm.fast(x)

    @torch.no_grad()
    def reference_attention(self, cache: KVCache, anchors: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the attention output (B, 1, d) of a decode step that may see only cache column
        `anchors[b]` (each row's first real position): that key's value, whatever the query. Exact."""
        return [block.attn.single_key_output(cache.values_at(i, anchors)) for i, block in enumerate(self.blocks)]

