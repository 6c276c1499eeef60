"""Audio in and out as pure functions: load, resample, power mel spectrogram; speech out encoded (WAV, MP3, Opus,
AAC, FLAC, raw PCM), its tempo changed, written atomically."""
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

from utils.base.defaults import SPEECH_FORMATS, SPEECH_SPEEDS
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
    """First channel of an audio file (see `open_audio` for the formats) as float32 mono at `sample_rate`; a stream
    whose sample rate changes is resampled segment by segment.

    With `max_seconds` only the start of the file is decoded (never more than that many seconds, whatever the
    header claims); without, the whole file is decoded and files longer than MAX_AUDIO_SECONDS are refused."""
    limit = MAX_AUDIO_SECONDS if max_seconds is None else max_seconds
    segments: list[tuple[int, list[np.ndarray]]] = []  # (rate, its blocks), one per run of frames at one rate
    done, got = 0.0, 0  # seconds in the segments before the current one; samples in the current one
    with ExitStack() as stack:
        what, declared, blocks = open_audio(stack, path)
        if max_seconds is None and declared > MAX_AUDIO_SECONDS:
            raise OmniError(f"{what}: {declared:.0f} s long (by its header), over the "
                            f"limit of {MAX_AUDIO_SECONDS:.0f} s of audio decoded at once")
        for rate, block in decoded(blocks, what):
            if not segments or rate != segments[-1][0]:
                done += got / segments[-1][0] if segments else 0.0
                segments.append((rate, []))
                got = 0
            left = (limit - done) * rate
            wanted = int(left) + 1 if max_seconds is None else max(1, int(np.ceil(left)))
            segments[-1][1].append(np.array(block[:wanted - got], dtype=np.float32))  # copied: decoders reuse buffers
            got += segments[-1][1][-1].shape[0]
            if got >= wanted:
                break
    if not segments:
        raise OmniError(f"{what}: contains no samples")
    if max_seconds is None and got > (MAX_AUDIO_SECONDS - done) * segments[-1][0]:
        raise OmniError(f"{what}: longer than the limit of {MAX_AUDIO_SECONDS:.0f} s of audio decoded "
                        f"at once")
    waves = []
    for rate, kept in segments:
        wave = np.concatenate(kept) if len(kept) > 1 else kept[0]
        check_wave(wave, what)
        waves.append(resample(wave, rate, sample_rate))
    return np.concatenate(waves) if len(waves) > 1 else waves[0]


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
        if starts_like_mp3(Path(path)):  # the count follows the first frames' rate, which later frames may change
            return None
        info = sf.info(os.fsencode(path))
    except Exception:  # unreadable or not libsndfile's: reading it reports the problem properly
        return None
    return info.frames / info.samplerate if info.samplerate > 0 and info.frames > 0 else None


Block = tuple[int, np.ndarray]  # (sample rate, first-channel float32 samples): the rate may change between blocks

# libsndfile reads a FLAC or Ogg file's first stream and stops there without a word; a later stream (files joined
# with `cat`, an Ogg chain) is looked for and refused. FLAC: the marker and a STREAMINFO block header (34 bytes,
# maybe the last block) after the file's own.
FLAC_HEADERS = (b"fLaC\x00\x00\x00\x22", b"fLaC\x80\x00\x00\x22")
SCAN_BYTES = 1 << 20


