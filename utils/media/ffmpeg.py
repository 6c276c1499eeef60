"""Opening media with FFmpeg (PyAV) safely: video for prompts, and audio containers libsndfile cannot read.

FFmpeg can follow names written inside an input (ffconcat scripts, HLS playlists, DASH/IMF manifests, SDP
session descriptions, image sequences) and read other files or URLs on the input's behalf. A media input must
be one self-contained file, so such inputs are refused before FFmpeg probes them, FFmpeg may open local files
only, and the demuxer it picked is checked again after opening.
"""
from __future__ import annotations

import os
from typing import Any, BinaryIO

from utils.base.errors import OmniError

INDIRECT_DEMUXERS = {"concat", "hls", "applehttp", "dash", "imf", "sdp", "rtsp", "rtp", "tee"}
INDIRECT_MAGICS = (b"ffconcat", b"#EXTM3U", b"<?xml", b"<MPD", b"v=0")
# Only local files, and an image name is that one image, never a numbered sequence (img%03d.png: image2's
# pattern matching is off).
AV_OPTIONS = {"protocol_whitelist": "file", "pattern_type": "none"}


def check_self_contained(source: str | os.PathLike | BinaryIO, what: str) -> None:
    """Refuse a text file that would make FFmpeg open other files or URLs (`what`: "video file x" for messages).
    An open file is read at its current position and put back there."""
    if hasattr(source, "read"):
        start = source.tell()
        head = source.read(64)
        source.seek(start)
    else:
        with open(source, "rb") as f:
            head = f.read(64)
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(INDIRECT_MAGICS):
        raise OmniError(f"{what}: is a playlist, concat script or manifest naming other files; give the media "
                        f"file itself")


def check_demuxer(container: Any, what: str) -> None:
    """After opening: the demuxer FFmpeg chose must not be one that reads other inputs."""
    if set(str(container.format.name).split(",")) & INDIRECT_DEMUXERS:
        raise OmniError(f"{what}: FFmpeg reads it as {container.format.name}, a format that opens other files; "
                        f"give a self-contained media file")


def open_container(source: str | os.PathLike | BinaryIO, what: str) -> Any:
    """av.open() of one self-contained local media file or open binary file (a context manager). Errors from
    FFmpeg itself propagate: the caller words them for its kind of media."""
    import av  # imported here: only video and unusual audio containers need PyAV

    check_self_contained(source, what)
    container = av.open(source if hasattr(source, "read") else os.fspath(source), options=AV_OPTIONS)
    try:
        check_demuxer(container, what)
    except OmniError:
        container.close()
        raise
    return container
