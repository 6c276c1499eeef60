"""Every bad or odd input ends in a clear error (or works), nothing runs, nothing is left half-written.

Each case is one input given to the real CLI (infer_chat.py / infer_safetensors.py) in its own process, with a
timeout: exit 1 with exactly one `error:` line on stderr (an input error), exit 2 (a usage error from argparse),
or exit 0 where the input is merely unusual and must work. Never a traceback, never the CLI's catch-all
"error: unexpected ..." line (that one means a bug), never a leftover partial file.

Speed: every fresh interpreter pays ~2-3 s importing torch, which would make ~300 cases take many minutes. So
the battery runs in two helper processes side by side (this file run as a module, `--batch`), each importing
torch, PyAV, soundfile, ... once and then forking one child per case of its share; the child points fds 0/1/2
at the case's stdin/stdout/stderr files and runs the script with runpy exactly as `python infer_chat.py ARGS`
would, with the interpreter's exit-code and uncaught-exception behaviour. A few cases (`direct=True`) run as
genuinely fresh interpreters instead, meanwhile (malicious pickles, invalid UTF-8 in argv and stdin, a missing
CUDA device), and one case runs both ways to show that the two agree.
"""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from tests import forkserver
from tests.conftest import REPO

CASE_TIMEOUT = 120.0  # seconds one CLI run may take before it counts as a hang
RUNNERS = 2  # warm batch runners side by side: the cases are independent (each has its own folder and files)
MARKER = "PWNED_MARKER"  # the file a malicious pickle would create if it ever ran


# ---------------------------------------------------------------- inputs

@dataclass
class Env:
    """What the builders get: the shared read-only tiny tree and export, and the case's own directory."""
    tree: Path
    export: Path
    d: Path


def tone(seconds: float, sr: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int = 8, color_type: int = 2, idat: bytes | None = None) -> bytes:
    """A PNG built by hand: IHDR says what we like, IDAT holds whatever we give it."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat or zlib.compress(b""))
            + png_chunk(b"IEND", b""))


def save_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30), **kw: Any) -> Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    img = img if mode == "RGB" else img.convert(mode)
    img.save(path, **kw)
    return path


def copy_thinker(env: Env) -> Path:
    """A private thinker-only directory (thinker.pt, tokenizer.model) plus its configs/ beside it."""
    shutil.copytree(env.tree / "thinker_tiny", env.d / "thinker_tiny")
    (env.d / "configs").mkdir()
    shutil.copy(env.tree / "configs" / "thinker_tiny.json", env.d / "configs")
    return env.d / "thinker_tiny"


def edit_thinker(env: Env, edit: Callable[[dict], Any]) -> None:
    import torch
    d = copy_thinker(env)
    obj = torch.load(d / "thinker.pt", weights_only=True)
    edit(obj["model"])
    torch.save(obj, d / "thinker.pt")


def thinker_config(env: Env, text: str) -> None:
    copy_thinker(env)
    (env.d / "thinker_tiny" / "config.json").write_text(text, encoding="utf-8")


class Evil:
    """Unpickling this runs a shell command: a checkpoint holding it must be refused, never loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def evil_checkpoint(env: Env, how: str) -> None:
    import torch
    marker = env.d / MARKER
    if how == "zip":  # the normal torch.save format, as thinker.pt
        d = copy_thinker(env)
        torch.save({"model": Evil(marker), "optimizer": {}}, d / "thinker.pt")
    elif how == "raw":  # a plain pickle named model.pt (the loader opens it to guess the component)
        d = env.d / "thinker_tiny"
        d.mkdir()
        (d / "model.pt").write_bytes(pickle.dumps({"model": Evil(marker)}))
        shutil.copy(env.tree / "thinker_tiny" / "tokenizer.model", d)
    else:  # legacy (pre-zip) torch.save format, as a sibling vision checkpoint of a whole tree
        shutil.copytree(env.tree, env.d / "checkpoints")
        torch.save({"vit": Evil(marker)}, env.d / "checkpoints" / "vision_tiny" / "vision.pt",
                   _use_new_zipfile_serialization=False)


def export_copy(env: Env) -> Path:
    shutil.copytree(env.export, env.d / "export")
    return env.d / "export"


def write_export(env: Env, data: bytes) -> None:
    (export_copy(env) / "model.safetensors").write_bytes(data)


def safetensors_bytes(header: Any, body: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def edit_export(env: Env, edit: Callable[[dict], Any], config: Callable[[dict], Any] | None = None) -> None:
    from safetensors.torch import load_file, save_file
    d = export_copy(env)
    sd = load_file(str(d / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"))
    if config:
        cfg = json.loads((d / "config.json").read_text())
        config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))


def make_video(path: Path, frames: int = 6, size: int = 32, codec: str = "mpeg4") -> Path:
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=8)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), 40 * (i % 6), np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def audio_only_container(path: Path) -> None:
    """A Matroska file with one PCM audio stream and no video stream, written with PyAV."""
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in s.encode(frame):
            c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def zero_frame_video(path: Path) -> None:
    """An AVI whose header declares a 32x32 MPEG-4 video stream that has no frames at all."""
    import av
    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=8)
    s.width = s.height = 32
    s.pix_fmt = "yuv420p"
    c.start_encoding()
    c.close()


def write_audio(path: Path, wave: np.ndarray, sr: int, **kw: Any) -> None:
    import soundfile as sf
    sf.write(str(path), wave, sr, **kw)


def flac_claiming_days(path: Path) -> None:
    """A one-second FLAC whose STREAMINFO claims 2^36 - 1 samples (49 days at 16 kHz)."""
    write_audio(path, tone(1.0), 16000, format="FLAC")
    data = bytearray(path.read_bytes())
    at = 8 + 10  # "fLaC" + block header, then 10 bytes into STREAMINFO: rate/channels/bits/total samples
    packed = int.from_bytes(data[at:at + 8], "big") | ((1 << 36) - 1)
    data[at:at + 8] = packed.to_bytes(8, "big")
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- cases

@dataclass
class Case:
    id: str
    args: list[str]  # "{tree}", "{export}" and "{d}" (the case's own directory) are filled in
    rc: int
    build: Callable[[Env], Any] | None = None
    match: str | None = None  # regex: the error line (rc 1/2) or stderr (rc 0) must match it
    stdin: bytes | None = None
    script: str = "infer_chat.py"
    direct: bool = False  # a fresh interpreter instead of a fork of the warm batch runner
    absent: list[str] = field(default_factory=list)  # paths that must not exist afterwards
    stdout: str | None = None  # regex stdout must match
    check: Callable[[Env, dict], Any] | None = None  # extra assertions on (env, result)
    raw_args: list[bytes] | None = None  # argv as bytes (direct runs only): for invalid UTF-8
    fsize: int | None = None  # RLIMIT_FSIZE in bytes (`ulimit -f`): writes beyond it fail with EFBIG


def chat(*extra: str) -> list[str]:
    return ["--ckpt_dir", "{tree}", *extra]


def ask(*extra: str) -> list[str]:
    """A cheap one-shot question on the full tiny tree."""
    return ["--ckpt_dir", "{tree}", "--max_new_tokens", "2", *extra]


def thinker_q() -> list[str]:
    return ["--ckpt_dir", "{d}/thinker_tiny", "--text", "hi", "--max_new_tokens", "2"]


def img(rc: int, name: str, build: Callable[[Path], Any] | None, match: str | None = None) -> Case:
    return Case(f"image_{name}", ask("--image", "{d}/" + name, "--text", "what is it ?"), rc,
                (lambda env: build(env.d / name)) if build else None, match)


def aud(rc: int, name: str, build: Callable[[Path], Any] | None, match: str | None = None, **kw: Any) -> Case:
    return Case(f"audio_{name}", ask("--audio_in", "{d}/" + name, "--text", "what ?"), rc,
                (lambda env: build(env.d / name)) if build else None, match, **kw)


def vid(rc: int, name: str, build: Callable[[Path], Any] | None, match: str | None = None, extra=()) -> Case:
    return Case(f"video_{name}", ask("--video", "{d}/" + name, *extra), rc,
                (lambda env: build(env.d / name)) if build else None, match)


def flag(name: str, *args: str, rc: int = 2, match: str | None = None) -> Case:
    return Case(f"flag_{name}", chat("--text", "hi", *args), rc, None, match)


def out_case(name: str, target: str, rc: int, build: Callable[[Env], Any] | None = None,
             match: str | None = None, check: Callable | None = None) -> Case:
    absent = [target] if rc and target != "{d}" else []
    return Case(f"audio_out_{name}", ask("--text", "hello there", "--audio_out", target), rc, build, match,
                absent=absent, check=check)


def bytes_file(data: bytes) -> Callable[[Path], Any]:
    return lambda p: p.write_bytes(data)


def make_dir(p: Path) -> None:
    p.mkdir()


def _valid_png() -> bytes:
    buf = io.BytesIO()
    save_image(buf, format="PNG")  # type: ignore[arg-type]
    return buf.getvalue()


