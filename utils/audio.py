"""Audio in and out as pure functions: load, resample, power mel spectrogram, WAV writing."""
from __future__ import annotations

import io
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


# Resource guards (documented in --help).
MAX_AUDIO_SECONDS = 600.0  # longest audio decoded whole (transcription); longer files are refused
DECODE_BLOCK_FRAMES = 1 << 18  # frames read per block: memory follows the audio really decoded, not the header


def max_audio_seconds(ctx_len: int, downsample: int) -> float:
    """Longest audio a prompt can use: `ctx_len // 4` audio tokens, each `downsample` mel frames of HOP_LENGTH
    samples at SAMPLE_RATE (ctx_len 512, downsample 8: 128 tokens = 10.24 s)."""
    return (ctx_len // 4) * downsample * HOP_LENGTH / SAMPLE_RATE


def trim_audio(wave: np.ndarray, max_seconds: float, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, bool]:
    """The first `max_seconds` of a waveform and whether anything was cut (done before the mel spectrogram,
    so a long recording costs no more than the part the model can use)."""
    limit = max(1, int(max_seconds * sample_rate))
    return (wave[:limit], True) if wave.shape[-1] > limit else (wave, False)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """First channel of a wav/flac/ogg/mp3 file as float32 mono at `sample_rate`.

    With `max_seconds` only the start of the file is decoded (never more than that many seconds, whatever the
    header claims); without, the whole file is decoded and files longer than MAX_AUDIO_SECONDS are refused."""
    path = Path(path)
    if not path.is_file():
        raise OmniError(f"audio file {path}: not found" if not path.exists() else f"audio file {path}: not a file")
    if path.stat().st_size == 0:
        raise OmniError(f"audio file {path}: is empty")
    return _decode_audio(str(path), f"audio file {path}", sample_rate, max_seconds)


def load_audio_bytes(data: bytes, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None,
                     label: str = "audio") -> np.ndarray:
    """`load_audio` for audio held in memory (e.g. uploaded to the server); `label` names it in errors."""
    if not data:
        raise OmniError(f"{label}: is empty")
    return _decode_audio(io.BytesIO(data), label, sample_rate, max_seconds)


def _decode_audio(source: str | io.BytesIO, label: str, sample_rate: int, max_seconds: float | None) -> np.ndarray:
    """Decode block by block, never more than the limit (see load_audio)."""
    try:
        with sf.SoundFile(source) as f:
            sr, declared = f.samplerate, f.frames
            if sr <= 0:
                raise OmniError(f"{label}: invalid sample rate {sr}")
            if max_seconds is None:
                if declared > MAX_AUDIO_SECONDS * sr:
                    raise OmniError(f"{label}: {declared / sr:.0f} s long (by its header), over the "
                                    f"limit of {MAX_AUDIO_SECONDS:.0f} s of audio decoded at once")
                wanted = int(MAX_AUDIO_SECONDS * sr) + 1
            else:
                wanted = max(1, int(np.ceil(max_seconds * sr)))
            blocks, got = [], 0
            while got < wanted:
                block = f.read(min(DECODE_BLOCK_FRAMES, wanted - got), dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                blocks.append(np.array(block[:, 0], dtype=np.float32))  # first channel only, copied
                got += block.shape[0]
    except OmniError:
        raise
    except Exception as exc:  # soundfile raises several types for unreadable data
        raise OmniError(f"{label}: cannot decode ({str(exc).strip() or type(exc).__name__})") from exc
    if got == 0:
        raise OmniError(f"{label}: contains no samples")
    if max_seconds is None and got > MAX_AUDIO_SECONDS * sr:
        raise OmniError(f"{label}: longer than the limit of {MAX_AUDIO_SECONDS:.0f} s of audio decoded "
                        f"at once")
    wave = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    if not np.isfinite(wave).all():
        raise OmniError(f"{label}: contains NaN or infinite samples")
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


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def check_output_path(path: str | os.PathLike, flag: str = "--audio_out") -> Path:
    """Fail early, before any work, when a WAV cannot be written at `path`: empty, a directory, a missing or
    non-directory parent, a name the filesystem refuses, or a place where no file can be created (probed by
    creating and removing the temp file `write_wav` will use). Returns the path."""
    if not str(path).strip():
        raise OmniError(f"{flag}: the path is empty")
    path = Path(path)
    try:
        if path.is_dir():
            raise OmniError(f"{flag} {path}: is a directory")
        if not path.parent.is_dir():
            raise OmniError(f"{flag} {path}: directory {path.parent} does not exist" if not path.parent.exists()
                            else f"{flag} {path}: {path.parent} is not a directory")
        if path.exists() and not path.is_file():
            return path  # /dev/null, a FIFO: written in place
        tmp = temp_path(path)
        with open(tmp, "wb"):
            pass
        tmp.unlink()
    except OSError as exc:
        raise OmniError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from exc
    return path


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE,
              flag: str = "--audio_out") -> None:
    """Write 16-bit PCM mono atomically: a temp file in the same directory, then rename, so a failure never
    leaves a partial file. An existing non-regular target (/dev/null, a FIFO) is written in place instead:
    renaming over it would replace the device or pipe with a plain file."""
    path = check_output_path(path, flag)
    data = np.clip(np.nan_to_num(np.asarray(wave, dtype=np.float32)), -1.0, 1.0)
    if path.exists() and not path.is_file():
        try:
            with open(path, "wb") as f:
                sf.write(f, data, sample_rate, subtype="PCM_16", format="WAV")
        except Exception as exc:  # soundfile reports unwritable targets as RuntimeError/TypeError
            raise OmniError(f"{flag} {path}: cannot write ({str(exc).strip() or type(exc).__name__})") from exc
        return
    tmp = temp_path(path)
    try:
        sf.write(str(tmp), data, sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # soundfile reports unwritable paths as RuntimeError
        raise OmniError(f"{flag} {path}: cannot write ({str(exc).strip() or type(exc).__name__})") from exc
    finally:
        try:
            tmp.unlink()
        except OSError:  # already renamed, never created, or its name is unusable
            pass


def wav_bytes(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit PCM mono WAV file in memory (what the server sends back), clipped to [-1, 1] as write_wav does."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.nan_to_num(np.asarray(wave, dtype=np.float32)), -1.0, 1.0), sample_rate,
             subtype="PCM_16", format="WAV")
    return buf.getvalue()
