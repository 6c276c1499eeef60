"""The μOmni OCR model (MUOMNI_OCR §3): a ViTTiny over the image and a character decoder whose blocks add a
cross-attention to the image patches between the thinker's causal self-attention and its FFN.

Greedy decoding (`greedy`) keeps the self-attention keys/values in a KVCache and projects the image keys/values
once per image, so each step runs one position; it gives the ids of a full recompute over the whole sequence
(`logits`) at every step."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import Attention, KVCache, RMSNorm, Rotary, count_blocks, linear, make_ffn
from models.vision import ViTConfig, ViTTiny

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # MUOMNI_OCR §2: the vocabulary's first four ids
SPECIAL_TOKENS = ("<PAD>", "<BOS>", "<EOS>", "<UNK>")
ROPE_THETA = 10000.0  # the decoder's RoPE base, whatever the config's rope_theta says (§1)


@dataclass
class OCRConfig:
    vision: ViTConfig
    vocab_size: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 1024
    fused_qkv: bool = True  # MHA `qkv`; False: GQA q/k/v
    ffn: str = "swiglu"
    max_positions: int = 1024  # RoPE table length: a decode may run max_positions - 1 steps

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], vision_heads: int = 2, decoder_heads: int = 4
                        ) -> "OCRConfig":
        """Dimensions off the tensor shapes (`vision_encoder.*`, `decoder.*`, `_orig_mod.` already stripped); the
        head counts are not in the shapes and come from the config."""
        vit = {k[len("vision_encoder."):]: v for k, v in sd.items() if k.startswith("vision_encoder.")}
        vision = ViTConfig.from_state_dict(vit, n_heads=vision_heads)
        vocab, d = sd["decoder.char_embed.weight"].shape
        p = "decoder.blocks.0."
        fused = f"{p}self_attn.qkv.weight" in sd
        n_kv = decoder_heads if fused else sd[f"{p}self_attn.k.weight"].shape[0] // (d // decoder_heads)
        swiglu = f"{p}mlp.gate_proj.weight" in sd
        d_ff = sd[f"{p}mlp.gate_proj.weight" if swiglu else f"{p}mlp.fc1.weight"].shape[0]
        return cls(vision=vision, vocab_size=vocab, d_model=d, n_layers=count_blocks(sd, "decoder.blocks."),
                   n_heads=decoder_heads, n_kv_heads=n_kv, d_ff=d_ff, fused_qkv=fused,
                   ffn="swiglu" if swiglu else "gelu")


class CrossAttention(nn.Module):
    """torch.nn.MultiheadAttention(d, h, batch_first=True)'s formula and parameter names, as plain tensor ops, so
    the image's keys and values can be projected once (`memory`) and reused at every decode step."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention initialises them (for training)
        nn.init.zeros_(self.out_proj.bias)

    def memory(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the image tokens m (B, N, d): each (B, h, N, hd)."""
        d = m.shape[-1]
        kv = F.linear(m, self.in_proj_weight[d:], self.in_proj_bias[d:])
        k, v = kv.view(m.shape[0], m.shape[1], 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) attending to every image token (no mask, no positions), scale hd^-0.5."""
        B, T, d = x.shape
        q = F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d])
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys, values)
        return linear(self.out_proj, out.transpose(1, 2).reshape(B, T, d))


class DecoderBlock(nn.Module):
    """x += o(self_attn(norm1(x))); x += cross_attn(norm2(x), image); x += mlp(norm3(x))."""

    def __init__(self, cfg: OCRConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model)
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.fused_qkv)
        self.norm2 = RMSNorm(cfg.d_model)
        self.cross_attn = CrossAttention(cfg.d_model, cfg.n_heads)
        self.norm3 = RMSNorm(cfg.d_model)
        self.mlp = make_ffn(cfg.ffn, cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, cache: KVCache | None,
                start: int, memory: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), cos, sin, layer, cache, start, None)
        x = x + self.cross_attn(self.norm2(x), *memory)
        return x + self.mlp(self.norm3(x))


class CharDecoder(nn.Module):
    def __init__(self, cfg: OCRConfig) -> None:
        super().__init__()
        self.char_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.img_proj = nn.Linear(cfg.vision.d_model, cfg.d_model)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.max_positions, ROPE_THETA)


class OCRModel(nn.Module):
    """`vision_encoder` (ViTTiny) + `decoder` (CharDecoder): the state dict keys of μOmni's OCRModel."""

    def __init__(self, cfg: OCRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_encoder = ViTTiny(cfg.vision)
        self.decoder = CharDecoder(cfg)

    def memory(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per decoder layer, the cross-attention keys and values of `images` (B, 3, S, S): computed once."""
        _, grid = self.vision_encoder(images)  # the CLS token is not used
        m = linear(self.decoder.img_proj, grid)
        return [block.cross_attn.memory(m) for block in self.decoder.blocks]

    def run(self, ids: torch.Tensor, memory: list[tuple[torch.Tensor, torch.Tensor]], start: int = 0,
            cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) for `ids` (B, T) at positions start..start+T (all earlier ones in `cache`)."""
        dec = self.decoder
        x = dec.char_embed(ids)
        cos, sin = dec.rotary.tables(start, ids.shape[1], None)
        for i, block in enumerate(dec.blocks):
            x = block(x, cos, sin, i, cache, start, memory[i])
        return linear(dec.head, dec.norm(x))

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The full causal forward over `ids` (B, T) (teacher forcing): (B, T, V)."""
        return self.run(ids, self.memory(images))

    @torch.inference_mode()
    def greedy(self, image: torch.Tensor, max_len: int) -> tuple[list[int], str]:
        """Greedy ids for one image (3, S, S) (MUOMNI_OCR §4): argmax (first maximum) up to `max_len` times from
        [<BOS>], stopping at <EOS> or <PAD>, which is the last id returned; and why it stopped ('eos', 'pad' or
        'max_len'). One position per step through the self-attention cache."""
        if not 1 <= max_len < self.cfg.max_positions:
            raise ValueError(f"max_len {max_len}: must be 1 to {self.cfg.max_positions - 1}")
        p = self.decoder.norm.weight
        memory = self.memory(image[None].to(p.device, p.dtype))
        cfg = self.cfg
        cache = KVCache(cfg.n_layers, 1, cfg.n_kv_heads, max_len, cfg.d_model // cfg.n_heads, p.dtype, p.device)
        token = torch.full((1, 1), BOS_ID, dtype=torch.long, device=p.device)
        ids: list[int] = []
        for pos in range(max_len):
            token = self.run(token, memory, pos, cache)[:, -1].argmax(-1, keepdim=True)
            ids.append(int(token))
            if ids[-1] in (EOS_ID, PAD_ID):
                return ids, "eos" if ids[-1] == EOS_ID else "pad"
        return ids, "max_len"