def _valid_jpeg() -> bytes:
    buf = io.BytesIO()
    save_image(buf, format="JPEG")  # type: ignore[arg-type]
    return buf.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG with its SOF0 frame header patched to claim another size."""
    data = bytearray(_valid_jpeg())
    at = data.index(b"\xff\xc0") + 5
    data[at:at + 4] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + descriptor + b"\x02\x02\x44\x01\x00;"


def real_png_bomb(path: Path) -> None:
    """A valid 1-bit 9000x9000 PNG (81 Mpixel > MAX_IMAGE_PIXELS) whose zero rows compress to a few KB."""
    width = height = 9000
    row = b"\x00" + bytes((width + 7) // 8)
    path.write_bytes(png_bytes(width, height, bit_depth=1, color_type=0, idat=zlib.compress(row * height, 9)))


def exif_rotated(path: Path) -> None:
    from PIL import Image
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(path, exif=exif)


def sixteen_bit(path: Path) -> None:
    from PIL import Image
    arr = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50)
    Image.fromarray(arr).save(path)  # mode I;16 -> a 16-bit greyscale PNG


def animated_gif(path: Path) -> None:
    from PIL import Image
    frames = [Image.new("P", (20, 20), i * 40) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def truncated(data: bytes, keep: float = 0.5) -> Callable[[Path], Any]:
    return lambda p: p.write_bytes(data[:max(1, int(len(data) * keep))])


def wav_header_only(path: Path) -> None:
    write_audio(path, tone(0.5), 16000, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:44])


def thinker_vocab_smaller_than_tokenizer(env: Env) -> None:
    def shrink(sd: dict) -> None:
        for key in ("tok_emb.weight", "lm_head.weight"):
            sd[key] = sd[key][:64].clone()
    edit_thinker(env, shrink)
    cfg_path = env.d / "configs" / "thinker_tiny.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["vocab_size"] = 64
    cfg_path.write_text(json.dumps(cfg))


def omni_without_proj_v(env: Env) -> None:
    import torch
    shutil.copytree(env.tree, env.d / "checkpoints")
    path = env.d / "checkpoints" / "omni_sft_tiny" / "omni.pt"
    obj = torch.load(path, weights_only=True)
    del obj["proj_v"]
    torch.save(obj, path)


def tree_copy(env: Env, edit: Callable[[Path], Any] | None = None) -> None:
    shutil.copytree(env.tree, env.d / "checkpoints")
    if edit:
        edit(env.d / "checkpoints")


def symlink_loop(env: Env) -> None:
    d = copy_thinker(env)
    (d / "thinker.pt").unlink()
    os.symlink(d / "thinker.pt", d / "thinker.pt")


def file_as_parent(env: Env) -> None:
    (env.d / "notadir").write_text("a regular file")


def devnull_intact(env: Env, result: dict) -> None:
    st = os.stat("/dev/null")
    assert stat.S_ISCHR(st.st_mode), "/dev/null was replaced by a regular file"


def same_as_fresh_interpreter(env: Env, result: dict) -> None:
    fresh = run_direct(["--ckpt_dir", str(env.tree), "--image", str(env.d / "text.png"), "--text", "hi"],
                       "infer_chat.py", None, env.d, CASE_TIMEOUT)
    assert fresh["rc"] == result["rc"] and fresh["stderr"].splitlines()[-1] == result["stderr"].splitlines()[-1]


def ztxt_bomb(path: Path) -> None:
    """A small PNG carrying a compressed text chunk that inflates to 50 MB."""
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "A" * 50_000_000, zip=True)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


def exif_bad_orientation(path: Path) -> None:
    from PIL import Image
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 42  # not one of the 8 orientations
    img.save(path, exif=exif)


def wav_impossible_rate(path: Path) -> None:
    write_audio(path, tone(0.2), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", 0xFFFFFFFF)  # fmt chunk: sample rate
    path.write_bytes(bytes(data))


def pipe_lines(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


EVIL_ABSENT = ["{d}/" + MARKER]
TEN_MINUTES = 600.0

CASES: list[Case] = [
    # ---------------- checkpoints
    Case("ckpt_missing_dir", ["--ckpt_dir", "{d}/nowhere", "--text", "hi"], 1, None, "no such directory"),
    Case("ckpt_is_a_file", ["--ckpt_dir", "{d}/file.pt", "--text", "hi"], 1,
         lambda env: (env.d / "file.pt").write_bytes(b"x"), "is a file"),
    Case("ckpt_empty_dir", ["--ckpt_dir", "{d}/empty", "--text", "hi"], 1,
         lambda env: (env.d / "empty").mkdir(), "no μOmni checkpoint"),
    Case("ckpt_empty_weights_file", thinker_q(), 1,
         lambda env: (copy_thinker(env) / "thinker.pt").write_bytes(b""), "empty"),
    Case("ckpt_truncated_weights_file", thinker_q(), 1,
         lambda env: truncated((env.tree / "thinker_tiny" / "thinker.pt").read_bytes())(
             copy_thinker(env) / "thinker.pt"), "truncated"),
    Case("ckpt_random_bytes", thinker_q(), 1,
         lambda env: (copy_thinker(env) / "thinker.pt").write_bytes(np.random.default_rng(1).bytes(4096)),
         "not a PyTorch checkpoint|corrupt"),
    Case("ckpt_text_file", thinker_q(), 1,
         lambda env: (copy_thinker(env) / "thinker.pt").write_text("model weights go here\n" * 20),
         "not a PyTorch checkpoint"),
    Case("ckpt_pickle_runs_code_zip", thinker_q(), 1, lambda env: evil_checkpoint(env, "zip"),
         r"refused to load: unpickling it would call \S*system", direct=True, absent=EVIL_ABSENT),
    Case("ckpt_pickle_runs_code_raw_model_pt", thinker_q(), 1, lambda env: evil_checkpoint(env, "raw"),
         "refused to load", direct=True, absent=EVIL_ABSENT),
    Case("ckpt_pickle_runs_code_legacy_sibling", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         lambda env: evil_checkpoint(env, "legacy"), r"vision\.pt: refused to load", absent=EVIL_ABSENT),
    Case("ckpt_not_a_dict", thinker_q(), 1,
         lambda env: __import__("torch").save([1, 2, 3], copy_thinker(env) / "thinker.pt"), "expected a dict"),
    Case("ckpt_wrapper_not_a_state_dict", thinker_q(), 1,
         lambda env: __import__("torch").save({"model": [1, 2]}, copy_thinker(env) / "thinker.pt"),
         "not a state dict"),
    Case("ckpt_wrong_tensor_shape", thinker_q(), 1,
         lambda env: edit_thinker(env, lambda sd: sd.__setitem__("lm_head.weight", sd["lm_head.weight"][:, :16])),
         "wrong shape|lm_head"),
    Case("ckpt_missing_tensor", thinker_q(), 1,
         lambda env: edit_thinker(env, lambda sd: sd.pop("blocks.1.norm2.weight")), "missing key"),
    Case("ckpt_nan_weights", thinker_q(), 1,
         lambda env: edit_thinker(env, lambda sd: sd["norm.weight"].fill_(float("nan"))), "NaN"),
    Case("ckpt_missing_tokenizer", thinker_q(), 1,
         lambda env: (copy_thinker(env) / "tokenizer.model").unlink(), "tokenizer.*not found"),
    Case("ckpt_corrupt_tokenizer", thinker_q(), 1,
         lambda env: (copy_thinker(env) / "tokenizer.model").write_bytes(np.random.default_rng(2).bytes(2000)),
         "not a valid SentencePiece"),
    Case("ckpt_empty_tokenizer", thinker_q(), 1,
         lambda env: (copy_thinker(env) / "tokenizer.model").write_bytes(b""), "tokenizer"),
    Case("ckpt_tokenizer_larger_than_embedding", thinker_q(), 1, thinker_vocab_smaller_than_tokenizer,
         "pieces but the thinker embedding has only 64 rows"),
    Case("ckpt_config_invalid_json", thinker_q(), 1, lambda env: thinker_config(env, '{"d_model": 32,'),
         "not valid JSON"),
    Case("ckpt_config_not_an_object", thinker_q(), 1, lambda env: thinker_config(env, "[32, 2]"),
         "expected a JSON object"),
    Case("ckpt_config_contradicts_weights", thinker_q(), 1, lambda env: thinker_config(env, '{"d_model": 64}'),
         "'d_model' is 64 but the weights"),
    Case("ckpt_config_heads_do_not_divide", thinker_q(), 1, lambda env: thinker_config(env, '{"n_heads": 5}'),
         "does not divide"),
    Case("ckpt_config_negative_ctx_len", thinker_q(), 1, lambda env: thinker_config(env, '{"ctx_len": -5}'),
         "positive integer"),
    Case("ckpt_config_absurd_ctx_len", thinker_q(), 1,
         lambda env: thinker_config(env, '{"ctx_len": 1000000000000}'), "ctx_len.*limit"),
    Case("ckpt_config_heads_not_a_number", thinker_q(), 1, lambda env: thinker_config(env, '{"n_heads": "four"}'),
         "positive integer"),
    Case("ckpt_generation_config_negative_temperature", thinker_q()[:4], 1,
         lambda env: (copy_thinker(env) / "generation_config.json").write_text('{"temperature": -1}'),
         "temperature"),
    Case("ckpt_generation_config_temperature_not_a_number", thinker_q()[:4], 1,
         lambda env: (copy_thinker(env) / "generation_config.json").write_text('{"temperature": "hot"}'),
         "temperature"),
    Case("ckpt_omni_missing_projector", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         omni_without_proj_v, "proj_v"),
    Case("ckpt_only_a_vision_dir", ["--ckpt_dir", "{tree}/vision_tiny", "--text", "hi"], 1, None,
         "only vision weights"),
    Case("ckpt_weights_name_is_a_directory", thinker_q(), 1,
         lambda env: ((copy_thinker(env) / "thinker.pt").unlink(), (env.d / "thinker_tiny" / "thinker.pt").mkdir()),
         "no μOmni checkpoint"),
    Case("ckpt_weights_symlink_loop", thinker_q(), 1, symlink_loop, "no μOmni checkpoint"),
    Case("ckpt_ctc_map_disagrees_with_head", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         lambda env: tree_copy(env, lambda t: (t / "audio_enc_tiny" / "audio_enc_metadata.json").write_text(
             '{"char_to_idx": {"<BLANK>": 0, "<UNK>": 1, "a": 2}}')), "characters but the CTC head"),
    Case("ckpt_no_talker_with_audio_out", ["--ckpt_dir", "{tree}/thinker_tiny", "--text", "hi",
                                           "--audio_out", "{d}/speech.wav"], 1, None, "talker",
         absent=["{d}/speech.wav"]),
    # ---------------- merged safetensors exports
    Case("safetensors_truncated", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: write_export(env, (env.export / "model.safetensors").read_bytes()[:5000]), "truncated",
         script="infer_safetensors.py"),
    Case("safetensors_empty", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: write_export(env, b""), "truncated", script="infer_safetensors.py"),
    Case("safetensors_header_length_claims_a_terabyte", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: write_export(env, struct.pack("<Q", 1 << 40) + b'{"a": 1}'), "header too large",
         script="infer_safetensors.py"),
    Case("safetensors_header_length_beyond_file", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: write_export(env, safetensors_bytes({}, length=4096)), "corrupt|invalid header",
         script="infer_safetensors.py"),
    Case("safetensors_offsets_claim_terabytes", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: write_export(env, safetensors_bytes(
             {"thinker.tok_emb.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}},
             b"\0" * 64)), "incomplete metadata|corrupt", script="infer_safetensors.py"),
    Case("safetensors_offsets_disagree_with_shape", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: write_export(env, safetensors_bytes(
             {"thinker.norm.weight": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 8]}}, b"\0" * 8)),
         "corrupt", script="infer_safetensors.py"),
    Case("safetensors_unknown_dtype", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: write_export(env, safetensors_bytes(
             {"thinker.norm.weight": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)),
         "corrupt", script="infer_safetensors.py"),
    Case("safetensors_header_not_json", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: write_export(env, struct.pack("<Q", 12) + b"not json !!!"), "corrupt",
         script="infer_safetensors.py"),
    Case("safetensors_is_a_pickle_that_runs_code", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: write_export(env, pickle.dumps(Evil(env.d / MARKER))), "corrupt|header",
         script="infer_safetensors.py", absent=EVIL_ABSENT),
    Case("safetensors_wrong_tensor_shape", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: edit_export(env, lambda sd: sd.__setitem__("thinker.lm_head.weight",
                                                                sd["thinker.lm_head.weight"][:, :16].contiguous())),
         "wrong shape", script="infer_safetensors.py"),
    Case("safetensors_no_thinker", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: edit_export(env, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("thinker.")]),
         "no thinker", script="infer_safetensors.py"),
    Case("safetensors_unknown_prefix", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: edit_export(env, lambda sd: sd.__setitem__("mystery.weight", sd["proj_a.bias"].clone())),
         "unexpected key prefix", script="infer_safetensors.py"),
    Case("safetensors_unknown_quantization", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: edit_export(env, lambda sd: None, lambda cfg: cfg.update(quantization={"method": "gptq"})),
         "gptq", script="infer_safetensors.py"),
    Case("safetensors_config_invalid_json", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: (export_copy(env) / "config.json").write_text("{oops"), "not valid JSON",
         script="infer_safetensors.py"),
    Case("safetensors_config_contradicts_weights", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: edit_export(env, lambda sd: None, lambda cfg: cfg["thinker"].update(n_layers=7)),
         "'n_layers' is 7", script="infer_safetensors.py"),
    # ---------------- images
    img(1, "missing.png", None, "not found"),
    img(1, "a_dir.png", make_dir, "not a file"),
    img(1, "empty.png", bytes_file(b""), "is empty"),
    img(1, "text.png", bytes_file(b"this is not an image\n" * 10), "cannot decode"),
    img(1, "truncated.png", truncated(_valid_png()), "cannot decode"),
    img(1, "truncated.jpg", truncated(_valid_jpeg(), 0.3), "cannot decode"),
    img(1, "png_magic_then_garbage.png", bytes_file(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), "cannot decode"),
    img(1, "header_100000x100000.png", bytes_file(png_bytes(100000, 100000)), "decompression bomb|pixels"),
    img(1, "header_65000x65000.jpg", bytes_file(jpeg_claiming(65000, 65000)), "decompression bomb|pixels"),
    img(1, "header_65535x65535.gif", bytes_file(gif_claiming(65535, 65535)), "decompression bomb|pixels"),
    img(1, "bomb_9000x9000.png", real_png_bomb, "exceeds the limit of 64000000 pixels"),
    img(0, "grayscale.png", lambda p: save_image(p, "L")),
    img(0, "rgba.png", lambda p: save_image(p, "RGBA")),
    img(0, "palette.png", lambda p: save_image(p, "P", transparency=0)),
    img(0, "sixteen_bit.png", sixteen_bit),
    img(0, "cmyk.jpg", lambda p: save_image(p, "CMYK")),
    img(0, "exif_rotated.jpg", exif_rotated),
    img(0, "one_bit.png", lambda p: save_image(p, "1")),
    img(0, "grey_alpha.png", lambda p: save_image(p, "LA")),
    img(0, "one_pixel.png", lambda p: save_image(p, size=(1, 1))),
    img(0, "very_wide.png", lambda p: save_image(p, "L", size=(20000, 2))),
    img(0, "animated.gif", animated_gif),
    img(0, "float.tiff", lambda p: save_image(p, "F")),
    img(0, "webp_named.jpg", lambda p: save_image(p, format="WEBP")),
    img(1, "ztxt_bomb.png", ztxt_bomb, "too large"),
    img(0, "exif_bad_orientation.jpg", exif_bad_orientation),
    Case("image_dev_zero", ask("--image", "/dev/zero", "--text", "hi"), 1, None, "not a file"),
    # ---------------- audio
    aud(1, "missing.wav", None, "not found"),
    aud(1, "a_dir.wav", make_dir, "not a file"),
    aud(1, "empty.wav", bytes_file(b""), "is empty"),
    aud(1, "text.wav", bytes_file(b"not audio at all\n" * 50), "cannot decode"),
    aud(1, "random.flac", bytes_file(np.random.default_rng(3).bytes(5000)), "cannot decode"),
    aud(1, "zero_samples.wav", lambda p: write_audio(p, np.zeros(0, np.float32), 16000), "no samples"),
    aud(1, "header_only.wav", wav_header_only, "no samples"),
    aud(1, "nan_samples.wav", lambda p: write_audio(p, np.full(800, np.nan, np.float32), 16000, subtype="FLOAT"),
        "NaN"),
    aud(0, "8k_stereo_int16.wav", lambda p: write_audio(p, tone(1.0, 8000, 2), 8000, subtype="PCM_16")),
    aud(0, "48k_24bit.wav", lambda p: write_audio(p, tone(1.0, 48000), 48000, subtype="PCM_24")),
    aud(0, "speech.flac", lambda p: write_audio(p, tone(1.0), 16000, format="FLAC")),
    aud(0, "speech.ogg", lambda p: write_audio(p, tone(1.0, 22050), 22050, format="OGG", subtype="VORBIS")),
    aud(0, "one_sample.wav", lambda p: write_audio(p, tone(1.0)[:1], 16000)),
    aud(0, "six_channels.wav", lambda p: write_audio(p, tone(0.5, 16000, 6), 16000)),
    aud(1, "impossible_sample_rate.wav", wav_impossible_rate, "cannot decode"),
    aud(0, "one_hertz_sample_rate.wav", lambda p: write_audio(p, tone(100.0, 1), 1),
        r"warning: audio trimmed"),
    aud(0, "mu_law.wav", lambda p: write_audio(p, tone(1.0, 8000), 8000, subtype="ULAW")),
    aud(0, "unsigned_8bit.wav", lambda p: write_audio(p, tone(1.0), 16000, subtype="PCM_U8")),
    aud(0, "speech.mp3", lambda p: write_audio(p, tone(1.0, 22050), 22050, format="MP3")),
    aud(0, "ten_minutes.wav", lambda p: write_audio(p, tone(TEN_MINUTES), 16000, subtype="PCM_16"),
        # only the ~10 s the context can use is decoded: test_load_audio_decodes_only_what_is_asked
        r"warning: audio trimmed to its first \d+\.\d+ s"),
    aud(1, "flac_header_claims_49_days.flac", flac_claiming_days, "cannot decode"),
    Case("audio_transcribe_header_claims_49_days", chat("--audio_in", "{d}/long.flac", "--transcribe"), 1,
         lambda env: flac_claiming_days(env.d / "long.flac"), "over the transcription limit of 86400 s"),
    Case("audio_transcribe_not_audio", chat("--audio_in", "{d}/x.wav", "--transcribe"), 1,
         lambda env: (env.d / "x.wav").write_text("hello"), "cannot decode"),
    # ---------------- video
    vid(1, "missing.mp4", None, "not found"),
    vid(1, "empty.mp4", bytes_file(b""), "is empty"),
    vid(1, "text.mp4", bytes_file(b"not a video\n" * 40), "cannot decode"),
    vid(1, "audio_only.mka", audio_only_container, "no video stream"),
    vid(1, "zero_frames.avi", zero_frame_video, "no frames"),
    vid(1, "zero_frames_header_only.mkv", zero_frame_video, "no frames"),
    vid(1, "truncated.mp4", lambda p: truncated(make_video(p).read_bytes(), 0.5)(p), "no video stream|cannot decode"),
    vid(2, "absurd_frame_count.mp4", make_video, "256", extra=("--video_frames", "1000000")),  # refused, as 0 is
    vid(0, "fewer_frames_than_asked.mp4", lambda p: make_video(p, frames=2), extra=("--video_frames", "6")),
    vid(0, "still_image.png", lambda p: save_image(p)),
    # ---------------- text
    Case("text_empty", ask("--text", ""), 0),
    Case("text_whitespace_only", ask("--text", " \t "), 0),
    Case("text_control_characters", ask("--text", "bell\x07 esc\x1b[2J del\x7f \x01\x02 tab\t end"), 0),
    Case("text_120k_characters_argv", ask("--text", "what is one plus two ? " * 5200), 0,
         match=r"warning: prompt trimmed"),
    Case("stdin_200k_characters", chat("--max_new_tokens", "2"), 0,
         stdin=("hello world how are you " * 8400).encode() + b"\n", match=r"warning: line 1: prompt trimmed"),
    Case("stdin_invalid_utf8", chat("--max_new_tokens", "2"), 0, direct=True,
         stdin=b"caf\xe9 \xff\xfe hello\n\xc3\x28 \xa0\xa1\n", stdout=r"^[^\n]*\n[^\n]*\n$"),
    Case("stdin_nul_and_control_bytes", chat("--max_new_tokens", "2"), 0,
         stdin=b"a\x00b\x07c\x1b[0m\r\n\x00\x00\n", stdout=r"^[^\n]*\n[^\n]*\n$"),
    Case("text_emoji_rtl_combining", ask("--text", "🦜 مرحبا e\u0301\u0301 \U0001F468\u200D\U0001F469 ﷽"), 0),
    Case("stdin_image_command_without_path", chat("--max_new_tokens", "2"), 1, stdin=pipe_lines("/image", "hi"),
         match="needs a file path"),
    Case("stdin_image_command_missing_file", chat("--max_new_tokens", "2"), 1,
         stdin=pipe_lines("/image {d}/nope.png", "what is it ?"), match="line 1: image file .* not found"),
    Case("stdin_empty", chat("--max_new_tokens", "2"), 0, stdin=b"", stdout=r"^$"),
    Case("stdin_no_final_newline", chat("--max_new_tokens", "2"), 0, stdin=b"hello", stdout=r"^[^\n]*\n$"),
    Case("argv_invalid_utf8", [], 0, direct=True,
         raw_args=[b"--ckpt_dir", b"{tree}", b"--max_new_tokens", b"2", b"--text", b"caf\xe9 \xff hello"]),
    # ---------------- outputs
    out_case("missing_directory", "{d}/missing/out.wav", 1, match="does not exist"),
    out_case("onto_a_directory", "{d}", 1, match="is a directory"),
    out_case("parent_is_a_file", "{d}/notadir/out.wav", 1, file_as_parent),
    out_case("under_proc", "/proc/muomni_test.wav", 1, match="cannot write"),
    out_case("empty_path", "", 1, match="empty"),
    out_case("name_too_long", "{d}/" + "n" * 300 + ".wav", 1, match="too long|cannot write"),
    out_case("dev_null", "/dev/null", 0, check=devnull_intact),
    Case("audio_out_too_many_frames", ask("--text", "hi", "--audio_out", "{d}/s.wav", "--max_audio_frames",
                                         "1000000000"), 1, None, "frames", absent=["{d}/s.wav"]),
    # ---------------- flags
    flag("max_new_tokens_zero", "--max_new_tokens", "0"),
    flag("max_new_tokens_negative", "--max_new_tokens", "-5"),
    flag("max_new_tokens_not_a_number", "--max_new_tokens", "lots"),
    flag("max_new_tokens_beyond_context", "--max_new_tokens", "100000", rc=0,
         match="max_new_tokens 100000 cut to"),  # the budget is cut to fit, with a warning
    flag("temperature_negative", "--temperature", "-0.5"),
    flag("temperature_nan", "--temperature", "nan"),
    flag("temperature_tiny", "--temperature", "1e-30", "--seed", "1", "--max_new_tokens", "3", rc=0),
    flag("top_p_zero", "--top_p", "0"),
    flag("top_p_above_one", "--top_p", "1.5"),
    flag("top_p_negative", "--top_p", "-0.2"),
    flag("top_k_negative", "--top_k", "-1"),
    flag("top_k_larger_than_vocab", "--top_k", "1000000", "--temperature", "1", "--max_new_tokens", "2", rc=0),
    flag("repetition_penalty_zero", "--repetition_penalty", "0"),
    flag("seed_negative", "--seed", "-3"),
    flag("seed_beyond_64_bits", "--seed", str(2 ** 70), "--temperature", "1", "--max_new_tokens", "2"),
    flag("video_frames_zero", "--video_frames", "0"),
    flag("max_audio_frames_zero", "--max_audio_frames", "0"),
    flag("device_unknown", "--device", "tpu"),
    flag("dtype_unknown", "--dtype", "int4"),
    flag("unknown_option", "--frobnicate"),
    Case("flag_missing_ckpt_dir", ["--text", "hi"], 2),
    Case("flag_transcribe_without_audio", chat("--transcribe"), 2),
    Case("flag_audio_out_in_pipe_mode", chat("--audio_out", "{d}/x.wav"), 2, absent=["{d}/x.wav"]),
    Case("flag_device_cuda_absent", chat("--text", "hi", "--device", "cuda"), 1, match="cuda", direct=True),
    Case("image_text_png_fresh_interpreter_agrees", ask("--image", "{d}/text.png", "--text", "hi"), 1,
         lambda env: (env.d / "text.png").write_text("not an image"), "cannot decode",
         check=same_as_fresh_interpreter),
]


# ---------------------------------------------------------------- resources, pipes, links, formats, exports

def fifo(path: Path) -> None:
    os.mkfifo(path)


def edit_json(path: Path, edit: Callable[[dict], Any]) -> None:
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def thinker_raw_config(env: Env, raw: bytes) -> None:
    copy_thinker(env)
    (env.d / "thinker_tiny" / "config.json").write_bytes(raw)


def thinker_json_value(key: str, raw: str) -> Callable[[Env], Any]:
    """The thinker's own config.json holding `"key": raw` (raw JSON text: NaN, 1e-300, a 5000-digit number)."""
    return lambda env: thinker_raw_config(env, ('{"%s": %s}' % (key, raw)).encode())


