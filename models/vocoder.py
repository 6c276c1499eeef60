"""Mel -> waveform: the HiFi-GAN generator (trained vocoder) and Griffin-Lim (when none is available)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.1


@dataclass
class HiFiGANConfig:
    n_mels: int = 128
    upsample_initial_channel: int = 128
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 5, 7)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = field(default=((1, 2), (1, 2), (1, 2)))

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.upsample_rates:
            hop *= r
        return hop

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], dilations: list | None = None,
                        rates: list | None = None) -> "HiFiGANConfig":
        n_ups = len({k.split(".")[1] for k in sd if k.startswith("ups.")})
        kernels = tuple(sd[f"ups.{i}.weight"].shape[2] for i in range(n_ups))
        n_kernels = len({k.split(".")[1] for k in sd if k.startswith("resblocks.")}) // n_ups
        rb_kernels = tuple(sd[f"resblocks.{j}.convs1.0.weight"].shape[2] for j in range(n_kernels))
        n_dil = len({k.split(".")[3] for k in sd if k.startswith("resblocks.0.convs1.")})
        dils = tuple(tuple(d) for d in dilations) if dilations else tuple((1, 2)[:n_dil] for _ in rb_kernels)
        return cls(n_mels=sd["conv_pre.weight"].shape[1], upsample_initial_channel=sd["conv_pre.weight"].shape[0],
                   upsample_rates=tuple(rates) if rates else tuple(k // 2 for k in kernels),
                   upsample_kernel_sizes=kernels, resblock_kernel_sizes=rb_kernels, resblock_dilation_sizes=dils)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel - 1) * d // 2)
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)
                                    for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class HiFiGANGenerator(nn.Module):
    def __init__(self, cfg: HiFiGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.n_mels, c, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(c >> i, c >> (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        self.resblocks = nn.ModuleList(
            ResBlock(c >> (i + 1), k, tuple(d))
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = nn.Conv1d(c >> len(self.ups), 1, 7, padding=3)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, T) -> waveform (B, 1, T * hop); the mel is min-max normalised first."""
        lo, hi = mel.amin(dim=(1, 2), keepdim=True), mel.amax(dim=(1, 2), keepdim=True)
        x = self.conv_pre((mel - lo) / (hi - lo + 1e-8))
        n_k = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            x = sum(self.resblocks[i * n_k + j](x) for j in range(n_k)) / n_k
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


# ---------------------------------------------------------------- Griffin-Lim (no trained vocoder needed)

def mel_to_magnitude(mel_power: torch.Tensor, filterbank: torch.Tensor) -> torch.Tensor:
    """Power mel (T, n_mels) -> linear magnitude spectrogram (n_freqs, T) through the filterbank's
    pseudo-inverse (`filterbank` is (n_freqs, n_mels), as `mel = power_spec @ filterbank`)."""
    inverse = torch.linalg.pinv(filterbank.double()).float()  # (n_mels, n_freqs)
    power = (mel_power.float().clamp(min=0.0) @ inverse).clamp(min=0.0)
    return power.sqrt().transpose(0, 1).contiguous()


def griffin_lim(magnitude: torch.Tensor, n_fft: int, hop_length: int, win_length: int, n_iter: int = 32,
                momentum: float = 0.99, length: int | None = None, seed: int = 0,
                progress: "callable | None" = None) -> torch.Tensor:
    """Waveform whose STFT magnitude approximates `magnitude` (n_freqs, frames), by fast Griffin-Lim
    (phase retrieval with momentum). Deterministic: the initial phases come from `seed`."""
    if win_length > n_fft or hop_length > win_length:
        raise ValueError(f"Griffin-Lim needs hop <= win <= n_fft (got hop {hop_length}, win {win_length}, "
                         f"n_fft {n_fft}): overlapping frames are what makes the inverse STFT defined")
    window = torch.hann_window(win_length, device=magnitude.device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    phase = torch.rand(magnitude.shape, generator=g).to(magnitude.device) * (2 * torch.pi)
    angles = torch.polar(torch.ones_like(magnitude), phase)
    previous = torch.zeros_like(angles)
    stft = dict(n_fft=n_fft, hop_length=hop_length, win_length=win_length, window=window, center=True)
    for _ in range(n_iter):
        wave = torch.istft(magnitude * angles, length=length, **stft)
        rebuilt = torch.stft(wave, pad_mode="reflect", return_complex=True, **stft)
        angles = rebuilt - previous * (momentum / (1 + momentum)) if momentum else rebuilt
        angles = angles / angles.abs().clamp(min=1e-16)
        previous = rebuilt
        if progress is not None:
            progress(1)
    return torch.istft(magnitude * angles, length=length, **stft)
