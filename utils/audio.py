"""Audio in and out as pure functions: load, resample, power mel spectrogram, WAV writing."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from utils.errors import OmniError

SAMPLE_RATE = 16000
N_FFT = 1024
HOP_LENGTH = 160
WIN_LENGTH = 400
N_MELS = 128


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """First channel of a wav/flac/ogg file as float32 mono at `sample_rate`."""
    path = Path(path)
    if not path.is_file():
        raise OmniError(f"audio file {path}: not found" if not path.exists() else f"audio file {path}: not a file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for unreadable data
        raise OmniError(f"audio file {path}: cannot decode ({exc})") from exc
    if data.shape[0] == 0:
        raise OmniError(f"audio file {path}: contains no samples")
    wave = np.ascontiguousarray(data[:, 0])
    if not np.isfinite(wave).all():
        raise OmniError(f"audio file {path}: contains NaN or infinite samples")
    return resample(wave, sr, sample_rate)


def resample(wave: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    if src_rate == dst_rate:
        return wave.astype(np.float32, copy=False)
    return soxr.resample(wave, src_rate, dst_rate).astype(np.float32, copy=False)


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int = N_FFT // 2 + 1, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE,
                   f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """Triangular HTK filters without area normalisation, shape (n_freqs, n_mels)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    edges = torch.from_numpy(mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))).float()
    widths = edges[1:] - edges[:-1]
    offsets = edges[None, :] - freqs[:, None]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


_FILTERS: dict[tuple, torch.Tensor] = {}


def power_mel(wave: np.ndarray | torch.Tensor, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
              win_length: int = WIN_LENGTH, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Power mel spectrogram (T, n_mels): centred reflect-padded STFT, periodic Hann, HTK bands, no log."""
    x = torch.as_tensor(wave, dtype=torch.float32)
    if x.shape[-1] <= n_fft // 2:  # reflect padding needs more samples than half a frame
        x = torch.nn.functional.pad(x, (0, n_fft // 2 + 1 - x.shape[-1]))
    spec = torch.stft(x, n_fft, hop_length=hop_length, win_length=win_length,
                      window=torch.hann_window(win_length), center=True, pad_mode="reflect",
                      return_complex=True).abs().pow(2)
    key = (n_fft, n_mels, sample_rate)
    if key not in _FILTERS:
        _FILTERS[key] = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate)
    return (spec.transpose(-1, -2) @ _FILTERS[key]).contiguous()


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write 16-bit PCM mono atomically: a temp file in the same directory, then rename."""
    path = Path(path)
    if path.is_dir():
        raise OmniError(f"--audio_out {path}: is a directory")
    if not path.parent.is_dir():
        raise OmniError(f"--audio_out {path}: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        sf.write(str(tmp), np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # soundfile reports unwritable paths as RuntimeError
        raise OmniError(f"--audio_out {path}: cannot write ({exc})") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