def thinker_config_links_to(target: str) -> Callable[[Env], Any]:
    def build(env: Env) -> None:
        copy_thinker(env)
        os.symlink(target, env.d / "thinker_tiny" / "config.json")
    return build


def ctc_index(value: str) -> Callable[[Env], Any]:
    return lambda env: tree_copy(env, lambda t: (t / "audio_enc_tiny" / "audio_enc_metadata.json").write_text(
        '{"char_to_idx": {"<BLANK>": 0, "<UNK>": %s, " ": 2}}' % value))


def vocoder_config(**values: Any) -> Callable[[Env], Any]:
    return lambda env: tree_copy(env, lambda t: edit_json(t / "configs" / "vocoder_tiny.json",
                                                          lambda cfg: cfg.update(values)))


def thinker_tensor_as(key: str, dtype: str) -> Callable[[Env], Any]:
    import torch
    return lambda env: edit_thinker(env, lambda sd: sd.__setitem__(key, sd[key].to(getattr(torch, dtype))))


def export_tensor_as(key: str, dtype: str) -> Callable[[Env], Any]:
    import torch
    return lambda env: edit_export(env, lambda sd: sd.__setitem__(key, sd[key].to(getattr(torch, dtype))))


class ZeroBlocks:
    """A raw-deflate compressor for 1 MiB blocks of zeros that deflates one block once: each block ends in a full
    flush, which resets the compressor, so every block's bytes are the same (deflating 1 GiB took seconds)."""
    SIZE = 1 << 20

    def __init__(self) -> None:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        self.block = c.compress(bytes(self.SIZE)) + c.flush(zlib.Z_FULL_FLUSH)
        self.end = c.flush()

    def compress(self, data: bytes) -> bytes:
        assert len(data) == self.SIZE and data.count(0) == self.SIZE, "ZeroBlocks takes 1 MiB blocks of zeros"
        return self.block

    def flush(self) -> bytes:
        return self.end


