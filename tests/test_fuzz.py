"""Fuzzing the loaders with hypothesis: whatever bytes or arrays they get, they return a usable value or raise
OmniError (the CLI's one-line `error:`). Any other exception is a bug.

Budgets are small (a few dozen examples per test, no example database, derandomized) so the file runs in CI in
well under a minute and always explores the same inputs.
"""
from __future__ import annotations

import io
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from utils.media.audio import load_audio
from utils.weights.checkpoint import read_torch_file
from utils.base.errors import OmniError
from utils.weights.export_format import read_safetensors
from utils.media.image import IMAGE_SIZE, load_image
from utils.weights.loading import load_components

FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=25)


def in_temp_file(name: str, data: bytes, fn, must_load: bool = False):
    """Write `data` to a fresh temp file named `name` and call fn(path); OmniError is the only allowed failure,
    and with `must_load` (an unmodified valid file: the positive control) not even that."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        if must_load:
            return fn(path)
        try:
            return fn(path)
        except OmniError as exc:
            assert str(exc), "an OmniError must say something"
            return None


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    """Overwrite bytes at (position mod length) and optionally truncate: corrupt-but-plausible files."""
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf[:cut % len(buf)] if cut is not None else buf)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12)
CUT = st.none() | st.integers(0, 1 << 20)


# ---------------------------------------------------------------- images

def check_image(path: Path) -> None:
    t = load_image(path)
    assert t.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and t.dtype == torch.float32
    assert torch.isfinite(t).all() and float(t.min()) >= 0.0 and float(t.max()) <= 1.0


def valid_image_bytes(fmt: str) -> bytes:
    from PIL import Image
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP",
          b"\x00\x00\x01\x00", b"P6\n", b"8BPS"]


@FUZZ
@given(st.binary(max_size=2048))
def test_image_loader_random_bytes(data: bytes) -> None:
    in_temp_file("x.png", data, check_image)


@FUZZ
@given(st.sampled_from(MAGICS), st.binary(max_size=1024))
def test_image_loader_known_magic_then_random(magic: bytes, rest: bytes) -> None:
    in_temp_file("x.img", magic + rest, check_image)


@FUZZ
@given(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]), EDITS, CUT)
def test_image_loader_corrupted_files(fmt: str, edits, cut) -> None:
    in_temp_file("x." + fmt.lower(), mutate(valid_image_bytes(fmt), edits, cut), check_image,
                 must_load=not edits and cut is None)


@FUZZ
@given(st.one_of(
    arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24))),
    arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24), st.sampled_from([3, 4]))),
    arrays(np.uint16, st.tuples(st.integers(1, 24), st.integers(1, 24))),
    arrays(np.float32, st.tuples(st.integers(1, 24), st.integers(1, 24)),
           elements=st.floats(-1e6, 1e6, width=32))),
    st.sampled_from(["png", "tiff"]))
def test_image_loader_random_arrays(arr: np.ndarray, ext: str) -> None:
    """Any small array Pillow can save is a valid image: it must load, never fail."""
    from PIL import Image
    img = Image.fromarray(arr)
    if ext == "png" and img.mode == "F":
        ext = "tiff"  # PNG has no float mode
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x.{ext}"
        img.save(path)
        check_image(path)


# ---------------------------------------------------------------- audio

def check_audio(path: Path) -> None:
    wave = load_audio(path)
    assert wave.ndim == 1 and wave.dtype == np.float32 and wave.size > 0 and np.isfinite(wave).all()


def valid_audio_bytes(fmt: str) -> bytes:
    import soundfile as sf
    buf = io.BytesIO()
    t = np.arange(1600) / 16000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format=fmt)
    return buf.getvalue()


@FUZZ
@given(st.binary(max_size=4096))
def test_audio_loader_random_bytes(data: bytes) -> None:
    in_temp_file("x.wav", data, check_audio)


@FUZZ
@given(st.sampled_from([b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS", b"FORM\x00\x00\x00\x00AIFF", b"ID3"]),
       st.binary(max_size=2048))
def test_audio_loader_known_magic_then_random(magic: bytes, rest: bytes) -> None:
    in_temp_file("x.audio", magic + rest, check_audio)


@FUZZ
@given(st.sampled_from(["WAV", "FLAC", "OGG"]), EDITS, CUT)
def test_audio_loader_corrupted_files(fmt: str, edits, cut) -> None:
    in_temp_file("x." + fmt.lower(), mutate(valid_audio_bytes(fmt), edits, cut), check_audio,
                 must_load=not edits and cut is None)


@FUZZ
@given(st.one_of(arrays(np.float32, st.tuples(st.integers(0, 400), st.integers(1, 3)),
                        elements=st.floats(-4, 4, width=32)),
                 arrays(np.int16, st.tuples(st.integers(0, 400), st.integers(1, 3)))),
       st.sampled_from([1000, 8000, 11025, 16000, 44100, 48000, 96000]),
       st.sampled_from([("WAV", "FLOAT"), ("WAV", "PCM_16"), ("FLAC", "PCM_16")]))
def test_audio_loader_random_arrays(arr: np.ndarray, rate: int, fmt) -> None:
    """Any array soundfile can write loads as finite 16 kHz mono, except an empty one (a clear OmniError)."""
    import soundfile as sf
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.snd"
        sf.write(str(path), arr, rate, format=fmt[0], subtype=fmt[1])
        if arr.shape[0] == 0:
            with pytest.raises(OmniError):
                load_audio(path)
            return
        wave = load_audio(path)
        assert wave.ndim == 1 and np.isfinite(wave).all()
        assert abs(wave.size - arr.shape[0] * 16000 / rate) <= 2


# ---------------------------------------------------------------- checkpoints

def valid_torch_bytes(legacy: bool) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, "step": 3}, buf,
               _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def check_torch(path: Path) -> None:
    assert isinstance(read_torch_file(path), dict)


@FUZZ
@given(st.binary(max_size=2048))
def test_torch_reader_random_bytes(data: bytes) -> None:
    in_temp_file("x.pt", data, check_torch)


@FUZZ
@given(st.booleans(), EDITS, CUT)
def test_torch_reader_corrupted_files(legacy: bool, edits, cut) -> None:
    in_temp_file("x.pt", mutate(valid_torch_bytes(legacy), edits, cut), check_torch,
                 must_load=not edits and cut is None)


PLAIN = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                  max_size=3), max_leaves=8)


@FEW
@given(PLAIN, st.integers(0, 5))
def test_torch_reader_plain_pickles(obj, protocol: int) -> None:
    """Raw pickles of plain data (not torch.save files): a dict loads or is refused, nothing else escapes."""
    in_temp_file("x.pt", pickle.dumps(obj, protocol=protocol), check_torch)


def safetensors_header(entries: dict, length: int | None = None) -> bytes:
    raw = repr(entries).replace("'", '"').encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw


@FUZZ
@given(st.binary(max_size=2048))
def test_safetensors_reader_random_bytes(data: bytes) -> None:
    in_temp_file("x.safetensors", data, read_safetensors)


@FUZZ
@given(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "I64", "BOOL", "F64", "F8_E4M3", "Q4"]),
       st.lists(st.integers(-2, 1 << 40), max_size=3), st.integers(-8, 1 << 42), st.integers(-8, 1 << 42),
       st.none() | st.integers(0, 1 << 63), st.binary(max_size=256))
def test_safetensors_reader_crafted_headers(dtype, shape, start, end, length, body) -> None:
    """Hand-made headers: absurd shapes, offsets and header lengths (terabytes) must never allocate or crash."""
    header = {"w": {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}}
    in_temp_file("x.safetensors", safetensors_header(header, length) + body, read_safetensors)


@FUZZ
@given(EDITS, CUT)
def test_safetensors_reader_corrupted_files(edits, cut) -> None:
    from safetensors.torch import save
    data = save({"a.w": torch.ones(3, 4), "b.b": torch.zeros(5, dtype=torch.int8)})
    in_temp_file("x.safetensors", mutate(data, edits, cut), read_safetensors, must_load=not edits and cut is None)


@FEW
@given(st.sampled_from(["thinker.pt", "model.pt", "omni.pt", "model.safetensors", "audio_enc.pt"]),
       st.binary(max_size=1024), st.booleans())
def test_load_components_random_weights_file(name: str, data: bytes, with_tokenizer: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / name).write_bytes(data)
        if with_tokenizer:
            (root / "tokenizer.model").write_bytes(data[::-1])
        with pytest.raises(OmniError):
            load_components(root)


# ---------------------------------------------------------------- positive controls
# The properties above also hold for a reader that rejects everything. These say the readers accept what they
# must: every valid file loads to the right values (a reject-all or a garbling reader fails here).

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_valid_images_load(fmt: str) -> None:
    t = in_temp_file("x." + fmt.lower(), valid_image_bytes(fmt), load_image, must_load=True)
    assert t.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and 0.2 < float(t.mean()) < 0.8  # random pixels, not blank


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_valid_audio_loads(fmt: str) -> None:
    wave = in_temp_file("x." + fmt.lower(), valid_audio_bytes(fmt), load_audio, must_load=True)
    t = np.arange(1600) / 16000
    expected = 0.3 * np.sin(2 * np.pi * 440 * t)
    assert wave.shape == (1600,) and np.abs(wave - expected).max() < (0.05 if fmt == "OGG" else 1e-3)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_valid_torch_files_load(legacy: bool) -> None:
    obj = in_temp_file("x.pt", valid_torch_bytes(legacy), read_torch_file, must_load=True)
    assert obj["step"] == 3 and torch.equal(obj["model"]["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_valid_safetensors_load() -> None:
    from safetensors.torch import save
    tensors = {"a.w": torch.randn(3, 4), "b.b": torch.arange(5, dtype=torch.int8)}
    got, meta = in_temp_file("x.safetensors", save(tensors, metadata={"k": "v"}), read_safetensors, must_load=True)
    assert meta == {"k": "v"} and got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in got)


def test_valid_checkpoint_tree_loads_and_answers(tiny_tree: Path) -> None:
    from omni import OmniModel
    comps = load_components(tiny_tree)
    assert all(getattr(comps, part) is not None for part in ("thinker", "vision", "audio", "talker", "vocoder"))
    answer = OmniModel(comps, torch.device("cpu")).answer("what is one plus two ?", max_new_tokens=3,
                                                          ignore_eos=True)
    assert answer.generated_tokens == 3 and answer.prompt_tokens > 1