def open_audio(stack: ExitStack, source: str | os.PathLike | BinaryIO) -> tuple[str, float, Iterator[Block]]:
    """(what to call it in messages, seconds by the header or 0, blocks) of an audio file, a path or an open binary
    file such as an upload, closed with `stack`. What libsndfile reads (wav, flac, ogg, ...) is decoded by
    soundfile; MP3 and other containers (m4a/AAC, mp4, webm, mkv, ...: a video's sound track) by FFmpeg through
    PyAV, under the guards of utils.media.ffmpeg, with each frame's own sample rate (an MP3 may change it from
    one frame to the next, and libsndfile's reader stops at the change without a word)."""
    if hasattr(source, "read"):
        what = str(getattr(source, "name", None) or "audio stream")
        opened: Any = source
    else:
        opened = check_audio_path(source)
        what = f"audio file {opened}"
    try:
        mp3 = starts_like_mp3(opened)
    except OSError as exc:
        raise OmniError(f"{what}: cannot read ({exc.strerror or exc})") from exc
    if mp3:  # never given to libsndfile, whose MP3 reader also prints warnings of its own
        return (what, *av_audio(stack, opened, what, None))
    try:  # a path goes to libsndfile as bytes: any file name, UTF-8 or not
        f = stack.enter_context(sf.SoundFile(os.fsencode(opened) if isinstance(opened, Path) else opened))
    except Exception as sf_exc:  # soundfile raises several types for data it cannot read
        return (what, *av_audio(stack, rewound(opened), what, sf_exc))
    if f.format == "MP3":  # MPEG audio after leading bytes the sniffing does not know
        return (what, *av_audio(stack, rewound(opened), what, None))
    if f.samplerate <= 0:
        raise OmniError(f"{what}: cannot decode (invalid sample rate {f.samplerate})")
    if f.format in ("FLAC", "OGG"):
        check_one_stream(opened, f.format, what)
    rate = f.samplerate
    return what, f.frames / rate, ((rate, block) for block in soundfile_blocks(f, DECODE_BLOCK_FRAMES))


def starts_like_mp3(opened: Any) -> bool:
    """Whether a file (a path, or an open file read at its start and put back) begins as MPEG audio does: an ID3v2
    tag or a frame sync (11 set bits)."""
    if hasattr(opened, "read"):
        start = opened.tell()
        opened.seek(0)
        head = opened.read(3)
        opened.seek(start)
    else:
        with open(opened, "rb") as f:
            head = f.read(3)
    return head == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)


def rewound(opened: Any) -> Any:
    """An open file put back at its start for the second decoder (a path is opened afresh anyway)."""
    if hasattr(opened, "seek"):
        opened.seek(0)
    return opened


def check_one_stream(opened: Any, fmt: str, what: str) -> None:
    """Refuse a FLAC or Ogg file (`fmt`, as libsndfile names it) that holds a second stream after its first: libsndfile
    would decode the first only. An open file is read from its start and put back where it was."""
    with ExitStack() as stack:
        f = opened if hasattr(opened, "read") else stack.enter_context(open(opened, "rb"))
        start = f.tell()
        f.seek(0)
        joined = ogg_chained(f) if fmt == "OGG" else later_flac_stream(f)
        f.seek(start)
    if joined:
        raise OmniError(f"{what}: holds a second audio stream after the first (files joined together?), which "
                        f"would be cut off here; convert it into one stream first")


def ogg_chained(f: BinaryIO) -> bool:
    """Whether an Ogg file begins a stream (a page with the BOS flag) after a page of an earlier one: a chain. The
    page headers are walked (capture pattern, version, flags, ..., segment table) up to where they stop making
    sense; the streams an Ogg file multiplexes all begin on its first pages."""
    seen_data = False
    while len(head := f.read(27)) == 27 and head[:5] == b"OggS\x00":
        lacing = f.read(head[26])
        if len(lacing) < head[26]:
            break
        begins = bool(head[5] & 0x02)
        if begins and seen_data:
            return True
        seen_data = seen_data or not begins
        f.seek(sum(lacing), os.SEEK_CUR)
    return False


def later_flac_stream(f: BinaryIO) -> bool:
    """Whether a FLAC stream header appears after the file's own (at offset 0), read in SCAN_BYTES pieces that
    overlap by a header's length."""
    keep = len(FLAC_HEADERS[0]) - 1
    tail, first = b"", 1
    while piece := f.read(SCAN_BYTES):
        window = tail + piece
        if any(window.find(h, first) >= 0 for h in FLAC_HEADERS):
            return True
        tail, first = window[-keep:], 0
    return False