def zip_bomb_checkpoint(env: Env) -> None:
    """thinker.pt re-zipped with its records deflated, plus one record declaring 1 GiB of zeros: a file of
    about a MB whose storage would inflate to 1 GiB."""
    import zipfile
    from unittest import mock
    d = copy_thinker(env)
    src = (d / "thinker.pt").read_bytes()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(d / "thinker.pt", "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        prefix = zin.infolist()[0].filename.split("/")[0]
        with mock.patch.object(zipfile, "_get_compressor", lambda *a, **k: ZeroBlocks()):
            record = zout.open(f"{prefix}/data/999", "w", force_zip64=True)
        with record as f:  # zipfile still counts the CRC and sizes of what is written
            chunk = bytes(ZeroBlocks.SIZE)
            for _ in range(1024):
                f.write(chunk)


def tiff_claiming(width: int, height: int, bits: int, sample_format: int) -> bytes:
    """A baseline little-endian TIFF header declaring a width x height single-sample image (no pixel data)."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, bits), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, width * height * bits // 8),
               (339, 3, 1, sample_format)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 else
                                                 struct.pack("<I", value)) for tag, kind, count, value in entries)
    return b"II*\x00" + struct.pack("<I", 8 + 16) + bytes(16) + ifd + struct.pack("<I", 0)


def safetensors_many_keys(n: int) -> Callable[[Env], Any]:
    """An export whose header lists n empty U8 tensors. The header's JSON is written as text: the same bytes
    json.dumps gives for the dict, without building a million dicts first (that took most of this battery's
    setup)."""
    def build(env: Env) -> None:
        entry = '{"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}'
        raw = ("{" + ", ".join(f'"thinker.k{i}": {entry}' for i in range(n)) + "}").encode()
        write_export(env, struct.pack("<Q", len(raw)) + raw)
    return build


def batch(*lines: str, good: str = '{"text": "hello"}') -> Callable[[Env], Any]:
    """A --batch_file whose first lines are the bad ones and whose last line is a good request."""
    return lambda env: (env.d / "batch.jsonl").write_text("\n".join([*lines, good]) + "\n", encoding="utf-8",
                                                          errors="surrogatepass")


def last_line_answered(env: Env, result: dict) -> None:
    rows = [json.loads(line) for line in result["stdout"].splitlines()]
    assert rows and "error" in rows[0] and "text" in rows[-1] and "error" not in rows[-1], rows


def batch_case(name: str, *lines: str, match: str) -> Case:
    return Case(f"batch_line_{name}", chat("--max_new_tokens", "2", "--batch_file", "{d}/batch.jsonl"), 1,
                batch(*lines), "line 1: .*" + match, check=last_line_answered)


def batch_source(name: str, target: str, build: Callable[[Env], Any] | None, match: str) -> Case:
    return Case(f"batch_file_{name}", chat("--max_new_tokens", "2", "--batch_file", target), 1, build, match)


def fifo_with_reader(env: Env) -> None:
    """A FIFO as --audio_out, with `cat` copying what arrives into received.wav. No time limit on the reader:
    the run may come minutes after this build on a busy machine (a 300 s limit once killed the reader first,
    and the run then hung opening the FIFO); fifo_reader_got_a_whole_wav ends it by an event instead."""
    os.mkfifo(env.d / "speech.fifo")
    env.d.joinpath("reader.pid").write_text(str(subprocess.Popen(
        ["sh", "-c", 'cat "$0" > "$1"', str(env.d / "speech.fifo"), str(env.d / "received.wav")]).pid))


def process_running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has ended; a reaped process is gone)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


def fifo_reader_got_a_whole_wav(env: Env, result: dict) -> None:
    """Waits for the reader to end, then reads what it received. The run has ended, so the reader sees EOF once
    no writer is left; opening and closing the FIFO for writing here releases a reader still waiting for its
    first writer (a run that never opened the FIFO: received.wav is then empty and the check fails)."""
    import soundfile as sf
    pid = int((env.d / "reader.pid").read_text())
    try:
        os.close(os.open(env.d / "speech.fifo", os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: no reader is waiting (it has read the run's data, or it is gone)
        pass
    while process_running(pid):
        time.sleep(0.05)
    data = (env.d / "received.wav").read_bytes()
    riff, = struct.unpack("<I", data[4:8])
    assert riff == len(data) - 8, f"RIFF size field {riff}, file {len(data)} bytes"
    info = sf.info(str(env.d / "received.wav"))
    assert info.frames > 0 and info.samplerate == 16000 and 44 + 2 * info.frames == len(data)


def device_intact(path: str) -> Callable[[Env, dict], Any]:
    def check(env: Env, result: dict) -> None:
        assert stat.S_ISCHR(os.stat(path).st_mode), f"{path} was replaced by a regular file"
    return check


def link_intact(path: str) -> Callable[[Env, dict], Any]:
    """/dev/stdout must stay the system's symlink (a WAV renamed over it would break every later user of it)."""
    def check(env: Env, result: dict) -> None:
        assert os.path.islink(path), f"{path} was replaced by a regular file"
    return check


def written_through_link(env: Env, result: dict) -> None:
    import soundfile as sf
    assert os.path.islink(env.d / "latest.wav") and sf.info(str(env.d / "takes" / "042.wav")).frames > 0
    assert sorted(p.name for p in (env.d / "takes").iterdir()) == ["042.wav"]


def previous_take_kept(env: Env, result: dict) -> None:
    assert (env.d / "out.wav").read_bytes() == b"the previous take"


def previous_take(env: Env) -> None:
    (env.d / "out.wav").write_bytes(b"the previous take")


def wav_written(name: str) -> Callable[[Env, dict], Any]:
    def check(env: Env, result: dict) -> None:
        import soundfile as sf
        path = env.d / os.fsdecode(name.encode("utf-8", "surrogateescape"))
        assert sf.info(os.fsencode(path)).frames > 0
    return check


def export_args(*extra: str) -> list[str]:
    return ["--ckpt_root", "{tree}", *extra]


def export_case(name: str, args: list[str], rc: int, build: Callable[[Env], Any] | None = None,
                match: str | None = None, **kw: Any) -> Case:
    return Case(f"export_{name}", args, rc, build, match, script="export.py", **kw)


def no_work_dirs(env: Env, result: dict) -> None:
    left = [p.name for p in env.d.iterdir() if re.search(r"\.(tmp|old)-", p.name)]
    assert not left, left


def export_made(name: str) -> Callable[[Env, dict], Any]:
    def check(env: Env, result: dict) -> None:
        assert (env.d / name / "model.safetensors").is_file() and "verify: weights: max abs diff 0 " in result["stdout"]
    return check


def nothing_beside(env: Env, result: dict) -> None:
    """Nothing left in or beside the case's directory (`..old-*` was the leftover of `--output_dir .`)."""
    assert not [p for p in env.d.iterdir() if p.name.startswith(".")]
    beside = [p.name for p in env.d.parent.iterdir() if p.name.startswith(f".{env.d.name}.")]
    assert not beside, beside


def bounded(env: Env, result: dict) -> None:
    """Refused from the declared sizes, before the work: the case's process (forked from the warm runner, so
    counting only what it touched itself; about 200 MiB for a refusal) peaked far below the 1 GiB that
    inflating the input would take."""
    assert result["max_rss_kib"] < 512 * 1024, f"peak resident size {result['max_rss_kib'] / 1024:.0f} MiB"


def stale_work_dirs(env: Env) -> None:
    """What runs killed with SIGKILL leave: a temp export of a dead pid (and one of a live pid, kept)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    (env.d / f".out.tmp-{dead.pid}-0badc0de").mkdir()
    (env.d / f".out.tmp-{dead.pid}-0badc0de" / "model.safetensors").write_bytes(b"partial")
    (env.d / f".out.tmp-{os.getpid()}-0badc0de").mkdir()


def stale_cleaned(env: Env, result: dict) -> None:
    names = sorted(p.name for p in env.d.iterdir() if p.name.startswith(".out."))
    assert names == [f".out.tmp-{os.getpid()}-0badc0de"], names
    assert (env.d / "out" / "model.safetensors").is_file()
    (env.d / names[0]).rmdir()


def concat_script(env: Env) -> None:
    make_video(env.d / "inner.mp4")
    (env.d / "list.txt").write_text("ffconcat version 1.0\nfile inner.mp4\nfile /etc/hostname\n")


def hls_playlist(env: Env) -> None:
    make_video(env.d / "inner.mp4")
    (env.d / "list.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\ninner.mp4\n#EXT-X-ENDLIST\n")


def image_sequence(env: Env) -> None:
    """A file literally named img%03d.png plus img001.png, img002.png: only the named file may be read."""
    save_image(env.d / "img%03d.png")
    for i in (1, 2):
        (env.d / f"img{i:03d}.png").write_bytes(b"not an image: reading me is a bug")


NON_UTF8 = "\udce9"  # the byte 0xE9 of a Latin-1 file name, as os.fsdecode gives it
BAD_NAME = f"sp{NON_UTF8}ech"


def non_utf8_thinker(env: Env) -> None:
    shutil.copytree(env.tree / "thinker_tiny", env.d / f"thinker_{NON_UTF8}")


def non_utf8_export(env: Env) -> None:
    shutil.copytree(env.export, env.d / f"exp{NON_UTF8}rt")


def raw(*args: str) -> list[bytes]:
    return [a.encode("utf-8", "surrogateescape") for a in args]


CASES += [
    # ---------------- output faults
    Case("audio_out_dev_full", ask("--text", "hello there", "--audio_out", "/dev/full"), 1, None,
         "/dev/full: cannot write \\(No space left on device\\)", check=device_intact("/dev/full")),
    Case("audio_out_dev_stdout", ask("--text", "hi", "--audio_out", "/dev/stdout"), 1, None,
         "is this program's standard output", stdout="^$", check=link_intact("/dev/stdout")),
    Case("audio_out_dev_stderr", ask("--text", "hi", "--audio_out", "/dev/stderr"), 1, None,
         "is this program's standard error", check=link_intact("/dev/stderr")),
    Case("audio_out_proc_self_fd_1", ask("--text", "hi", "--audio_out", "/proc/self/fd/1"), 1, None,
         "standard output"),
    Case("audio_out_fifo_gets_a_whole_wav", ask("--text", "hello there", "--audio_out", "{d}/speech.fifo"), 0,
         fifo_with_reader, check=fifo_reader_got_a_whole_wav),
    Case("audio_out_file_size_limit", ask("--text", "hello there", "--audio_out", "{d}/out.wav"), 1,
         previous_take, "File too large", fsize=8192, check=previous_take_kept),
    Case("audio_out_symlink_written_through", ask("--text", "hello there", "--audio_out", "{d}/latest.wav"), 0,
         lambda env: ((env.d / "takes").mkdir(), (env.d / "takes" / "042.wav").write_bytes(b"old"),
                      os.symlink("takes/042.wav", env.d / "latest.wav")), check=written_through_link),
    Case("audio_out_newline_in_name", ask("--text", "hi", "--audio_out", "{d}/a\nerror: forged/x.wav"), 1, None,
         r"a\\nerror: forged.*does not exist"),
    Case("audio_out_non_utf8_name", [], 0, direct=True, raw_args=raw(
        "--ckpt_dir", "{tree}", "--max_new_tokens", "2", "--text", "hello there", "--audio_out",
        "{d}/" + BAD_NAME + ".wav", "--json"), check=wav_written(BAD_NAME + ".wav")),
    export_case("onto_dev_full_parent", export_args("--output_dir", "/dev/full/x"), 1, None, "not exist|not a dir"),
    export_case("file_size_limit", export_args("--output_dir", "{d}/out"), 1, None, "cannot write.*too large",
                fsize=4096, check=no_work_dirs, absent=["{d}/out"]),
    # ---------------- config and metadata values
    Case("config_nested_100000_deep", thinker_q(), 1, lambda env: thinker_raw_config(env, b"[" * 100000),
         "nested too deeply"),
    Case("config_nested_object_deep", thinker_q(), 1,
         lambda env: thinker_raw_config(env, b'{"a":' * 50000 + b"1" + b"}" * 50000), "nested too deeply"),
    Case("config_5000_digit_integer", thinker_q(), 1, thinker_json_value("ctx_len", "9" * 5000), "not valid JSON"),
    Case("config_4000_digit_integer", thinker_q(), 1, thinker_json_value("n_heads", "7" * 4000), "does not divide|limit"),
    Case("config_ctx_len_nan", thinker_q(), 1, thinker_json_value("ctx_len", "NaN"), "positive integer"),
    Case("config_ctx_len_infinity", thinker_q(), 1, thinker_json_value("ctx_len", "Infinity"), "positive integer"),
    Case("config_ctx_len_fraction", thinker_q(), 1, thinker_json_value("ctx_len", "100.5"), "positive integer"),
    Case("config_ctx_len_bool", thinker_q(), 1, thinker_json_value("ctx_len", "true"), "positive integer"),
    Case("config_ctx_len_string", thinker_q(), 1, thinker_json_value("ctx_len", '"512"'), "positive integer"),
    Case("config_ctx_len_list", thinker_q(), 1, thinker_json_value("ctx_len", "[512]"), "positive integer"),
    Case("config_n_heads_zero", thinker_q(), 1, thinker_json_value("n_heads", "0"), "positive integer"),
    Case("config_n_heads_1e30", thinker_q(), 1, thinker_json_value("n_heads", "1e30"), "does not divide"),
    Case("config_rope_theta_1e-300", thinker_q(), 1, thinker_json_value("rope_theta", "1e-300"), "rope_theta"),
    Case("config_rope_theta_half", thinker_q(), 1, thinker_json_value("rope_theta", "0.5"), "outside the usable"),
    Case("config_rope_theta_one", thinker_q(), 1, thinker_json_value("rope_theta", "1"), "outside the usable"),
    Case("config_rope_theta_1e300", thinker_q(), 1, thinker_json_value("rope_theta", "1e300"), "outside the usable"),
    Case("config_rope_theta_negative", thinker_q(), 1, thinker_json_value("rope_theta", "-10000"), "positive"),
    Case("config_rope_theta_nan", thinker_q(), 1, thinker_json_value("rope_theta", "NaN"), "positive"),
    Case("config_rope_theta_string", thinker_q(), 1, thinker_json_value("rope_theta", '"10k"'), "positive"),
    Case("config_experts_per_token_negative", thinker_q(), 1,
         thinker_json_value("num_experts_per_tok", "-1"), "positive integer"),
    Case("config_invalid_utf8", thinker_q(), 1, lambda env: thinker_raw_config(env, b'{"n_heads": "\xff\xfe"}'),
         "not valid JSON"),
    Case("config_nul_bytes", thinker_q(), 1, lambda env: thinker_raw_config(env, b"\x00" * 64), "not valid JSON"),
    Case("config_17_megabytes", thinker_q(), 1,
         lambda env: thinker_raw_config(env, b'{"pad": "' + b"x" * (17 << 20) + b'"}'), "over the limit"),
    Case("config_is_a_directory", thinker_q(), 1, lambda env: (copy_thinker(env) / "config.json").mkdir(),
         "directory, not a regular file"),
    Case("config_is_a_fifo", thinker_q(), 1, lambda env: fifo(copy_thinker(env) / "config.json"), "FIFO"),
    Case("config_links_to_dev_zero", thinker_q(), 1, thinker_config_links_to("/dev/zero"), "not a regular file"),
    Case("config_links_to_dev_urandom", thinker_q(), 1, thinker_config_links_to("/dev/urandom"),
         "not a regular file"),
    Case("config_dangling_symlink", thinker_q(), 1, thinker_config_links_to("/nonexistent/cfg.json"),
         "cannot read"),
    Case("configs_dir_holds_a_stray_fifo", ["--ckpt_dir", "{d}/checkpoints", "--max_new_tokens", "2", "--text", "hi"],
         0, lambda env: tree_copy(env, lambda t: fifo(t / "configs" / "aaa_stray.json"))),
    Case("configs_dir_holds_dev_zero_link", ["--ckpt_dir", "{d}/checkpoints", "--max_new_tokens", "2", "--text",
                                            "hi"], 0,
         lambda env: tree_copy(env, lambda t: os.symlink("/dev/zero", t / "configs" / "aaa_zero.json"))),
    Case("generation_config_is_a_fifo", thinker_q(), 1, lambda env: fifo(copy_thinker(env) /
                                                                         "generation_config.json"), "FIFO"),
    Case("generation_config_max_new_tokens_overflow", thinker_q()[:4], 1,
         lambda env: (copy_thinker(env) / "generation_config.json").write_text('{"max_new_tokens": 1e400}'),
         "max_new_tokens"),
    Case("generation_config_top_k_nan", thinker_q()[:4], 1,
         lambda env: (copy_thinker(env) / "generation_config.json").write_text('{"top_k": NaN}'), "top_k"),
    Case("config_d_model_overflow", thinker_q(), 1, thinker_json_value("d_model", "1e400"), "'d_model' is inf"),
    Case("generation_config_deep", thinker_q(), 1, lambda env: (copy_thinker(env) / "generation_config.json")
         .write_bytes(b"[" * 20000), "nested too deeply"),
    Case("weights_step_file_is_a_fifo", thinker_q(), 1,
         lambda env: ((copy_thinker(env) / "thinker.pt").unlink(), fifo(env.d / "thinker_tiny" / "thinker_step_9.pt")),
         "FIFO"),
    Case("ctc_index_word", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1, ctc_index('"one"'), "char_to_idx"),
    Case("ctc_index_nan", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1, ctc_index("NaN"), "char_to_idx"),
    Case("ctc_index_list", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1, ctc_index("[0]"), "char_to_idx"),
    Case("ctc_index_fraction", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1, ctc_index("1.5"), "char_to_idx"),
    Case("ctc_index_bool", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1, ctc_index("true"), "char_to_idx"),
    Case("ctc_index_negative", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1, ctc_index("-1"), "char_to_idx"),
    Case("ctc_index_repeated", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1, ctc_index("0"), "char_to_idx"),
    Case("ctc_index_huge", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1, ctc_index("9" * 400), "char_to_idx"),
    Case("ctc_index_null", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1, ctc_index("null"), "char_to_idx"),
    Case("vocoder_negative_upsample_rate", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         vocoder_config(upsample_rates=[8, 8, -2, 2]), "upsample rate -2"),
    Case("vocoder_rate_beyond_kernel", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         vocoder_config(upsample_rates=[40, 8, 2, 2]), "upsample rate 40"),
    Case("vocoder_zero_upsample_rate", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         vocoder_config(upsample_rates=[8, 0, 2, 2]), "upsample rate 0"),
    Case("vocoder_too_few_rates", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         vocoder_config(upsample_rates=[8, 8]), "upsampling layers"),
    Case("vocoder_rates_not_numbers", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         vocoder_config(upsample_rates=["8", 8, 2, 2]), "list of integers"),
    Case("vocoder_rates_not_a_list", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         vocoder_config(upsample_rates=8), "list of integers"),
    Case("vocoder_negative_dilation", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         vocoder_config(resblock_dilation_sizes=[[1, -2], [1, 2], [1, 2]]), "dilation -2"),
    Case("vocoder_zero_dilation", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         vocoder_config(resblock_dilation_sizes=[[0, 2], [1, 2], [1, 2]]), "dilation 0"),
    Case("vocoder_huge_dilation", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         vocoder_config(resblock_dilation_sizes=[[1, 10 ** 9], [1, 2], [1, 2]]), "dilation 1000000000"),
    Case("vocoder_dilations_wrong_count", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         vocoder_config(resblock_dilation_sizes=[[1, 2, 3], [1, 2], [1, 2]]), "does not match the weights"),
    Case("vocoder_dilations_flat", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         vocoder_config(resblock_dilation_sizes=[1, 2]), "lists of integers"),
    Case("vocoder_dilations_bool", ["--ckpt_dir", "{d}/checkpoints", "--text", "hi"], 1,
         vocoder_config(resblock_dilation_sizes=[[True, 2], [1, 2], [1, 2]]), "lists of integers"),
    # ---------------- sampling values that pass validation must work (and stay the same answer where defined)
    flag("temperature_1e-300", "--temperature", "1e-300", "--max_new_tokens", "3", rc=0),
    flag("temperature_denormal", "--temperature", "5e-324", "--max_new_tokens", "3", rc=0),
    flag("temperature_1e300", "--temperature", "1e300", "--seed", "3", "--max_new_tokens", "3", rc=0),
    flag("repetition_penalty_1e-300_sampling", "--repetition_penalty", "1e-300", "--temperature", "1",
         "--max_new_tokens", "3", rc=0),
    flag("repetition_penalty_1e300_sampling", "--repetition_penalty", "1e300", "--temperature", "1",
         "--max_new_tokens", "3", rc=0),
    flag("repetition_penalty_1e-300_greedy", "--repetition_penalty", "1e-300", "--max_new_tokens", "3", rc=0),
    flag("top_p_1e-300_sampling", "--top_p", "1e-300", "--temperature", "1", "--max_new_tokens", "3", rc=0),
    flag("top_p_1e-300_tiny_temperature", "--top_p", "1e-300", "--temperature", "1e-300", "--top_k", "1",
         "--max_new_tokens", "3", rc=0),
    Case("audio_temperature_1e-300", ask("--text", "hello there", "--audio_out", "{d}/s.wav", "--audio_temperature",
                                         "1e-300"), 0, check=wav_written("s.wav")),
    Case("audio_temperature_1e300", ask("--text", "hello there", "--audio_out", "{d}/s.wav", "--audio_temperature",
                                        "1e300", "--seed", "2"), 0, check=wav_written("s.wav")),
    Case("generation_config_temperature_1e-300", thinker_q()[:4] + ["--max_new_tokens", "3"], 0,
         lambda env: (copy_thinker(env) / "generation_config.json").write_text(
             '{"do_sample": true, "temperature": 1e-300, "top_p": 1e-300}')),
    # ---------------- --batch_file: one bad line is that line's error, the others are answered
    batch_case("video_frames_string", '{"text": "hi", "video": "x.mp4", "video_frames": "4"}',
               match="video_frames"),
    batch_case("video_frames_bool", '{"text": "hi", "video": "x.mp4", "video_frames": true}', match="video_frames"),
    batch_case("video_frames_float", '{"text": "hi", "video": "x.mp4", "video_frames": 2.5}', match="video_frames"),
    batch_case("video_frames_zero", '{"text": "hi", "video": "x.mp4", "video_frames": 0}', match="video_frames"),
    batch_case("null_line", "null", match="JSON object"),
    batch_case("video_frames_null", '{"text": "hi", "video": "missing.mp4", "video_frames": null}',
               match="video file .*missing.mp4: not found"),
    batch_case("list_line", "[1, 2]", match="JSON object"),
    batch_case("audio_number", '{"text": "hi", "audio": 5}', match="audio must be a string"),
    batch_case("audio_list", '{"text": "hi", "audio": ["a.wav"]}', match="audio must be a string"),
    batch_case("audio_object", '{"text": "hi", "audio": {"path": "a.wav"}}', match="audio must be a string"),
    batch_case("image_number", '{"text": "hi", "image": 7}', match="image must be a string"),
    batch_case("video_bool", '{"text": "hi", "video": false}', match="video must be a string"),
    batch_case("deep_nesting", "[" * 100000, match="nested too deeply"),
    batch_case("deep_nesting_in_text", '{"text": ' + "[" * 50000 + "1" + "]" * 50000 + "}",
               match="nested too deeply"),
    batch_case("5000_digit_number", '{"text": "hi", "video_frames": ' + "9" * 5000 + "}", match="not valid JSON"),
    batch_case("lone_surrogate_text", '{"text": "hi \\ud800 there", "image": 3}', match="image must be a string"),
    batch_case("text_number", '{"text": 42}', match="text must be a string"),
    batch_case("prompt_list", '{"prompt": ["a"]}', match="prompt must be a string"),
    batch_case("unknown_key", '{"text": "hi", "temperature": 2}', match="unknown key"),
    batch_case("image_with_nul", '{"text": "hi", "image": "a\\u0000b.png"}', match="image file .* not found"),
    batch_case("image_empty_path", '{"text": "hi", "image": ""}', match="image file .*not a file"),
    batch_case("audio_dev_zero", '{"text": "hi", "audio_in": "/dev/zero"}', match="not a file"),
    batch_case("video_dev_urandom", '{"text": "hi", "video": "/dev/urandom"}', match="not a file"),
    batch_case("not_json", "{text: hi}", match="not valid JSON"),
    batch_case("nan_frames", '{"text": "hi", "video": "x.mp4", "video_frames": NaN}', match="video_frames"),
    Case("batch_line_lone_surrogate_answered", chat("--max_new_tokens", "2", "--batch_file", "{d}/batch.jsonl"), 0,
         batch('{"text": "hi \\ud800 there"}'), stdout=r'\\ud800'),
    batch_source("dev_zero", "/dev/zero", None, "not a regular file"),
    batch_source("dev_urandom", "/dev/urandom", None, "not a regular file"),
    batch_source("fifo", "{d}/batch.fifo", lambda env: fifo(env.d / "batch.fifo"), "not a regular file"),
    batch_source("directory", "{d}", None, "not a regular file"),
    batch_source("link_to_dev_zero", "{d}/b.jsonl", lambda env: os.symlink("/dev/zero", env.d / "b.jsonl"),
                 "not a regular file"),
    batch_source("missing", "{d}/nope.jsonl", None, "cannot read"),
    # ---------------- unbounded reads of media
    Case("audio_in_fifo", ask("--audio_in", "{d}/a.fifo", "--text", "hi"), 1, lambda env: fifo(env.d / "a.fifo"),
         "not a file"),
    Case("audio_in_dev_urandom", ask("--audio_in", "/dev/urandom", "--text", "hi"), 1, None, "not a file"),
    Case("image_fifo", ask("--image", "{d}/i.fifo", "--text", "hi"), 1, lambda env: fifo(env.d / "i.fifo"),
         "not a file"),
    Case("video_fifo", ask("--video", "{d}/v.fifo"), 1, lambda env: fifo(env.d / "v.fifo"), "not a file"),
    Case("transcribe_dev_zero", chat("--audio_in", "/dev/zero", "--transcribe"), 1, None, "not a file"),
    Case("tokenizer_is_a_fifo", thinker_q(), 1,
         lambda env: ((copy_thinker(env) / "tokenizer.model").unlink(), fifo(env.d / "thinker_tiny" /
                                                                             "tokenizer.model")), "tokenizer"),
    Case("export_config_is_a_fifo", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: ((export_copy(env) / "config.json").unlink(), fifo(env.d / "export" / "config.json")), "FIFO",
         script="infer_safetensors.py"),
    Case("export_component_config_links_to_dev_zero", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         lambda env: (export_copy(env), (env.d / "export" / "configs").mkdir(exist_ok=True),
                      edit_json(env.d / "export" / "config.json", lambda c: c.pop("vision", None)),
                      os.symlink("/dev/zero", env.d / "export" / "configs" / "vision_tiny.json")),
         "not a regular file", script="infer_safetensors.py"),
    # ---------------- silent wrong results
    Case("weights_int64_embedding", thinker_q(), 1, thinker_tensor_as("tok_emb.weight", "int64"), "integer"),
    Case("weights_int32_lm_head", thinker_q(), 1, thinker_tensor_as("lm_head.weight", "int32"), "integer"),
    Case("weights_bool_norm", thinker_q(), 1, thinker_tensor_as("norm.weight", "bool"), "bool"),
    Case("weights_uint8_block", thinker_q(), 1, thinker_tensor_as("blocks.0.norm1.weight", "uint8"), "integer"),
    Case("weights_int8_without_scale", thinker_q(), 1, thinker_tensor_as("blocks.1.norm2.weight", "int8"),
         "integer"),
    Case("export_i32_embedding", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         export_tensor_as("thinker.tok_emb.weight", "int32"), "integer", script="infer_safetensors.py"),
    Case("export_i64_embedding", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         export_tensor_as("thinker.tok_emb.weight", "int64"), "integer", script="infer_safetensors.py"),
    Case("export_bool_norm", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         export_tensor_as("thinker.norm.weight", "bool"), "bool", script="infer_safetensors.py"),
    Case("export_u8_projector", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         export_tensor_as("proj_v.weight", "uint8"), "integer", script="infer_safetensors.py"),
    Case("export_i16_audio", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1,
         export_tensor_as("audio_encoder.proj.weight", "int16"), "integer", script="infer_safetensors.py"),
    aud(1, "amplitude_1e30.wav", lambda p: write_audio(p, tone(1.0) * 1e30, 16000, subtype="FLOAT"),
        "samples reach 3e\\+29"),
    aud(1, "amplitude_3e38.wav", lambda p: write_audio(p, tone(1.0) * 1e38, 16000, subtype="FLOAT"),
        "over 65536 times full scale"),
    aud(1, "amplitude_100000.wav", lambda p: write_audio(p, np.full(1600, 1e5, np.float32), 16000,
                                                         subtype="FLOAT"), "samples reach 1e\\+05"),
    aud(0, "amplitude_raw_int16_in_float.wav", lambda p: write_audio(p, (tone(1.0) * 32767 / 0.3).astype(np.float32),
                                                                     16000, subtype="FLOAT")),
    aud(1, "amplitude_1e30_double.wav", lambda p: write_audio(p, tone(1.0) * 1e30, 16000, subtype="DOUBLE"),
        "full scale"),
    aud(0, "amplitude_1_5.wav", lambda p: write_audio(p, tone(1.0) * 5, 16000, subtype="FLOAT")),
    Case("transcribe_amplitude_1e30", chat("--audio_in", "{d}/loud.wav", "--transcribe"), 1,
         lambda env: write_audio(env.d / "loud.wav", tone(1.0) * 1e30, 16000, subtype="FLOAT"), "full scale"),
    # ---------------- names
    Case("image_newline_in_name", ask("--image", "{d}/x\nerror: forged.png", "--text", "hi"), 1, None,
         r"x\\nerror: forged\.png: not found"),
    Case("audio_carriage_return_in_name", ask("--audio_in", "{d}/x\rerror: forged.wav", "--text", "hi"), 1, None,
         r"x\\rerror: forged"),
    Case("ckpt_dir_newline_in_name", ["--ckpt_dir", "{d}/a\nerror: b", "--text", "hi"], 1, None, r"a\\nerror: b"),
    Case("video_escape_sequence_in_name", ask("--video", "{d}/\x1b[2Jclear.mp4"), 1, None, r"\\x1b\[2Jclear"),
    Case("image_newline_in_existing_name", ask("--image", "{d}/two\nlines.png", "--text", "hi"), 1,
         lambda env: (env.d / "two\nlines.png").write_text("not an image"), r"two\\nlines\.png: cannot decode"),
    Case("audio_non_utf8_name", [], 0, direct=True, raw_args=raw(
        "--ckpt_dir", "{tree}", "--max_new_tokens", "2", "--audio_in", "{d}/" + BAD_NAME + ".wav", "--text", "hi"),
         build=lambda env: (write_audio(env.d / "plain.wav", tone(0.5), 16000),
                            os.rename(env.d / "plain.wav", env.d / (BAD_NAME + ".wav")))),
    Case("image_non_utf8_name", [], 0, direct=True, raw_args=raw(
        "--ckpt_dir", "{tree}", "--max_new_tokens", "2", "--image", "{d}/" + BAD_NAME + ".png", "--text", "hi"),
         build=lambda env: save_image(env.d / (BAD_NAME + ".png"))),
    Case("video_non_utf8_name", [], 0, direct=True, raw_args=raw(
        "--ckpt_dir", "{tree}", "--max_new_tokens", "2", "--video", "{d}/" + BAD_NAME + ".mp4"),
         build=lambda env: os.rename(make_video(env.d / "plain.mp4"), env.d / (BAD_NAME + ".mp4"))),
    Case("thinker_dir_non_utf8_name", [], 0, direct=True, raw_args=raw(
        "--ckpt_dir", "{d}/thinker_" + NON_UTF8, "--max_new_tokens", "2", "--text", "hi"), build=non_utf8_thinker),
    Case("export_dir_non_utf8_name", [], 0, direct=True, script="infer_safetensors.py", raw_args=raw(
        "--ckpt_dir", "{d}/exp" + NON_UTF8 + "rt", "--max_new_tokens", "2", "--text", "hi"), build=non_utf8_export),
    Case("missing_non_utf8_name_reported_escaped", [], 1, direct=True, raw_args=raw(
        "--ckpt_dir", "{tree}", "--image", "{d}/" + BAD_NAME + ".png", "--text", "hi"), match=r"sp\\xe9ech\.png"),
    # ---------------- memory: declared sizes bounded before the work
    Case("ckpt_zip_records_inflate_to_1_gib", thinker_q(), 1, zip_bomb_checkpoint, "declare .* bytes",
         check=bounded),
    img(1, "float_8000x8000.tiff", bytes_file(tiff_claiming(8000, 8000, 32, 3)), "decodes to 256,000,000 bytes"),
    img(1, "int32_7500x7500.tiff", bytes_file(tiff_claiming(7500, 7500, 32, 2)), "over the limit"),
    img(1, "int16_7999x7999_claim.tiff", bytes_file(tiff_claiming(7999, 7999, 16, 1)), "cannot decode"),
    Case("safetensors_million_keys", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1, safetensors_many_keys(10 ** 6),
         "header too large", script="infer_safetensors.py", check=bounded),
    Case("safetensors_200k_keys", ["--ckpt_dir", "{d}/export", "--text", "hi"], 1, safetensors_many_keys(200_000),
         "over the limit of 65,536", script="infer_safetensors.py"),
    # ---------------- demuxers that open other files
    Case("video_ffconcat_script", ask("--video", "{d}/list.txt"), 1, concat_script, "concat script"),
    Case("video_ffconcat_named_mp4", ask("--video", "{d}/list.mp4"), 1,
         lambda env: (concat_script(env), shutil.copy(env.d / "list.txt", env.d / "list.mp4")), "concat script"),
    Case("video_hls_playlist", ask("--video", "{d}/list.m3u8"), 1, hls_playlist, "playlist"),
    Case("video_dash_manifest", ask("--video", "{d}/x.mpd"), 1,
         lambda env: (env.d / "x.mpd").write_text('<?xml version="1.0"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011">'
                                                  '</MPD>\n'), "manifest"),
    Case("video_sdp_session", ask("--video", "{d}/x.sdp"), 1,
         lambda env: (env.d / "x.sdp").write_text("v=0\no=- 0 0 IN IP4 127.0.0.1\nm=video 5004 RTP/AVP 96\n"),
         "manifest|playlist"),
    Case("video_image_pattern_reads_only_itself", ask("--video", "{d}/img%03d.png"), 0, image_sequence),
    # audio libsndfile cannot read goes to FFmpeg, under the same refusal as --video
    Case("audio_ffconcat_script", ask("--audio_in", "{d}/list.txt", "--text", "hi"), 1, concat_script,
         "concat script"),
    Case("transcribe_ffconcat_script", chat("--audio_in", "{d}/list.txt", "--transcribe"), 1, concat_script,
         "concat script"),
    Case("transcribe_hls_playlist", chat("--audio_in", "{d}/list.m3u8", "--transcribe"), 1, hls_playlist,
         "playlist"),
    # ---------------- export.py
    export_case("output_dir_dot", export_args("--output_dir", "."), 1, lambda env: (env.d / "notes.txt").write_text("x"),
                "current directory", check=no_work_dirs),
    export_case("output_dir_empty", export_args("--output_dir", ""), 1, None, "empty", check=no_work_dirs),
    export_case("output_dir_dot_in_an_empty_directory", export_args("--output_dir", "."), 1, None,
                "is the current directory", check=nothing_beside),
    export_case("output_dir_empty_cwd_via_dot_dot", export_args("--output_dir", "{d}/sub/.."), 1,
                lambda env: (env.d / "sub").mkdir(), "not empty|current directory", check=nothing_beside),
    export_case("output_dir_root", export_args("--output_dir", "/"), 1, None, "root"),
    export_case("output_dir_dot_dot_of_case", export_args("--output_dir", "{d}/x/.."), 1,
                lambda env: (env.d / "x").mkdir(), "not empty|current directory", check=no_work_dirs),
    export_case("output_dir_is_a_file", export_args("--output_dir", "{d}/f"), 1,
                lambda env: (env.d / "f").write_text("x"), "not a directory"),
    export_case("output_dir_newline", export_args("--output_dir", "{d}/no\nerror: such/out"), 1, None,
                r"no\\nerror: such.*does not exist"),
    export_case("ckpt_root_newline", ["--ckpt_root", "{d}/x\nerror: y", "--output_dir", "{d}/out"], 1, None,
                r"x\\nerror: y"),
    export_case("stale_temp_of_dead_pid_cleaned", export_args("--output_dir", "{d}/out"), 0, stale_work_dirs,
                "removed .*dead process", check=stale_cleaned),
    export_case("configs_dir_with_fifo", export_args("--output_dir", "{d}/out", "--configs_dir", "{d}/cfg"), 1,
                lambda env: ((env.d / "cfg").mkdir(), fifo(env.d / "cfg" / "a.json")), "not a regular JSON file",
                absent=["{d}/out"], check=no_work_dirs),
    export_case("configs_dir_with_dev_zero", export_args("--output_dir", "{d}/out", "--configs_dir", "{d}/cfg"), 1,
                lambda env: ((env.d / "cfg").mkdir(), os.symlink("/dev/zero", env.d / "cfg" / "a.json")),
                "not a regular JSON file", absent=["{d}/out"]),
    export_case("tree_with_fifo_config", ["--ckpt_root", "{d}/checkpoints", "--output_dir", "{d}/out"], 0,
                lambda env: tree_copy(env, lambda t: fifo(t / "configs" / "aaa.json"))),
    export_case("tree_with_negative_vocoder_padding", ["--ckpt_root", "{d}/checkpoints", "--output_dir", "{d}/out"],
                1, vocoder_config(upsample_rates=[8, 8, -2, 2]), "upsample rate -2", absent=["{d}/out"]),
    export_case("configs_dir_missing", export_args("--output_dir", "{d}/out", "--configs_dir", "{d}/nope"), 1, None,
                "no such directory", absent=["{d}/out"], check=no_work_dirs),
    export_case("thinker_ckpt_is_a_vision_dir", ["--thinker_ckpt", "{tree}/vision_tiny", "--output_dir", "{d}/out"], 1,
                None, "holds vision weights", absent=["{d}/out"]),
    export_case("talker_config_rope_theta_tiny", ["--ckpt_root", "{d}/checkpoints", "--output_dir", "{d}/out"], 1,
                lambda env: tree_copy(env, lambda t: edit_json(t / "configs" / "talker_tiny.json",
                                                               lambda c: c.update(rope_theta=1e-300))),
                "rope_theta", absent=["{d}/out"]),
    export_case("ctc_map_nan_index", ["--ckpt_root", "{d}/checkpoints", "--output_dir", "{d}/out"], 1,
                ctc_index("NaN"), "char_to_idx", absent=["{d}/out"]),
    export_case("non_utf8_output_dir", [], 0, direct=True,
                raw_args=raw("--ckpt_root", "{tree}", "--output_dir", "{d}/exp" + NON_UTF8 + "rt", "--verify"),
                check=export_made(f"exp{NON_UTF8}rt")),
]


# ---------------------------------------------------------------- running

def fill(text: str, env: Env) -> str:
    return text.replace("{tree}", str(env.tree)).replace("{export}", str(env.export)).replace("{d}", str(env.d))


def fill_bytes(data: bytes | None, env: Env) -> bytes:
    return fill((data or b"").decode("utf-8", "surrogateescape"), env).encode("utf-8", "surrogateescape")


def run_direct(args: list, script: str, stdin: bytes | None, cwd: Path, timeout: float) -> dict:
    """A fresh interpreter, as a user would start it."""
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable.encode(), str(REPO / script).encode(),
                            *[a if isinstance(a, bytes) else a.encode() for a in args]],
                           input=stdin or b"", capture_output=True, timeout=timeout, cwd=cwd)
        rc = r.returncode
        out, err = r.stdout, r.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = "timeout", exc.stdout or b"", exc.stderr or b""
    return {"rc": rc, "stdout": out.decode("utf-8", "replace"), "stderr": err.decode("utf-8", "replace"),
            "seconds": time.monotonic() - t0}


def run_forked(job: dict) -> dict:
    """One case in a child of this (warm) process: fds 0/1/2 are the case's files, then the script runs under
    runpy as `__main__`, exactly as `python SCRIPT ARGS` would run it."""
    import resource
    import runpy
    import signal
    import tempfile
    import traceback

    work = Path(tempfile.mkdtemp(prefix="case_"))
    (work / "stdin").write_bytes(base64.b64decode(job["stdin"]))
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            for fd, name, mode in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY | os.O_CREAT),
                                   (2, "stderr", os.O_WRONLY | os.O_CREAT)):
                os.dup2(os.open(work / name, mode, 0o600), fd)
            sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                         encoding=sys.__stdin__.encoding, errors=sys.__stdin__.errors)
            sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                          encoding=sys.__stdout__.encoding, errors=sys.__stdout__.errors)
            sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                                          encoding=sys.__stderr__.encoding, errors="backslashreplace",
                                          line_buffering=True)
            os.chdir(job["cwd"])
            if job.get("fsize"):
                resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            script = str(REPO / job["script"])
            sys.argv = [script, *job["args"]]
            sys.path[0] = str(REPO)
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
                    code = 1
            except BaseException:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = t0 + job["timeout"]
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            rc: Any = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, _, usage = os.wait4(pid, 0)
            rc = "timeout"
            break
        time.sleep(0.01)
    result = {"rc": rc, "seconds": time.monotonic() - t0, "max_rss_kib": usage.ru_maxrss}
    for name in ("stdout", "stderr"):
        result[name] = (work / name).read_bytes().decode("utf-8", "replace") if (work / name).exists() else ""
    shutil.rmtree(work, ignore_errors=True)
    return result


def batch_main(jobs_file: str, results_file: str) -> None:
    """The warm batch runner: import what every CLI run needs once, then fork a child per case."""
    sys.path.insert(0, str(REPO))
    import av  # noqa: F401
    import PIL.Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import sentencepiece  # noqa: F401
    import soundfile  # noqa: F401
    import soxr  # noqa: F401
    import torch  # noqa: F401

    import omni  # noqa: F401
    import utils.cli.main  # noqa: F401
    import utils.weights.export_format  # noqa: F401
    import utils.engine.speech  # noqa: F401
    sys.path.insert(0, str(REPO))
    import export  # noqa: F401 - warms its imports for the export.py cases
    results = {job["id"]: run_forked(job) for job in json.loads(Path(jobs_file).read_text())}
    Path(results_file).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build the inputs of every selected case, run them all, return {id: result}."""
    from tests.factory import make_export
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "callspec", None) and isinstance(item.callspec.params.get("case"), Case)}
    base = tmp_path_factory.mktemp("bad_inputs")
    export = make_export(tiny_tree, base / "export")
    jobs, direct, envs = [], [], {}
    for case in CASES:
        if case.id not in selected:
            continue
        env = Env(tiny_tree, export, base / case.id)
        env.d.mkdir()
        envs[case.id] = env
        if case.build:
            case.build(env)
        if case.direct:
            direct.append(case)
        else:
            jobs.append({"id": case.id, "args": [fill(a, env) for a in case.args], "script": case.script,
                         "stdin": base64.b64encode(fill_bytes(case.stdin, env)).decode(), "cwd": str(env.d),
                         "timeout": CASE_TIMEOUT, "fsize": case.fsize})
    results: dict[str, Any] = {}
    runners = []  # (process, its results file, its log, how many cases)
    try:
        for k in range(RUNNERS):
            share = jobs[k::RUNNERS]
            if not share:
                continue
            jobs_file, results_file, log = base / f"jobs{k}.json", base / f"results{k}.json", base / f"runner{k}.log"
            jobs_file.write_text(json.dumps(share))
            with open(log, "wb") as sink:
                runners.append((subprocess.Popen([sys.executable, "-m", "tests.test_errors", "--batch", str(jobs_file),
                                                  str(results_file)], stdout=sink, stderr=sink, cwd=REPO),
                                results_file, log, len(share)))
        for case in direct:  # fresh interpreters, while the runners work
            env = envs[case.id]
            args = [fill(a.decode("utf-8", "surrogateescape"), env).encode("utf-8", "surrogateescape")
                    for a in case.raw_args] if case.raw_args else [fill(a, env) for a in case.args]
            results[case.id] = run_direct(args, case.script, fill_bytes(case.stdin, env), env.d, CASE_TIMEOUT)
        for proc, results_file, log, n in runners:
            rc = proc.wait(timeout=CASE_TIMEOUT * n + 120)
            assert rc == 0, f"a batch runner failed:\n{log.read_text(errors='replace')[-4000:]}"
            results.update(json.loads(results_file.read_text()))
    finally:
        for proc, *_ in runners:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {k: (v, envs[k]) for k, v in results.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, outcomes: dict) -> None:
    if case.id == "flag_device_cuda_absent":
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA: --device cuda is not an error here")
    result, env = outcomes[case.id]
    err, out = result["stderr"], result["stdout"]
    where = f"{case.id}: rc={result['rc']} ({result['seconds']:.1f} s)\nstdout: {out[-800:]!r}\nstderr: {err[-2000:]}"
    assert result["rc"] != "timeout", "hang: " + where
    assert "Traceback" not in err, where
    assert not re.search(r"^error: (line \d+: )?unexpected \w+", err, re.M), "a bug reached the catch-all: " + where
    errors = [line for line in err.splitlines() if "error:" in line]
    if case.rc == 1:
        assert result["rc"] == 1, where
        assert len(errors) == 1 and errors[0].startswith("error: "), where
        if case.match:
            assert re.search(case.match, errors[0]), f"the error does not say /{case.match}/: " + where
    elif case.rc == 2:
        assert result["rc"] == 2, where
        assert len(errors) == 1 and "usage:" in err, where
        if case.match:
            assert re.search(case.match, errors[0]), where
    else:
        assert result["rc"] == 0, where
        assert not errors, where
        if case.match:
            assert re.search(case.match, err, re.M), f"stderr does not say /{case.match}/: " + where
    if case.stdout is not None:
        assert re.search(case.stdout, out), f"stdout does not match /{case.stdout}/: " + where
    for path in case.absent:
        assert not os.path.lexists(fill(path, env)), f"{fill(path, env)} exists: " + where
    if case.check:
        case.check(env, result)
    leftovers = [p for p in env.d.rglob(".*") if re.search(r"\.tmp$|\.(tmp|old)-\d+-", p.name)]
    assert not leftovers, f"partial files left: {leftovers}"


