"""Images and video frames -> (3, 224, 224) tensors in [0, 1], exactly as the trainers preprocessed them."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.base.defaults import MAX_VIDEO_FRAMES
from utils.base.errors import OmniError
from utils.media.ffmpeg import open_container

IMAGE_SIZE = 224
MAX_IMAGE_PIXELS = 64_000_000  # refuse larger images (decompression bombs) before decoding them
MAX_IMAGE_BYTES = 200_000_000  # and larger decoded bitmaps (8000x8000 RGB fits, 8000x8000 float does not)
# Bytes per pixel of the decoded bitmap for Pillow's modes (others: 4, the widest).
MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
              "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "BGR;15": 2, "BGR;16": 2, "BGR;24": 3}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16/32-bit greyscale is rescaled from its full range, not clipped."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def preprocess_image(img: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """RGB, bilinear resize to size x size, scale to [0, 1], CHW. No mean/std normalisation."""
    arr = np.asarray(to_rgb(img).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_image(path: str | os.PathLike, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Decode an image file (EXIF orientation applied) into the model's input tensor."""
    path = Path(path)
    if not path.is_file():
        raise OmniError(f"image file {path}: not found" if not path.exists() else f"image file {path}: not a file")
    if path.stat().st_size == 0:
        raise OmniError(f"image file {path}: is empty")
    return _decode_image(path, f"image file {path}", size)


def load_image_bytes(data: bytes, size: int = IMAGE_SIZE, label: str = "image") -> torch.Tensor:
    """`load_image` for an image held in memory (e.g. sent inline to the server); `label` names it in errors."""
    if not data:
        raise OmniError(f"{label}: is empty")
    return _decode_image(io.BytesIO(data), label, size)


def _decode_image(source: Path | io.BytesIO, label: str, size: int) -> torch.Tensor:
    """Decode with the pixel limit checked from the header first (decompression bombs)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise OmniError(f"{label}: {img.width}x{img.height} exceeds the limit of "
                                    f"{MAX_IMAGE_PIXELS} pixels")
                decoded = img.width * img.height * MODE_BYTES.get(img.mode, 4)
                if decoded > MAX_IMAGE_BYTES:
                    raise OmniError(f"{label}: {img.width}x{img.height} {img.mode} decodes to "
                                    f"{decoded:,} bytes, over the limit of {MAX_IMAGE_BYTES:,}")
                img.load()
                return preprocess_image(ImageOps.exif_transpose(img), size)
    except OmniError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise OmniError(f"{label}: refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:  # its message names the file object, not the input
        raise OmniError(f"{label}: cannot decode (not an image format Pillow recognises)") from exc
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise OmniError(f"{label}: cannot decode ({exc})") from exc


def load_video_frames(path: str | os.PathLike, n_frames: int = 4, size: int = IMAGE_SIZE) -> list[torch.Tensor]:
    """`n_frames` evenly spaced frames, at positions i*total/(n+1) for i = 1..n, each preprocessed as an image.

    Memory stays bounded whatever the video's length: the frames are counted from the container's packets
    (nothing decoded), then decoding stops at the last frame needed and only the picked frames are kept.
    Frames larger than MAX_IMAGE_PIXELS are refused, as images are."""
    path = Path(path)
    if not path.is_file():
        raise OmniError(f"video file {path}: not found" if not path.exists() else f"video file {path}: not a file")
    if path.stat().st_size == 0:
        raise OmniError(f"video file {path}: is empty")
    if not 1 <= n_frames <= MAX_VIDEO_FRAMES:
        raise OmniError(f"video file {path}: {n_frames} frames asked for; between 1 and the limit of "
                        f"{MAX_VIDEO_FRAMES} can be taken")
    what = f"video file {path}"
    try:
        with open_container(path, what) as container:
            if not container.streams.video:
                raise OmniError(f"video file {path}: has no video stream")
            stream = container.streams.video[0]
            check_frame_size(path, stream.codec_context.width, stream.codec_context.height)
            total = sum(1 for packet in container.demux(stream) if packet.size)
        if total == 0:
            raise OmniError(f"video file {path}: contains no frames")
        picks = [min(total - 1, i * total // (n_frames + 1)) for i in range(1, n_frames + 1)]
        kept: dict[int, torch.Tensor] = {}
        last = None
        with open_container(path, what) as container:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                check_frame_size(path, frame.width, frame.height)
                last = frame
                if index in picks:
                    kept[index] = preprocess_image(frame.to_image(), size)
                if index >= picks[-1]:
                    break
            if last is None:
                raise OmniError(f"video file {path}: contains no decodable frames")
            if len(kept) < len(set(picks)):  # fewer frames decoded than packets counted: use the last one
                tail = preprocess_image(last.to_image(), size)
                kept = {i: kept.get(i, tail) for i in picks}
    except OmniError:
        raise
    except EOFError as exc:  # av.error.EOFError: the container ends before its first packet
        raise OmniError(f"video file {path}: contains no frames (the file ends before any video data)") from exc
    except Exception as exc:  # PyAV raises its own error family for unreadable containers
        raise OmniError(f"video file {path}: cannot decode ({str(exc).strip() or type(exc).__name__})") from exc
    return [kept[i] for i in picks]


def check_frame_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise OmniError(f"video file {path}: {width}x{height} frames exceed the limit of {MAX_IMAGE_PIXELS} pixels")
