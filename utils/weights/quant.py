"""Weight-only int8 quantization of merged exports (export.py writes it, utils/weights/export_format.py reads it).

Key convention, inside `model.safetensors`:
  `<module>.weight`        int8 [out, in]   the Linear weight, rounded to the nearest step
  `<module>.weight_scale`  float32 [out]    one step size per output channel
and the float weight is `weight.float() * weight_scale[:, None]`. Symmetric, no zero point:
`scale = max|w_row| / 127`, `q = round(w / scale)` in [-127, 127]; an all-zero row has scale 0.
Per output channel so that one large row does not coarsen the steps of every other row.
Only the 2-D weights of nn.Linear modules are quantized; embeddings, norms, convolutions and biases stay float.
The file's metadata and config.json carry `QUANT_METHOD` so a reader can tell.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from utils.weights.checkpoint import StateDict
from utils.base.defaults import QUANTIZATIONS
from utils.base.errors import OmniError

SCALE_SUFFIX = "_scale"
QMAX = 127


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 per-row scale) for a 2-D float weight."""
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"int8 quantization needs a 2-D float weight, got {tuple(w.shape)} {w.dtype}")
    wf = w.float()
    scale = wf.abs().amax(dim=1) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight an int8 weight and its per-row scale stand for."""
    return q.float() * scale.float()[:, None]


def linear_weight_names(module: nn.Module) -> list[str]:
    """State-dict names of every nn.Linear weight in `module` (the tensors int8 export quantizes)."""
    return [f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def quantize_state_dict(sd: StateDict, names: list[str]) -> StateDict:
    """`sd` with each weight in `names` replaced by its int8 tensor plus `<name>_scale`, order kept."""
    wanted = set(names)
    missing = wanted - set(sd)
    if missing:
        raise ValueError(f"not in the state dict: {sorted(missing)[:4]}")
    out: StateDict = {}
    for k, v in sd.items():
        if k in wanted:
            out[k], out[k + SCALE_SUFFIX] = quantize_int8(v)
        else:
            out[k] = v
    return out


def dequantize_state_dict(sd: StateDict, source: str) -> StateDict:
    """Float state dict from one holding int8 weights and their scales; every int8 tensor needs its scale."""
    out: StateDict = {}
    for k, v in sd.items():
        if k.endswith(SCALE_SUFFIX) and k[:-len(SCALE_SUFFIX)] in sd and sd[k[:-len(SCALE_SUFFIX)]].dtype == torch.int8:
            continue
        if v.dtype == torch.int8:
            scale = sd.get(k + SCALE_SUFFIX)
            if scale is None:
                raise OmniError(f"{source}: int8 tensor {k} has no {k + SCALE_SUFFIX}")
            if v.ndim != 2 or scale.shape != (v.shape[0],) or not scale.is_floating_point():
                raise OmniError(f"{source}: {k + SCALE_SUFFIX} has shape {tuple(scale.shape)} {scale.dtype}; "
                                f"expected float ({v.shape[0]},) for the int8 weight {tuple(v.shape)}")
            out[k] = dequantize_int8(v, scale)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------- runtime quantization (speed, not storage)
# Everything below is used at inference time. `--quantize int8` swaps nn.Linear modules for Int8Linear and
# `--quantize int4` for Int4Linear (utils.weights.quant.quantize_linears); GreedyHead makes float greedy decoding
# read the vocabulary projection as int8 while still returning the exact argmax.

INT4_GROUP = 32  # weights per int4 scale/zero pair along the input axis


def _int_mm_ok(device: torch.device) -> bool:
    """torch._int_mm handles any shape on CPU; CUDA needs M > 16 and multiples of 8, so decode falls back."""
    return device.type == "cpu" and hasattr(torch, "_int_mm")


def _one_position(x: torch.Tensor) -> bool:
    """True for decode-step activations: rows of one position each, (B, K) or (B, 1, K). The kernel choice
    depends on this and not on the row count, so a row's numbers do not depend on the batch it is in."""
    return x.ndim == 2 or x.shape[-2] == 1


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.aten, name)
        return True
    except (AttributeError, RuntimeError):
        return False


