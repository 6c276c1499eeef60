"""Audio whose sample rate or channel count changes mid-stream is decoded whole, each run of frames
resampled to 16 kHz on its own, or refused with an error; never cut at the change without a word.

The speech is examples/phrases.wav (committed: "a red circle" then "a blue square", boundaries in
examples/phrases.json) cut in two, each part encoded as MP3 through PyAV at its own rate and layout and the two
files joined byte for byte as `cat a.mp3 b.mp3` does (the second file's ID3v2 tag lands in the middle). Every
decode path is checked: the whole-file load (chat prompts), load_audio_bytes (server uploads), the streaming
reader behind --transcribe, batch.py --task transcribe and the server's transcription (an open file upload).
Joined FLAC files and chained Ogg streams, which libsndfile would read only up to the join, are refused.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPO, run_cli
from utils.base.errors import OmniError
from utils.media.audio import SAMPLE_RATE, load_audio, load_audio_bytes, resample, stream_audio

EXAMPLE = REPO / "examples" / "phrases.wav"
PHRASES = json.loads((REPO / "examples" / "phrases.json").read_text())["phrases"]
CUT = 1.5  # seconds: between "a red circle" (ends 1.17 s) and "a blue square" (starts 1.87 s)
END = 3.0  # after "a blue square" (ends 2.67 s)
# Each joined MP3 keeps its encoder delay and end padding (FFmpeg trims them only at the file's very start and
# end): up to 2 frames of 1152 samples at 44.1 kHz plus 1105 + 2 x 576 at 16 kHz.
JOIN_SLACK = 0.2
DEMO_AUDIO = REPO / "checkpoints" / "demo" / "audio_enc_tiny"
needs_demo = pytest.mark.skipif(not (DEMO_AUDIO / "audio_enc.pt").is_file(),
                                reason=f"{DEMO_AUDIO} not built (run: python tools/train_demo.py)")


def parts() -> tuple[np.ndarray, np.ndarray]:
    wave = sf.read(str(EXAMPLE), dtype="float32")[0]
    return wave[:int(CUT * SAMPLE_RATE)], wave[int(CUT * SAMPLE_RATE):int(END * SAMPLE_RATE)]


def mp3(wave: np.ndarray, rate: int, layout: str = "mono") -> bytes:
    """A complete MP3 file (ID3v2 tag, Xing frame, audio) of 16 kHz `wave` resampled to `rate`, through PyAV."""
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as out:
        stream = out.add_stream("mp3", rate=rate)
        stream.layout = layout
        channels = 2 if layout == "stereo" else 1
        frame = av.AudioFrame.from_ndarray(np.tile(resample(wave, SAMPLE_RATE, rate)[None], (channels, 1)),
                                           format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


JOINS = {  # name -> (first part's rate and layout, second part's)
    "44100_then_16000": ((44100, "mono"), (16000, "mono")),
    "16000_then_44100": ((16000, "mono"), (44100, "mono")),
    "stereo_then_mono": ((16000, "stereo"), (16000, "mono")),
    "22050_stereo_then_16000_mono": ((22050, "stereo"), (16000, "mono")),
}


def joined(name: str) -> bytes:
    (rate_a, layout_a), (rate_b, layout_b) = JOINS[name]
    a, b = parts()
    return mp3(a, rate_a, layout_a) + mp3(b, rate_b, layout_b)


def assert_both_parts(wave: np.ndarray) -> None:
    """As long as both parts (give or take the joins' padding), with the second phrase's sound where it belongs."""
    seconds = len(wave) / SAMPLE_RATE
    assert END <= seconds <= END + JOIN_SLACK, seconds
    rms = lambda a, b: float(np.sqrt(np.mean(wave[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)] ** 2)))  # noqa: E731
    first, second = PHRASES[0], PHRASES[1]
    speech_1 = rms(first["start"], first["end"])
    speech_2 = rms(second["start"] + JOIN_SLACK, second["end"])  # the join's padding may delay it, never advance
    assert speech_2 > 0.3 * speech_1 and speech_2 > 10 * rms(CUT - 0.2, CUT - 0.05), (speech_1, speech_2)


@pytest.mark.parametrize("name", sorted(JOINS))
def test_every_decode_path_keeps_both_parts(name: str, tmp_path: Path) -> None:
    data = joined(name)
    path = tmp_path / "joined.mp3"
    path.write_bytes(data)
    whole = load_audio(path)
    assert_both_parts(whole)
    assert_both_parts(load_audio_bytes(data, label="upload"))
    streamed = np.concatenate(list(stream_audio(path, max_seconds=60)))
    assert_both_parts(streamed)
    assert_both_parts(np.concatenate(list(stream_audio(io.BytesIO(data), max_seconds=60))))
    assert abs(len(streamed) - len(whole)) <= 1


def test_limits_count_the_seconds_of_every_part(tmp_path: Path) -> None:
    """max_seconds cuts a prompt's audio after that many seconds of sound, whatever rates the parts have; the
    transcription limit refuses a stream longer than it counted across the parts."""
    path = tmp_path / "joined.mp3"
    path.write_bytes(joined("44100_then_16000"))
    assert abs(len(load_audio(path, max_seconds=2.0)) - 2 * SAMPLE_RATE) <= 1  # each part's count rounded up
    with pytest.raises(OmniError, match="over the transcription limit of 2 s"):
        list(stream_audio(path, max_seconds=2.0))


def joined_sound_files(fmt: str) -> bytes:
    a, b = parts()
    out = b""
    for wave, rate in ((a, 44100), (b, SAMPLE_RATE)):
        buf = io.BytesIO()
        sf.write(buf, resample(wave, SAMPLE_RATE, rate), rate, format=fmt)
        out += buf.getvalue()
    return out


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_joined_streams_libsndfile_would_cut_are_refused(fmt: str, tmp_path: Path) -> None:
    data = joined_sound_files(fmt)
    path = tmp_path / f"joined.{fmt.lower()}"
    path.write_bytes(data)
    for decode in (lambda: load_audio(path), lambda: load_audio_bytes(data, label="upload"),
                   lambda: list(stream_audio(path, max_seconds=60))):
        with pytest.raises(OmniError, match="holds a second audio stream after the first"):
            decode()


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_one_stream_files_still_load(fmt: str, tmp_path: Path) -> None:
    a, _ = parts()
    path = tmp_path / f"one.{fmt.lower()}"
    sf.write(str(path), resample(a, SAMPLE_RATE, 44100), 44100, format=fmt)
    assert abs(len(load_audio(path)) - len(a)) <= 1


# ---------------------------------------------------------------- the demo's transcript, through the real front ends

BOTH = "a red circle a blue square"  # the text of the transcript; --transcribe prints a line per segment


@needs_demo
def test_transcribe_cli_hears_both_phrases(tmp_path: Path) -> None:
    path = tmp_path / "joined.mp3"
    path.write_bytes(joined("44100_then_16000"))
    result = run_cli("--ckpt_dir", str(DEMO_AUDIO), "--audio_in", str(path), "--transcribe", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.splitlines() == ["a red circle", "a blue square"], \
        (result.stdout, result.stderr)


@needs_demo
def test_batch_transcribe_hears_both_phrases(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "joined.mp3").write_bytes(joined("44100_then_16000"))
    out = tmp_path / "out.jsonl"
    result = run_cli("--ckpt_dir", str(DEMO_AUDIO), "--task", "transcribe", str(tmp_path / "in"), "-o", str(out),
                     script="batch.py", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in records] == [BOTH], records


@needs_demo
def test_uploaded_stream_transcribes_both_phrases() -> None:
    """The server transcribes an upload as OmniModel.transcribe(io.BytesIO(data)) (utils/server/app.py)."""
    from omni import load_model
    model = load_model(DEMO_AUDIO, device="cpu")
    assert model.transcribe(io.BytesIO(joined("44100_then_16000"))).text == BOTH


@needs_demo
def test_transcribe_cli_refuses_joined_flac(tmp_path: Path) -> None:
    path = tmp_path / "joined.flac"
    path.write_bytes(joined_sound_files("FLAC"))
    result = run_cli("--ckpt_dir", str(DEMO_AUDIO), "--audio_in", str(path), "--transcribe", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and result.stdout == "", (result.stdout, result.stderr)
    assert lines == [f"error: audio file {path}: holds a second audio stream after the first (files joined "
                     f"together?), which would be cut off here; convert it into one stream first"], lines
