"""Audio in and out as pure functions: load, resample, power mel spectrogram, WAV writing."""
from __future__ import annotations

import io
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import soundfile as sf
import soxr
import torch

from utils.base.errors import OmniError
from utils.base.fileio import temp_path, write_atomic
from utils.media.ffmpeg import open_container

SAMPLE_RATE = 16000
N_FFT = 1024
HOP_LENGTH = 160
WIN_LENGTH = 400
N_MELS = 128


# Resource guards (documented in --help).
MAX_AUDIO_SECONDS = 600.0  # longest audio load_audio decodes whole; longer files are refused (transcription streams)
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


def load_audio(path: str | os.PathLike | BinaryIO, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """First channel of an audio file (see `open_audio` for the formats) as float32 mono at `sample_rate`.

    With `max_seconds` only the start of the file is decoded (never more than that many seconds, whatever the
    header claims); without, the whole file is decoded and files longer than MAX_AUDIO_SECONDS are refused."""
    with ExitStack() as stack:
        what, sr, declared, blocks = open_audio(stack, path)
        if max_seconds is None:
            if declared > MAX_AUDIO_SECONDS * sr:
                raise OmniError(f"{what}: {declared / sr:.0f} s long (by its header), over the "
                                f"limit of {MAX_AUDIO_SECONDS:.0f} s of audio decoded at once")
            wanted = int(MAX_AUDIO_SECONDS * sr) + 1
        else:
            wanted = max(1, int(np.ceil(max_seconds * sr)))
        kept, got = [], 0
        for block in decoded(blocks, what):
            kept.append(np.array(block[:wanted - got], dtype=np.float32))  # copied: decoders reuse buffers
            got += kept[-1].shape[0]
            if got >= wanted:
                break
    if got == 0:
        raise OmniError(f"{what}: contains no samples")
    if max_seconds is None and got > MAX_AUDIO_SECONDS * sr:
        raise OmniError(f"{what}: longer than the limit of {MAX_AUDIO_SECONDS:.0f} s of audio decoded "
                        f"at once")
    wave = np.concatenate(kept) if len(kept) > 1 else kept[0]
    check_wave(wave, what)
    return resample(wave, sr, sample_rate)


def check_audio_path(path: str | os.PathLike) -> Path:
    """An existing, non-empty regular file, else OmniError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise OmniError(f"audio file {path}: not found" if not path.exists() else f"audio file {path}: not a file")
    if path.stat().st_size == 0:
        raise OmniError(f"audio file {path}: is empty")
    return path


def audio_seconds(path: str | os.PathLike) -> float | None:
    """Duration claimed by the file's header (None when the format does not say); for progress bars only."""
    try:
        info = sf.info(os.fsencode(path))
    except Exception:  # unreadable or not libsndfile's: reading it reports the problem properly
        return None
    return info.frames / info.samplerate if info.samplerate > 0 and info.frames > 0 else None


def open_audio(stack: ExitStack, source: str | os.PathLike | BinaryIO) -> tuple[str, int, int, Iterator[np.ndarray]]:
    """(what to call it in messages, sample rate, frames by the header or 0, first-channel float32 blocks) of an audio
    file, a path or an open binary file such as an upload, closed with `stack`. What libsndfile reads (wav,
    flac, ogg, mp3, ...) is decoded by soundfile; other containers (m4a/AAC, mp4, webm, mkv, ...: a video's
    sound track) by FFmpeg through PyAV, under the guards of utils.media.ffmpeg."""
    if hasattr(source, "read"):
        what = str(getattr(source, "name", None) or "audio stream")
        opened: Any = source
    else:
        opened = check_audio_path(source)
        what = f"audio file {opened}"
    try:  # a path goes to libsndfile as bytes: any file name, UTF-8 or not
        f = stack.enter_context(sf.SoundFile(os.fsencode(opened) if isinstance(opened, Path) else opened))
        sr, declared, blocks = f.samplerate, f.frames, soundfile_blocks(f, DECODE_BLOCK_FRAMES)
    except Exception as sf_exc:  # soundfile raises several types for data it cannot read
        if hasattr(opened, "seek"):
            opened.seek(0)
        sr, declared, blocks = av_audio(stack, opened, what, sf_exc)
    if sr <= 0:
        raise OmniError(f"{what}: cannot decode (invalid sample rate {sr})")
    return what, sr, declared, blocks


def decoded(blocks: Iterator[np.ndarray], what: str) -> Iterator[np.ndarray]:
    """`blocks`, with either decoder's errors on corrupt data turned into OmniError naming the file."""
    while True:
        try:
            block = next(blocks, None)
        except Exception as exc:  # soundfile and PyAV raise their own error families
            raise OmniError(f"{what}: cannot decode ({reason(exc)})") from exc
        if block is None:
            return
        yield block


def stream_audio(source: str | os.PathLike | BinaryIO, max_seconds: float, sample_rate: int = SAMPLE_RATE
                 ) -> Iterator[np.ndarray]:
    """The first channel of an audio file (as `open_audio`) as float32 blocks at `sample_rate`, decoded and
    resampled block by block, so memory stays the same whatever the length. Audio longer than `max_seconds`
    (by its header, or by what is actually decoded) is refused with OmniError."""
    with ExitStack() as stack:
        what, sr, declared, blocks = open_audio(stack, source)
        too_long = f"over the transcription limit of {max_seconds:.0f} s"
        if declared > max_seconds * sr:
            raise OmniError(f"{what}: {declared / sr:.0f} s long (by its header), {too_long}")
        stream = None if sr == sample_rate else soxr.ResampleStream(sr, sample_rate, 1, dtype="float32")
        got = 0
        for mono in decoded(blocks, what):
            got += mono.shape[0]
            if got > max_seconds * sr:
                raise OmniError(f"{what}: longer than {max_seconds:.0f} s, {too_long}")
            check_wave(mono, what)
            out = mono if stream is None else stream.resample_chunk(mono)
            if out.size:
                yield out
        if got == 0:
            raise OmniError(f"{what}: contains no samples")
        if stream is not None:
            tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
            if tail.size:
                yield tail


def soundfile_blocks(f: sf.SoundFile, block_frames: int) -> Iterator[np.ndarray]:
    while True:
        block = f.read(block_frames, dtype="float32", always_2d=True)
        if block.shape[0] == 0:
            return
        yield np.ascontiguousarray(block[:, 0])


def av_audio(stack: ExitStack, opened: Any, what: str, sf_exc: Exception) -> tuple[int, int, Iterator[np.ndarray]]:
    """(sample rate, frames by the header or 0, first-channel float32 blocks) of a container's first audio
    stream, through PyAV; OmniError naming both decoders' complaints when neither can read it."""
    import av  # imported here: only containers libsndfile cannot read need PyAV

    try:
        container = stack.enter_context(open_container(opened, what))
    except OmniError:
        raise
    except Exception as exc:  # PyAV raises its own error family for unreadable containers
        raise OmniError(f"{what}: cannot decode (libsndfile: {reason(sf_exc)}; FFmpeg: {reason(exc)})") \
            from exc
    if not container.streams.audio:
        raise OmniError(f"{what}: has no audio stream")
    stream = container.streams.audio[0]
    sr = stream.codec_context.sample_rate or 0
    seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else \
        (container.duration or 0) / 1_000_000
    to_float = av.AudioResampler(format="fltp")  # sample format only: channels and rate as they are

    def blocks() -> Iterator[np.ndarray]:
        for frame in container.decode(stream):
            for converted in to_float.resample(frame):
                yield np.ascontiguousarray(converted.to_ndarray()[0], dtype=np.float32)
        for converted in to_float.resample(None):
            yield np.ascontiguousarray(converted.to_ndarray()[0], dtype=np.float32)
    return sr, int(seconds * sr), blocks()


def reason(exc: Exception) -> str:
    return str(exc).strip() or type(exc).__name__


MAX_PEAK = 65536.0  # full scale is 1.0; float files holding raw 16-bit values reach 32768, nothing real goes beyond


def load_audio_bytes(data: bytes, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None,
                     label: str = "audio") -> np.ndarray:
    """`load_audio` for audio held in memory (e.g. uploaded to the server); `label` names it in errors."""
    if not data:
        raise OmniError(f"{label}: is empty")
    buffer = io.BytesIO(data)
    buffer.name = label
    return load_audio(buffer, sample_rate, max_seconds)


def check_wave(wave: np.ndarray, what: str) -> None:
    """Samples must be finite and near full scale: a float file peaking at 1e30 overflows the power spectrum to
    inf/NaN, and the model would answer (or transcribe) nothing without a word."""
    if not np.isfinite(wave).all():
        raise OmniError(f"{what}: contains NaN or infinite samples")
    peak = float(np.abs(wave).max(initial=0.0))
    if peak > MAX_PEAK:
        raise OmniError(f"{what}: samples reach {peak:.3g}, over {MAX_PEAK:g} times full scale (1.0); rescale "
                        f"the recording")


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


def same_file_as_std_stream(path: Path) -> str | None:
    """'standard output' or 'standard error' when `path` (e.g. /dev/stdout, /proc/self/fd/1) is that stream:
    stdout carries the answers and stderr the messages, so a WAV written there would be mixed with text."""
    try:
        st = path.stat()
    except OSError:  # not there yet: a new file, not a stream
        return None
    for fd, name in ((1, "standard output"), (2, "standard error")):
        try:
            if os.path.samestat(st, os.fstat(fd)):
                return name
        except OSError:  # that descriptor is closed
            continue
    return None


def check_output_path(path: str | os.PathLike, flag: str = "--audio_out") -> Path:
    """Fail early, before any work, when a WAV cannot be written at `path`: empty, a directory, a missing or
    non-directory parent, this program's own stdout/stderr, a name the filesystem refuses, or a place where no
    file can be created (probed by creating and removing the temp file `write_wav` will use). Returns the path to
    write: a symlink's target, so the link stays a link."""
    if not str(path).strip():
        raise OmniError(f"{flag}: the path is empty")
    path = Path(path)
    try:
        if path.is_dir():
            raise OmniError(f"{flag} {path}: is a directory")
        if not path.parent.is_dir():
            raise OmniError(f"{flag} {path}: directory {path.parent} does not exist" if not path.parent.exists()
                            else f"{flag} {path}: {path.parent} is not a directory")
        stream = same_file_as_std_stream(path)
        if stream:
            raise OmniError(f"{flag} {path}: is this program's {stream}, which carries "
                            f"{'the answers' if stream == 'standard output' else 'its messages'}; give a file path")
        if path.exists() and not path.is_file():
            return path  # /dev/null, a FIFO: written in place
        if path.is_symlink():  # write through the link: the rename would replace the link itself
            path = Path(os.path.realpath(path))
        tmp = temp_path(path)
        with open(tmp, "wb"):
            pass
        tmp.unlink()
    except OSError as exc:
        raise OmniError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from exc
    return path


def wav_bytes(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A complete 16-bit PCM mono WAV in memory: its size fields are final before a byte reaches the target
    (a pipe reader gets a correct header), and no library callback ever writes to the user's file."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.nan_to_num(np.asarray(wave, dtype=np.float32)), -1.0, 1.0), sample_rate,
             subtype="PCM_16", format="WAV")
    return buf.getvalue()


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE,
              flag: str = "--audio_out") -> None:
    """Write 16-bit PCM mono atomically: a temp file in the same directory, then rename, so a failure (a full
    disk, the file-size limit, a signal) never leaves a partial file. An existing non-regular target
    (/dev/null, a FIFO) is written in place instead: renaming over it would replace the device or pipe."""
    path = check_output_path(path, flag)
    data = wav_bytes(wave, sample_rate)
    if path.exists() and not path.is_file():
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:  # /dev/full: ENOSPC; a FIFO whose reader left: EPIPE
            raise OmniError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from exc
        return
    write_atomic(path, data, f"{flag} {path}")