_INT8PACK = _has_op("_weight_int8pack_mm")
_INT4PACK = _has_op("_weight_int4pack_mm_for_cpu") and _has_op("_convert_weight_to_int4pack_for_cpu")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of activations (M, K): (int8 (M, K), float32 step (M, 1))."""
    xf = x.float()
    step = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / QMAX
    return torch.round(xf / step).to(torch.int8), step


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights (the per-output-channel format of int8 exports, `quantize_int8`).

    Decode steps (one position per row) on CPU: weight-only, one fused op, torch's `_weight_int8pack_mm`
    on bfloat16 activations (its float32 path measured 5x slower); for a projection of more than
    `PACKED_MIN_WEIGHTS` weights (a vocabulary head) oneDNN's pre-packed int8 matmul on activations quantized
    per row (the fastest read of a large int8 matrix measured here). Several positions per row (prefill,
    encoders): activations quantized per row, int8 x int8 -> int32 `torch._int_mm` (exact), rescaled.
    Where neither kernel exists (e.g. CUDA decode shapes) the weight is dequantized.
    """

    PACKED_MIN_WEIGHTS = 1 << 22

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        self._packed: tuple | None = None  # (key, PackedInt8Weight or None), built on first use
        self._scale_bf16: torch.Tensor | None = None  # the decode kernel's scales, made on first use (so
        # change the scales by replacing the module, not in place)
        self._large = self.qweight.numel() >= self.PACKED_MIN_WEIGHTS
        # torch's _weight_int8pack_mm gave NaN now and then for inner sizes that are not multiples of 16
        # (seen with 72 and 200 on torch 2.13 CPU): those take the quantized-rows path
        self._int8pack_ok = _INT8PACK and self.in_features % 16 == 0

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        q, scale = quantize_int8(lin.weight.detach())
        return cls(q, scale, lin.bias)

    @classmethod
    def fuse(cls, layers: list["Int8Linear"]) -> "Int8Linear | None":
        """One Int8Linear computing the layers' outputs side by side (see models.layers.fuse_linears)."""
        if len({(m.in_features, m.qweight.device, m.bias is None) for m in layers}) != 1:
            return None
        bias = torch.cat([m.bias for m in layers]) if layers[0].bias is not None else None
        return cls(torch.cat([m.qweight for m in layers]), torch.cat([m.scale for m in layers]), bias)

    def packed(self) -> "PackedInt8Weight | None":
        key = (self.qweight.data_ptr(), self.scale.data_ptr())
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, PackedInt8Weight.build(self.qweight, self.scale))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        cpu = x.device.type == "cpu"
        if cpu and not self._large and self._int8pack_ok and _one_position(x):
            scale = self._scale_bf16
            if scale is None or scale.device != x.device or scale.shape != self.scale.shape:
                scale = self._scale_bf16 = self.scale.to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, scale)
            if self.bias is not None:
                y = y.float() + self.bias.float()
            return y.to(x.dtype).view(*shape[:-1], self.out_features)
        packed = self.packed() if cpu and self._large else None
        if _int_mm_ok(x.device):
            xq, step = quantize_rows(x2)
            y = (packed(xq) if packed is not None else torch._int_mm(xq, self.qweight.t()) * self.scale) * step
        else:
            y = x2.float() @ dequantize_int8(self.qweight, self.scale).t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