def test_battery_size() -> None:
    """The battery keeps its breadth: distinct ids, and at least 250 bad inputs (an error or a usage error
    expected; the odd-but-valid inputs that must work come on top)."""
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.rc != 0 for c in CASES) >= 250


@pytest.mark.parametrize("script", ["infer_chat.py", "infer_safetensors.py"])
def test_help_documents_the_resource_guards(script: str) -> None:
    """--help states each limit with the value the code enforces."""
    from utils.media.audio import max_audio_seconds
    from utils.weights.checkpoint import MAX_CTX_LEN
    from utils.weights.checkpoint import MAX_JSON_BYTES
    from utils.batch.job import MAX_BATCH_FILE_BYTES
    from utils.weights.export_format import MAX_HEADER_BYTES, MAX_TENSORS
    from utils.base.defaults import MAX_VIDEO_FRAMES
    from utils.media.image import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
    from utils.base.transcript import TranscribeOptions
    r = forkserver.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for needle in (f"{MAX_IMAGE_PIXELS} pixels", f"{max_audio_seconds(512, 8):.2f} s", f"{TranscribeOptions().max_seconds:.0f} s",
                   f"{MAX_VIDEO_FRAMES} frames", f"ctx_len above {MAX_CTX_LEN}", "(ctx_len // 4) tokens x downsample x 160",
                   "weights-only", "exit status: 0 ok, 1 error", f"{MAX_IMAGE_BYTES} decoded bytes",
                   f"JSON at most {MAX_JSON_BYTES >> 20} MiB", f"at most {MAX_HEADER_BYTES >> 20} MiB and {MAX_TENSORS} "
                   f"tensors", "130 interrupted, 143 terminated",
                   f"a batch file at most {MAX_BATCH_FILE_BYTES >> 20} MiB"):
        assert needle in text, needle