def decoded(blocks: Iterator[Block], what: str) -> Iterator[Block]:
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
    resampled block by block (a new resampler where the stream's rate changes), so memory stays the same whatever
    the length. Audio longer than `max_seconds` (by its header, or by what is actually decoded) is refused with
    OmniError."""
    with ExitStack() as stack:
        what, declared, blocks = open_audio(stack, source)
        too_long = f"over the transcription limit of {max_seconds:.0f} s"
        if declared > max_seconds:
            raise OmniError(f"{what}: {declared:.0f} s long (by its header), {too_long}")
        stream: soxr.ResampleStream | None = None
        rate, done, got = 0, 0.0, 0  # current rate; seconds before its segment; samples in it
        for block_rate, mono in decoded(blocks, what):
            if block_rate != rate:
                if stream is not None and (tail := stream.resample_chunk(np.zeros(0, np.float32), last=True)).size:
                    yield tail
                done += got / rate if rate else 0.0
                rate, got = block_rate, 0
                stream = None if rate == sample_rate else soxr.ResampleStream(rate, sample_rate, 1, dtype="float32")
            got += mono.shape[0]
            if got > (max_seconds - done) * rate:
                raise OmniError(f"{what}: longer than {max_seconds:.0f} s, {too_long}")
            check_wave(mono, what)
            out = mono if stream is None else stream.resample_chunk(mono)
            if out.size:
                yield out
        if rate == 0:
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


def av_audio(stack: ExitStack, opened: Any, what: str, sf_exc: Exception | None) -> tuple[float, Iterator[Block]]:
    """(seconds by the header or 0, blocks) of a container's first audio stream, through PyAV, each frame at its
    own sample rate and channel layout; OmniError naming the decoders' complaints when it cannot be read
    (`sf_exc`: libsndfile's, when it was tried first and failed)."""
    try:
        container = stack.enter_context(open_container(opened, what))
    except OmniError:
        raise
    except Exception as exc:  # PyAV raises its own error family for unreadable containers
        tried = f"libsndfile: {reason(sf_exc)}; " if sf_exc is not None else ""
        raise OmniError(f"{what}: cannot decode ({tried}FFmpeg: {reason(exc)})") from exc
    if not container.streams.audio:
        raise OmniError(f"{what}: has no audio stream")
    stream = container.streams.audio[0]
    seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else \
        (container.duration or 0) / 1_000_000
    if (stream.codec_context.sample_rate or 0) <= 0:
        raise OmniError(f"{what}: cannot decode (invalid sample rate {stream.codec_context.sample_rate or 0})")
    return seconds, av_blocks(container, stream)


def av_blocks(container: Any, stream: Any) -> Iterator[Block]:
    """First-channel float32 blocks of `stream`, each at its frames' rate: consecutive frames of one rate are
    gathered into blocks of up to DECODE_BLOCK_FRAMES (a frame holds about a thousand samples, too few to hand
    on one by one to a reader that appends them to a buffer)."""
    rate, pending, count = 0, [], 0
    for frame in float_frames(container, stream):
        if frame.sample_rate != rate and pending:
            yield rate, np.concatenate(pending)
            pending, count = [], 0
        rate = frame.sample_rate
        pending.append(np.array(frame.to_ndarray()[0], dtype=np.float32))  # copied: decoders reuse buffers
        count += pending[-1].shape[0]
        if count >= DECODE_BLOCK_FRAMES:
            yield rate, np.concatenate(pending)
            pending, count = [], 0
    if pending:
        yield rate, np.concatenate(pending)


def float_frames(container: Any, stream: Any) -> Iterator[Any]:
    """The non-empty decoded frames of `stream` in planar float32, rate and channels as they are. A resampler
    converts the sample format, one for each run of frames of one rate, layout and format (PyAV's refuses a frame
    that differs from its first)."""
    import av  # imported here: only containers libsndfile cannot read need PyAV

    key: tuple | None = None
    to_float: Any = None
    for frame in av_frames(container, stream):
        frame_key = (frame.sample_rate, frame.layout.name, frame.format.name)
        if frame_key != key:
            if to_float is not None:
                yield from (f for f in to_float.resample(None) if f.samples)
            key, to_float = frame_key, av.AudioResampler(format="fltp")
        yield from (f for f in to_float.resample(frame) if f.samples)
    if to_float is not None:
        yield from (f for f in to_float.resample(None) if f.samples)


def av_frames(container: Any, stream: Any) -> Iterator[Any]:
    """The decoded frames of `stream`. MP3 files joined with `cat` carry the second file's ID3v2 tag in the middle,
    where FFmpeg's MP3 parser hands it to the decoder glued to the next frame: the tag is cut off and the frame
    decoded (FFmpeg would refuse the packet as invalid data, losing the rest)."""
    import av

    codec = stream.codec_context
    for packet in container.demux(stream):
        if packet.size and codec.name in ("mp3", "mp3float") and bytes(packet)[:3] == b"ID3":
            data = strip_id3v2(bytes(packet))
            if data:
                yield from codec.decode(av.Packet(data))
        else:
            yield from codec.decode(packet if packet.size else None)


def strip_id3v2(data: bytes) -> bytes:
    """`data` without the ID3v2 tags it starts with (header: 'ID3', version, flags, syncsafe size; a footer of
    10 bytes when flag 0x10 is set)."""
    while data[:3] == b"ID3" and len(data) >= 10:
        size = ((data[6] & 0x7F) << 21) | ((data[7] & 0x7F) << 14) | ((data[8] & 0x7F) << 7) | (data[9] & 0x7F)
        data = data[10 + size + (10 if data[5] & 0x10 else 0):]
    return data


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


# Speech out in OpenAI's formats: (PyAV encoder, container, bit rate) for the compressed ones; WAV is written by
# libsndfile and "pcm" is the raw samples. Opus in Ogg keeps the 16 kHz input rate in its header (its decoders
# always give 48 kHz); the ADTS stream is AAC-LC.
ENCODERS: dict[str, tuple[str, str, int | None]] = {"mp3": ("libmp3lame", "mp3", 64000),
                                                    "opus": ("libopus", "ogg", 32000),
                                                    "aac": ("aac", "adts", 64000), "flac": ("flac", "flac", None)}
SUFFIX_FORMATS = {".wav": "wav", ".mp3": "mp3", ".opus": "opus", ".ogg": "opus", ".aac": "aac", ".flac": "flac",
                  ".pcm": "pcm", ".raw": "pcm"}


def full_scale(wave: np.ndarray) -> np.ndarray:
    """float32 samples in [-1, 1] (NaN as 0)."""
    return np.clip(np.nan_to_num(np.asarray(wave, dtype=np.float32)), -1.0, 1.0)


def pcm16(wave: np.ndarray) -> np.ndarray:
    """16-bit little-endian samples (full scale 32767): what every format is made from, so the lossless ones hold
    exactly these samples and the others start from them."""
    return np.round(full_scale(wave) * 32767.0).astype("<i2")


def wav_bytes(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A complete 16-bit PCM mono WAV in memory: its size fields are final before a byte reaches the target
    (a pipe reader gets a correct header), and no library callback ever writes to the user's file."""
    buf = io.BytesIO()
    sf.write(buf, pcm16(wave), sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def encode_audio(wave: np.ndarray, sample_rate: int = SAMPLE_RATE, fmt: str = "wav") -> bytes:
    """A mono waveform as a complete file in memory in `fmt` (one of SPEECH_FORMATS): "wav" 16-bit PCM, "pcm" the
    same samples raw (16-bit little-endian, no header, as OpenAI's pcm), the others through FFmpeg's encoders."""
    if fmt == "wav":
        return wav_bytes(wave, sample_rate)
    if fmt == "pcm":
        return pcm16(wave).tobytes()
    if fmt not in ENCODERS:
        raise OmniError(f"audio format {fmt!r}: use one of {', '.join(SPEECH_FORMATS)}")
    import av  # imported here: only the compressed formats need PyAV

    codec, container_format, bit_rate = ENCODERS[fmt]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=sample_rate, layout="mono")
        if bit_rate:
            stream.bit_rate = bit_rate
        ctx = stream.codec_context
        frame = av.AudioFrame.from_ndarray(pcm16(wave)[None], format="s16", layout="mono")
        frame.sample_rate = sample_rate
        # the encoder's own sample format, in frames of the size it takes (1152 for MP3, 1024 for AAC, ...)
        to_codec = av.AudioResampler(format=ctx.codec.audio_formats[0].name, layout="mono", rate=sample_rate,
                                     frame_size=ctx.frame_size or None)
        for piece in to_codec.resample(frame) + to_codec.resample(None):
            container.mux(stream.encode(piece))
        container.mux(stream.encode(None))
    return buf.getvalue()


def change_tempo(wave: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """`wave` played `speed` times faster (SPEECH_SPEEDS' range) at the same pitch: FFmpeg's `atempo` filter
    (overlap-add of pitch-synchronous pieces), chained for speeds under 0.5, which one atempo does not take. A
    resample would shift the pitch with the tempo (chipmunk speech at 2x). Speed 1 returns `wave` as it is."""
    low, high = SPEECH_SPEEDS
    if not low <= speed <= high:
        raise OmniError(f"speed {speed}: must be between {low} and {high}")
    if speed == 1:
        return wave
    from fractions import Fraction

    import av

    steps, rest = [], float(speed)
    while rest < 0.5:
        steps.append(0.5)
        rest /= 0.5
    steps.append(rest)
    graph = av.filter.Graph()
    nodes = [graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono", time_base=f"1/{sample_rate}")]
    nodes += [graph.add("atempo", repr(step)) for step in steps] + [graph.add("abuffersink")]
    graph.link_nodes(*nodes).configure()
    frame = av.AudioFrame.from_ndarray(full_scale(wave)[None], format="flt", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = sample_rate, 0, Fraction(1, sample_rate)
    graph.push(frame)
    graph.push(None)
    pieces = []
    while True:
        try:
            pieces.append(graph.pull().to_ndarray()[0])
        except (av.error.EOFError, av.error.BlockingIOError):  # drained (the end was pushed: nothing more comes)
            break
    return np.concatenate(pieces).astype(np.float32, copy=False) if pieces else np.zeros(0, np.float32)


def format_for_path(path: str | os.PathLike) -> str:
    """The format a speech file is written in, by its suffix (SUFFIX_FORMATS: .mp3, .opus/.ogg, .aac, .flac,
    .pcm/.raw); WAV for .wav and any other name (/dev/null, a FIFO, a name without a suffix)."""
    return SUFFIX_FORMATS.get(Path(path).suffix.lower(), "wav")


def write_audio(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE,
                flag: str = "--audio_out", fmt: str | None = None) -> str:
    """Write mono speech in `fmt` (default: by the path's suffix, `format_for_path`) atomically: a temp file in
    the same directory, then rename, so a failure (a full disk, the file-size limit, a signal) never leaves a
    partial file. An existing non-regular target (/dev/null, a FIFO) is written in place instead: renaming over
    it would replace the device or pipe. Returns the format written."""
    path = check_output_path(path, flag)
    fmt = fmt or format_for_path(path)
    data = encode_audio(wave, sample_rate, fmt)
    if path.exists() and not path.is_file():
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:  # /dev/full: ENOSPC; a FIFO whose reader left: EPIPE
            raise OmniError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from exc
        return fmt
    write_atomic(path, data, f"{flag} {path}")
    return fmt


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE,
              flag: str = "--audio_out") -> None:
    """`write_audio` in 16-bit PCM WAV whatever the suffix."""
    write_audio(path, wave, sample_rate, flag, "wav")