INT4_RANGES = tuple((shrink, shift) for shrink in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75) for shift in (-0.05, 0.0, 0.05))


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit quantization of a 2-D float weight (N, K): (codes int32 (N, K) in 0..15,
    float32 (K / group, N, 2) scale and zero per group), with w ~ (code - 8) * scale + zero, the convention
    of torch's int4 matmul kernels. Each group's 16 levels span the range among `INT4_RANGES` (its min..max
    range narrowed by `shrink` and moved by `shift` of its width) with the least squared error: clipping
    a few outliers buys finer steps for the rest (on the demo thinker top-1 agreement with float32 went
    from 95.5% with plain min..max to 98%)."""
    N, K = w.shape
    groups = w.detach().float().reshape(N, K // group, group)
    lo0, hi0 = groups.amin(-1), groups.amax(-1)
    best_err = best_codes = best_scale = best_lo = None
    for shrink, shift in INT4_RANGES:
        width = (hi0 - lo0) * shrink
        lo = (lo0 + hi0 - width) / 2 + shift * (hi0 - lo0)
        scale = width.clamp_min(1e-8) / 15
        codes = torch.round((groups - lo[..., None]) / scale[..., None]).clamp_(0, 15)
        err = (codes * scale[..., None] + lo[..., None] - groups).pow(2).sum(-1)
        if best_err is None:
            best_err, best_codes, best_scale, best_lo = err, codes, scale, lo
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_codes = torch.where(better[..., None], codes, best_codes)
        best_scale = torch.where(better, scale, best_scale)
        best_lo = torch.where(better, lo, best_lo)
    zero = best_lo + 8 * best_scale
    return (best_codes.to(torch.int32).reshape(N, K),
            torch.stack([best_scale, zero], -1).transpose(0, 1).contiguous())


def pack_nibbles(codes: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """Codes (N, K) in 0..15 as uint8 (N, K / 2), two per byte: in each group of `group` codes, byte i holds
    code i in its low nibble and code i + group / 2 in its high one (the layout of step.c's int4 kernels: the
    low nibbles of a group's bytes are its first half, the high nibbles its second, in order)."""
    N, K = codes.shape
    c = codes.to(torch.uint8).reshape(N, K // group, 2, group // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_nibbles(packed: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """The int32 codes (N, K) `pack_nibbles` packed."""
    N, half = packed.shape
    b = packed.reshape(N, half * 2 // group, 1, group // 2)
    return torch.cat([b & 15, b >> 4], 2).reshape(N, half * 2).to(torch.int32)


class Int4Linear(nn.Module):
    """nn.Linear with weight-only 4-bit group-wise weights (`quantize_int4`), through torch's CPU int4
    kernel (`_weight_int4pack_mm_for_cpu`) on bfloat16 activations. CPU only; `supports` says which shapes
    the kernel takes (N a multiple of 16, K of the group size). `codes` keeps the weights in the layout of
    `pack_nibbles` (what the C step reads; torch's packing differs by CPU), `packed` torch's copy of them."""

    def __init__(self, codes: torch.Tensor, scale_zero: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None, group: int = INT4_GROUP) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, codes.shape[0], group
        self.register_buffer("codes", codes)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unpack_nibbles(codes, group), 1))
        self.register_buffer("scale_zero", scale_zero.to(torch.bfloat16))
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)

    @staticmethod
    def supports(lin: nn.Linear, group: int = INT4_GROUP) -> bool:
        return (_INT4PACK and lin.weight.device.type == "cpu" and lin.out_features % 16 == 0
                and lin.in_features % group == 0)

    @classmethod
    def from_linear(cls, lin: nn.Linear, group: int = INT4_GROUP) -> "Int4Linear":
        codes, scale_zero = quantize_int4(lin.weight, group)
        return cls(pack_nibbles(codes, group), scale_zero, lin.in_features, lin.bias, group)

    @classmethod
    def fuse(cls, layers: list["Int4Linear"]) -> "Int4Linear | None":
        """Side by side outputs in one product (the codes and scales of the layers concatenated)."""
        if len({(m.in_features, m.group, m.bias is None) for m in layers}) != 1:
            return None
        bias = torch.cat([m.bias for m in layers]) if layers[0].bias is not None else None
        return cls(torch.cat([m.codes for m in layers]), torch.cat([m.scale_zero for m in layers], dim=1),
                   layers[0].in_features, bias, layers[0].group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_zero)
        if self.bias is not None:
            y = y.float() + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
                f"bias={self.bias is not None}")