# ---------------------------------------------------------------- the guards themselves, in-process

def test_audio_is_trimmed_before_the_mel_spectrogram(tiny_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten minutes of audio: the mel and the encoder only ever see what the context can use."""
    import torch

    import omni
    from utils.media.audio import HOP_LENGTH, SAMPLE_RATE, max_audio_seconds
    from utils.weights.loading import load_components
    model = omni.OmniModel(load_components(tiny_tree), torch.device("cpu"))
    seen = []
    real = omni.power_mel
    monkeypatch.setattr(omni, "power_mel", lambda wave: seen.append(len(wave)) or real(wave))
    limit_s = max_audio_seconds(model.parts.ctx_len, model.parts.audio.cfg.downsample)
    assert limit_s == (model.parts.ctx_len // 4) * model.parts.audio.cfg.downsample * HOP_LENGTH / SAMPLE_RATE
    ans = model.answer("what ?", audio=tone(TEN_MINUTES), max_new_tokens=2)
    assert seen == [int(limit_s * SAMPLE_RATE)]
    assert any("audio trimmed" in w for w in ans.warnings)
    assert ans.prompt_tokens == model.parts.ctx_len // 4 + len(model.parts.tokenizer.prompt_ids("what ?"))
    seen.clear()
    ans = model.answer("what ?", audio=tone(0.5), max_new_tokens=2)  # short audio: untouched, no warning
    assert seen == [8000] and not ans.warnings
    assert max_audio_seconds(512, 8) == pytest.approx(10.24) and max_audio_seconds(512, 4) == pytest.approx(5.12)


def test_load_audio_decodes_only_what_is_asked(tmp_path: Path) -> None:
    from utils.media.audio import MAX_AUDIO_SECONDS, load_audio
    from utils.base.errors import OmniError
    path = tmp_path / "long.wav"
    write_audio(path, tone(30.0, 48000, 2), 48000, subtype="PCM_16")
    head = load_audio(path, max_seconds=3.0)
    assert abs(head.size - 48000) <= 2  # 3 s at 16 kHz
    whole = load_audio(path)
    assert abs(whole.size - 30 * 16000) <= 2 and np.allclose(whole[:40000], head[:40000], atol=1e-4)
    flac_claiming_days(tmp_path / "liar.flac")
    with pytest.raises(OmniError, match=f"limit of {MAX_AUDIO_SECONDS:.0f} s"):
        load_audio(tmp_path / "liar.flac")


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    from PIL import Image

    from utils.media.image import load_image, preprocess_image
    base = Image.new("RGB", (40, 20), (0, 0, 255))
    base.paste((255, 0, 0), (0, 0, 10, 20))  # a red stripe on the left
    exif = base.getexif()
    exif[0x0112] = 6
    base.save(tmp_path / "r.png", exif=exif)
    rotated = load_image(tmp_path / "r.png")
    assert torch_equal(rotated, preprocess_image(base.transpose(Image.Transpose.ROTATE_270)))


def torch_equal(a, b) -> bool:
    import torch
    return bool(torch.allclose(a, b))


def test_video_frames_are_the_evenly_spaced_ones_with_bounded_memory(tmp_path: Path) -> None:
    """Only the picked frames are kept; they are the frames i*total/(n+1) of the decoded sequence."""
    import av
    import torch

    from utils.base.defaults import MAX_VIDEO_FRAMES
    from utils.media.image import load_video_frames, preprocess_image
    from utils.base.errors import OmniError
    path = make_video(tmp_path / "v.mp4", frames=11)
    with av.open(str(path)) as c:
        every = [preprocess_image(f.to_image()) for f in c.decode(c.streams.video[0])]
    for n in (1, 4, 12):
        picks = [min(len(every) - 1, i * len(every) // (n + 1)) for i in range(1, n + 1)]
        got = load_video_frames(path, n)
        assert len(got) == n and all(torch.equal(g, every[i]) for g, i in zip(got, picks))
    with pytest.raises(OmniError, match="limit"):
        load_video_frames(path, MAX_VIDEO_FRAMES + 1)


def test_write_wav_is_atomic(tmp_path: Path) -> None:
    """A write that fails half-way (here: the file-size limit, a real EFBIG after 100 bytes) leaves neither a
    partial file nor a temp file, and keeps an older file."""
    import resource
    import signal

    from utils.media import audio
    from utils.base.errors import OmniError
    target = tmp_path / "speech.wav"
    target.write_bytes(b"the previous take")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    before = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
    try:
        with pytest.raises(OmniError, match="cannot write.*too large"):
            audio.write_wav(target, np.zeros(16000, np.float32))
        assert target.read_bytes() == b"the previous take"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav"]
        with pytest.raises(OmniError, match="cannot write"):
            audio.write_wav(tmp_path / "new.wav", np.zeros(16000, np.float32))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav"]
    audio.write_wav(tmp_path / "new.wav", np.zeros(16000, np.float32))  # the positive control: it does write
    assert (tmp_path / "new.wav").stat().st_size == 44 + 2 * 16000


def test_extreme_sampling_values_answer_what_they_mean(tiny_tree: Path, one_thread) -> None:
    """Values that pass validation give the answer they define, not just no crash: temperature 1e-300 and top_p
    1e-300 leave only the best token (the greedy answer); an extreme repetition penalty still samples valid ids."""
    from omni import load_model
    model = load_model(tiny_tree, device="cpu")
    common = dict(max_new_tokens=6, ignore_eos=True)
    greedy = model.answer("what is one plus two ?", **common).token_ids
    for extreme in (dict(temperature=1e-300, seed=1), dict(temperature=5e-324, seed=2),
                    dict(temperature=1.0, top_p=1e-300, seed=3), dict(temperature=50.0, top_k=1, seed=4)):
        assert model.answer("what is one plus two ?", **common, **extreme).token_ids == greedy, extreme
    vocab = model.parts.thinker.cfg.vocab_size
    for penalty in (1e-300, 1e300):
        ids = model.answer("what is one plus two ?", **common, temperature=1.0, repetition_penalty=penalty,
                           seed=5).token_ids
        assert len(ids) == 6 and all(0 <= i < vocab for i in ids)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--batch":
    batch_main(sys.argv[2], sys.argv[3])