# Linear layers read through their `.weight` by the module that owns them (torch's fused attention and
# encoder-layer fast paths) cannot be swapped for a module without one.
_KEEP_FLOAT_PARENTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def quantize_linears(module: nn.Module, method: str) -> list[str]:
    """Replace (in place) every nn.Linear in `module` by an Int8Linear ('int8') or Int4Linear ('int4');
    returns the names replaced. Linears inside torch's MultiheadAttention / Transformer*Layer stay float
    (those read `.weight` directly), and so, for int4, do shapes the int4 kernel does not take."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantize {method!r}: use one of {', '.join(QUANTIZATIONS)}")
    done: list[str] = []
    for parent_name, parent in list(module.named_modules()):
        if isinstance(parent, _KEEP_FLOAT_PARENTS):
            continue
        for name, child in list(parent.named_children()):
            if not (isinstance(child, nn.Linear) and child.weight.is_floating_point()):
                continue
            if method == "int8":
                new: nn.Module = Int8Linear.from_linear(child).to(child.weight.device)
            elif Int4Linear.supports(child):
                new = Int4Linear.from_linear(child)
            else:
                continue
            setattr(parent, name, new)
            done.append(f"{parent_name}.{name}" if parent_name else name)
    return done


class PackedInt8Weight:
    """An int8 weight (V, d) with per-row scales pre-packed for oneDNN's int8 matmul, for inputs of several rows.

    torch._int_mm re-derives what it needs from the plain int8 weight on every call; for more than one
    input row that costs about twice the memory-bound time of the product (0.95 ms vs 0.58 ms for 8 rows x
    the tiny thinker's 32000 x 256 vocabulary projection, cold cache, on the development CPU). Packing once
    avoids it. Inputs are signed int8 rows; oneDNN takes them as uint8 with zero point 128 (the same integers:
    flipping the sign bit adds 128), so the products stay exact and `__call__` returns exactly
    `torch._int_mm(xq, qweight.t()) * scale`. `build` returns None where this torch lacks the ops or they
    do not give that exact result.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        self.packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        self.scale = scale.float().contiguous()
        self.zero_points = torch.zeros(qweight.shape[0], dtype=torch.long)

    @classmethod
    def build(cls, qweight: torch.Tensor, scale: torch.Tensor) -> "PackedInt8Weight | None":
        if qweight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return None
        try:
            packed = cls(qweight, scale)
            probe = torch.randint(-QMAX, QMAX + 1, (3, qweight.shape[1]), dtype=torch.int8,
                                  generator=torch.Generator().manual_seed(0))
            if torch.equal(packed(probe), torch._int_mm(probe, qweight.t()) * scale):
                return packed
        except (AttributeError, RuntimeError):
            pass
        return None

    def __call__(self, xq: torch.Tensor) -> torch.Tensor:
        xu = xq.contiguous().view(torch.uint8) ^ 128  # x + 128 as uint8
        return torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, self.packed, self.scale, self.zero_points, None,
                                                  1.0, 0, torch.float32, "none", [None], "")


class GreedyHead:
    """Exact greedy argmax of a projection `x @ W^T` (W: (V, d), float32 / bfloat16 / float16) that reads W
    as int8 first.

    Decoding on a CPU is limited by memory traffic, and the vocabulary projection is the biggest read of
    a step (32000 x 256 float32 = 33 MB for the tiny thinker). Here the int8 copy (a quarter of that) gives
    approximate scores a_j = step_x * s_j * (q_x . q_j), exact up to the two roundings, whose error obeys
        |x.w_j - a_j| <= |x|_1 * max_i|w_ji - s_j q_ji| + (step_x / 2) * (|w_j|_1 + |w_j - s_j q_j|_1)
    plus the float rounding of the true scores (their summation, and for 16-bit weights the rounding of the
    output to 16 bits). With that bound b, no row scoring below best(a) - 2b can be the argmax, so the rows
    at or above that threshold are the only candidates; their scores are computed exactly (float32 sums,
    rounded to the weight's dtype, as a matmul would give) and the best taken, ties to the lowest id.
    Where more than `k` rows are candidates (near-ties the int8 copy cannot separate), that input row is
    undecided: `argmax` hands it to `fallback` (the full projection's argmax), or without one returns None.

    A threshold rather than a top-k: a top-k over the vocabulary costs about as much as the int8 matmul per
    input row, a comparison a small fraction of it. Every step after the exact int8 product is elementwise
    or per input row, so a row's answer does not depend on the other rows of the batch (batched decoding
    returns what decoding each row alone would). The answer is that of the full matmul up to the order of
    additions inside the kernels (as between any two matmul kernels).
    """

    SLACK = 1.001  # relative slack on the bound (its own terms are computed in float32)
    OUTPUT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}

    def __init__(self, weight: torch.Tensor, k: int = 64) -> None:
        w = weight.detach().float()
        self.weight = weight.detach()
        if not 0 < k < w.shape[0]:
            raise ValueError(f"GreedyHead: k {k} must be in 1..{w.shape[0] - 1}")
        self.k = k
        self.qweight, self.scale = quantize_int8(w)
        err = (w - dequantize_int8(self.qweight, self.scale)).abs()
        self.err_max = float(err.amax())  # max_ji |w_ji - s_j q_ji|
        n1 = w.abs().sum(1) + err.sum(1)
        # float32 summation error of the true scores: |fl(x.w) - x.w| <= d * 2^-24 * |x|_1 * max|w| (x2 margin)
        self.fp_term = w.shape[1] * 2.0 ** -23 * float(w.abs().amax())
        self.half_n1_max = 0.5 * float(n1.amax())
        self.out_round = self.OUTPUT_ROUNDING[weight.dtype]
        self.packed = PackedInt8Weight.build(self.qweight, self.scale)
        # the largest divisor of V up to 64 (any divisor is correct; 64 measured best for V = 32000)
        self.block = max(b for b in range(1, 65) if w.shape[0] % b == 0)

    def scaled_scores(self, xq: torch.Tensor) -> torch.Tensor:
        """(q_x . q_j) * s_j, float32 (B, V): the int8 product (exact) times each row's scale (one rounding),
        through the pre-packed copy where this torch has it (same numbers, checked when built; 4.7x faster
        than torch._int_mm for one row and 3.5x for 8 on the Xeon (AVX-512) of the current measurements)."""
        if self.packed is not None:
            return self.packed(xq)
        return torch._int_mm(xq, self.qweight.t()) * self.scale

    def candidates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, decided): the (input row, vocabulary id) pairs that may hold each input row's argmax,
        row-major, and per input row whether it is decided (finite scores and 1..k candidates).

        The threshold is tested on block maxima first and inside the few blocks that reach it after: a
        comparison and a nonzero over all B x V scores cost about a third of the int8 matmul for 8 rows."""
        xq, step = quantize_rows(x)
        approx = self.scaled_scores(xq)  # the scores divided by the row's step (> 0): the same order
        B, V = approx.shape
        blocks = approx.view(B, V // self.block, self.block)
        block_best = blocks.amax(-1)  # (B, V / block); NaN propagates to `best`
        best = block_best.amax(-1, keepdim=True)
        bound = (x.float().abs().sum(-1, keepdim=True) * (self.err_max + self.fp_term) / step
                 + self.half_n1_max) * self.SLACK
        if self.out_round:  # a 16-bit output may round by `out_round` relative; solved for the bound itself
            bound = (bound + self.out_round * best.abs()) / (1 - self.out_round)
        threshold = best - 2 * bound  # (B, 1): nothing below it can be the argmax; NaN if x or W is not finite
        block_rows, block_ids = (block_best >= threshold).nonzero(as_tuple=True)
        inside, offset = (blocks[block_rows, block_ids] >= threshold.index_select(0, block_rows)
                          ).nonzero(as_tuple=True)
        rows = block_rows.index_select(0, inside)
        cols = block_ids.index_select(0, inside) * self.block + offset
        count = torch.bincount(rows, minlength=B)
        decided = threshold[:, 0].isfinite() & (count >= 1) & (count <= self.k)
        return rows, cols, decided

    def argmax(self, x: torch.Tensor, fallback: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> torch.Tensor | None:
        """Argmax over V of x @ W^T for x (B, d) in the weight's dtype. Rows the screen cannot decide go to
        `fallback(x_rows) -> ids`; without a fallback, any undecided row makes the result None."""
        rows, cols, decided = self.candidates(x)
        all_decided = bool(decided.all())
        if not all_decided:
            if fallback is None:
                return None
            keep = decided[rows]
            rows, cols = rows[keep], cols[keep]
        # exact scores: float32 products and sums (exact products for 16-bit weights), rounded as a matmul's
        exact = (self.weight.index_select(0, cols).float() * x.index_select(0, rows).float()).sum(-1)
        exact = exact.to(self.weight.dtype)
        B, V = x.shape[0], self.weight.shape[0]
        best = exact.new_full((B,), float("-inf")).scatter_reduce(0, rows, exact, "amax")
        top_cols = torch.where(exact == best.index_select(0, rows), cols, V)
        ids = cols.new_full((B,), V).scatter_reduce(0, rows, top_cols, "amin")  # ties: lowest id, as argmax
        if not all_decided:
            undecided = (~decided).nonzero().squeeze(-1)
            ids = ids.index_copy(0, undecided, fallback(x.index_select(0, undecided)).to(ids.dtype))
        return ids


def greedy_head_supported(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (bias is None and weight.dtype in GreedyHead.OUTPUT_ROUNDING and weight.device.type == "cpu"
            and weight.ndim == 2 and hasattr(torch, "_int_mm"))
