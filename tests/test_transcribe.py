"""Transcription with timestamps (utils/engine/transcribe.py, utils/base/transcript.py, --transcribe).

Speech with known boundaries: examples/phrases.wav (committed; examples/phrases.json says where each phrase's
sound starts and ends, written by tools/make_examples.py) and, with espeak-ng, phrases synthesised here.
The window stitching is checked exactly with a fake encoder whose output at each frame depends only on the
audio there, so any duplicated or dropped character at a seam shows.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import DEMO, EXAMPLES, REPO, run_cli
from tools import synth
from tools.transcribe_speed import example_pieces, write_repeated
from utils.media.audio import HOP_LENGTH, SAMPLE_RATE
from utils.engine.transcribe import transcribe
from utils.base.transcript import TranscribeOptions, format_transcript

DEMO_AUDIO = DEMO / "audio_enc_tiny"  # the demo's audio encoder alone: what transcription loads
EXAMPLE = EXAMPLES / "phrases.wav"
TRUTH = json.loads((EXAMPLES / "phrases.json").read_text())["phrases"]
TOLERANCE = 0.15  # seconds: a segment's start and end against the truth

needs_demo_audio = pytest.mark.skipif(not (DEMO_AUDIO / "audio_enc.pt").is_file(),
                                reason=f"{DEMO_AUDIO} not built (run: python tools/train_demo.py)")
needs_espeak = pytest.mark.skipif(not synth.have_espeak(),
                                  reason="espeak-ng not installed (apt-get install -y espeak-ng): no fresh speech")


@pytest.fixture(scope="module")
def model(one_thread):
    from omni import load_model
    return load_model(DEMO_AUDIO, device="cpu")


def assert_matches_truth(result: dict, truth: list[dict], texts: list[str]) -> None:
    """One segment per phrase, its start and end within TOLERANCE of the phrase's sound, its words `texts`."""
    assert [s["text"] for s in result["segments"]] == texts, result["text"]
    assert result["text"] == " ".join(texts)
    for seg, want in zip(result["segments"], truth):
        assert abs(seg["start"] - want["start"]) <= TOLERANCE, (seg, want)
        assert abs(seg["end"] - want["end"]) <= TOLERANCE, (seg, want)
        words = seg["words"]
        assert [w["word"] for w in words] == seg["text"].split()
        assert words[0]["start"] == seg["start"] and words[-1]["end"] == seg["end"]
        assert all(a["end"] <= b["start"] for a, b in zip(words, words[1:]))
        assert all(w["start"] < w["end"] and 0 < w["probability"] <= 1 for w in words)


# ---------------------------------------------------------------- the demo encoder on real speech

@needs_demo_audio
def test_committed_example_segments_and_words(model) -> None:
    result = model.transcribe(str(EXAMPLE))
    assert set(result) == {"text", "language", "duration", "segments"}
    assert result["language"] == "en"  # the demo's audio_enc_metadata.json says so
    assert result["duration"] == pytest.approx(sf.info(str(EXAMPLE)).duration, abs=1e-3)
    assert [s["id"] for s in result["segments"]] == list(range(len(TRUTH)))
    assert_matches_truth(result, TRUTH, [p["text"] for p in TRUTH])
    assert result.text == result["text"]


@needs_demo_audio
def test_one_pass_over_several_phrases_is_what_vad_fixes(model) -> None:
    """Regions encoded alone give each phrase; the whole clip in one pass (no VAD) does not (the demo encoder
    was trained on single phrases): the splitting is what makes the difference."""
    wave = sf.read(str(EXAMPLE), dtype="float32")[0]
    assert model.transcribe(wave).text == " ".join(p["text"] for p in TRUTH)
    assert model.transcribe(wave, vad=False).text != " ".join(p["text"] for p in TRUTH)


@needs_demo_audio
def test_array_file_and_options(model) -> None:
    wave = sf.read(str(EXAMPLE), dtype="float32")[0]
    from_file, from_array = model.transcribe(str(EXAMPLE)), model.transcribe(wave)
    assert from_file == from_array
    with open(EXAMPLE, "rb") as f:  # an open file (a server's upload) is streamed like a path
        assert model.transcribe(f) == from_file
    assert model.transcribe(io.BytesIO(EXAMPLE.read_bytes())) == from_file
    plain = model.transcribe(wave, word_timestamps=False)
    assert all("words" not in s for s in plain["segments"]) and plain.text == from_file.text
    # a segment gap longer than every silence: one segment with every word
    one = model.transcribe(wave, segment_gap=5.0)
    assert len(one["segments"]) == 1 and one.text == from_file.text
    assert [w["word"] for w in one["segments"][0]["words"]] == from_file.text.split()
    with pytest.raises(TypeError):
        model.transcribe(wave, no_such_option=1)


@needs_demo_audio
@pytest.mark.parametrize("fmt", ["FLAC", "MP3"])
def test_other_rates_and_channels_are_resampled_in_blocks(model, tmp_path: Path, fmt: str) -> None:
    """44.1 kHz stereo (first channel used), read in blocks of under 6 s and resampled as a stream."""
    import soxr
    wave = soxr.resample(sf.read(str(EXAMPLE), dtype="float32")[0], SAMPLE_RATE, 44100)
    path = tmp_path / f"stereo.{fmt.lower()}"
    sf.write(str(path), np.stack([wave, np.zeros_like(wave)], axis=1), 44100, format=fmt)
    result = model.transcribe(str(path))
    assert_matches_truth(result, TRUTH, [p["text"] for p in TRUTH])


def write_aac(path: Path, wave: np.ndarray) -> None:
    """An AAC sound track in an MP4 container (what libsndfile cannot read), through PyAV."""
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=SAMPLE_RATE)
        stream.layout = "mono"
        for i in range(0, len(wave), 1024):
            frame = av.AudioFrame.from_ndarray(wave[None, i:i + 1024], format="fltp", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@needs_demo_audio
def test_containers_libsndfile_cannot_read_go_through_pyav(model, tmp_path: Path) -> None:
    write_aac(tmp_path / "talk.m4a", sf.read(str(EXAMPLE), dtype="float32")[0])
    assert_matches_truth(model.transcribe(str(tmp_path / "talk.m4a")), TRUTH, [p["text"] for p in TRUTH])
    base = ("--ckpt_dir", str(DEMO_AUDIO), "--transcribe", "--audio_in")
    silent_video = run_cli(*base, str(EXAMPLES / "shapes.mp4"))
    assert silent_video.returncode == 1 and silent_video.stderr.endswith("shapes.mp4: has no audio stream\n")
    (tmp_path / "junk.m4a").write_bytes(b"not audio at all\n" * 64)
    junk = run_cli(*base, str(tmp_path / "junk.m4a"))
    assert junk.returncode == 1 and junk.stderr.startswith("error: audio file") and "cannot decode" in junk.stderr
    assert junk.stderr.count("\n") == 1


@needs_demo_audio
def test_short_clip_without_silence_is_the_greedy_ctc_of_the_whole(model) -> None:
    """No long silence: one region, encoded as a whole, so the text is the plain greedy CTC decode."""
    from models.audio import ctc_greedy_decode
    wave = sf.read(str(EXAMPLES / "green_triangle.wav"), dtype="float32")[0]
    with torch.inference_mode():
        logits = model.parts.ctc_head(model.encode_audio(wave)).float()
    assert model.transcribe(wave).text == ctc_greedy_decode(logits, model.parts.ctc_chars) == "a green triangle"


@needs_demo_audio
@needs_espeak
def test_fresh_speech_with_known_silences(model) -> None:
    """Phrases synthesised now, joined by silences of random known lengths: one segment per phrase, at the
    phrase's sound, with the words that phrase gives alone (between half-second silences: the demo encoder
    was trained on phrases followed by silence)."""
    rng = random.Random(7)
    phrases = rng.sample(synth.ALL_PHRASES, 5)
    parts, truth, at = [], [], 0
    for text in phrases:
        wave = synth.speak(text, "en", rng.randint(150, 190), 50)
        sound = np.flatnonzero(np.abs(wave) > 1e-4)
        wave = wave[sound[0]:sound[-1] + 1]
        gap = rng.randint(60, 150) * HOP_LENGTH  # 0.6-1.5 s
        parts += [np.zeros(gap, np.float32), wave]
        truth.append({"start": (at + gap) / SAMPLE_RATE, "end": (at + gap + len(wave)) / SAMPLE_RATE, "wave": wave})
        at += gap + len(wave)
    parts.append(np.zeros(5 * HOP_LENGTH, np.float32))
    result = model.transcribe(np.concatenate(parts))
    half = np.zeros(SAMPLE_RATE // 2, np.float32)
    alone = [model.transcribe(np.concatenate([half, t["wave"], half])).text for t in truth]
    assert sum(a == p for a, p in zip(alone, phrases)) >= len(phrases) - 1, (alone, phrases)
    assert_matches_truth(result, truth, alone)


# ---------------------------------------------------------------- any length, bounded memory

def transcribe_in_child(path: Path, out_dir: Path) -> tuple[dict, int]:
    """The CLI in a child process: its JSON file and the child's peak resident memory (KiB)."""
    cmd = [sys.executable, str(REPO / "infer_chat.py"), "--ckpt_dir", str(DEMO_AUDIO), "--transcribe",
           "--audio_in", str(path), "--output_format", "json", "--output_dir", str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out_dir / f"{path.stem}.stderr", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (out_dir / f"{path.stem}.stderr").read_text()
    return json.loads((out_dir / f"{path.stem}.json").read_text()), usage.ru_maxrss


@needs_demo_audio
def test_thirty_minutes_streamed_equal_the_pieces_in_bounded_memory(model, tmp_path: Path) -> None:
    pieces = example_pieces()
    alone = [model.transcribe(p).text for p in pieces]
    assert alone == [p["text"] for p in TRUTH]
    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    write_repeated(short, pieces, 10)
    order = write_repeated(long, pieces, 30 * 60)
    assert long.stat().st_size > 30 * 60 * SAMPLE_RATE * 2
    _, short_rss = transcribe_in_child(short, tmp_path)
    result, long_rss = transcribe_in_child(long, tmp_path)
    assert result["text"] == " ".join(alone[k] for k in order)
    assert len(result["segments"]) == len(order)
    starts = [s["start"] for s in result["segments"]]
    assert starts == sorted(starts) and result["duration"] == pytest.approx(sf.info(str(long)).duration, abs=1e-3)
    assert long_rss <= 1.5 * short_rss, f"peak RSS {long_rss} KiB for 30 min vs {short_rss} KiB for 10 s"
    # sharper: the growth is well under what holding the decoded audio would take (30 min of float32)
    audio_kib = 30 * 60 * SAMPLE_RATE * 4 / 1024
    assert long_rss - short_rss < audio_kib / 4, f"peak RSS {long_rss} KiB for 30 min vs {short_rss} KiB for 10 s"


# ---------------------------------------------------------------- windows stitched exactly (fake encoder)

F = 4 * HOP_LENGTH  # a downsample-4 encoder: 40 ms frames
CHARS = {0: "<BLANK>", 1: "<UNK>", 2: " ", **{3 + i: c for i, c in enumerate("abcdefgh")}}


def frame_encoder(edge_noise: int = 0, calls: list | None = None):
    """Logits whose argmax at frame j is the label the audio's frame j carries (its first sample x 100), with
    as many frames as the real encoder gives (one more than whole frames, from the centred spectrogram); the
    first and last `edge_noise` frames of each call are wrong, like an encoder's edges can be."""
    def encode(wave: np.ndarray) -> torch.Tensor:
        if calls is not None:
            calls.append(len(wave))
        n = -(-(len(wave) // HOP_LENGTH + 1) // 4)
        labels = np.zeros(n, np.int64)
        whole = len(wave) // F
        labels[:whole] = np.rint(wave[:whole * F:F] * 100).astype(np.int64)
        if edge_noise:
            labels[:edge_noise] = labels[-edge_noise:] = 5
        logits = torch.full((n, len(CHARS)), -5.0)
        logits[torch.arange(n), torch.from_numpy(labels)] = 5.0
        return logits
    return encode


def label_wave(labels: list[int]) -> np.ndarray:
    return np.repeat(np.asarray(labels, np.float32) / 100, F)


def random_labels(rng: random.Random, n: int) -> list[int]:
    """Characters one to three frames long with blanks between (some absent: repeats need a blank)."""
    out: list[int] = []
    while len(out) < n:
        out += [rng.choice(list(CHARS)[2:])] * rng.randint(1, 3) + [0] * rng.randint(1, 4)
    return out[:n] + [0] * 8


@pytest.mark.parametrize("seed", range(6))
def test_overlapping_windows_stitch_without_duplicates_or_drops(seed: int) -> None:
    rng = random.Random(seed)
    wave = label_wave(random_labels(rng, rng.randint(300, 900)))  # 12-36 s
    whole = transcribe(frame_encoder(edge_noise=3), wave, CHARS, F, TranscribeOptions(vad=False, window=60.0))
    calls: list[int] = []
    windowed = transcribe(frame_encoder(edge_noise=3, calls=calls), wave, CHARS, F,
                          TranscribeOptions(vad=False, window=4.0, overlap=1.0))
    assert len(calls) >= 3 and max(calls) <= 4.0 * SAMPLE_RATE
    assert windowed == whole


def test_window_and_region_edges_are_handled_alone() -> None:
    """A character run straddling no blank in the overlap still comes out once; silence is never encoded."""
    labels = [0] * 5 + [3] * 200 + [0] * 5  # one 8 s character: no frame of any overlap is blank
    calls: list[int] = []
    got = transcribe(frame_encoder(calls=calls), label_wave(labels), CHARS, F,
                     TranscribeOptions(vad=False, window=2.0, overlap=0.5))
    assert got.text == "a" and len(calls) > 3
    speech = label_wave([4, 0, 5, 0]) + 0.0
    silence = np.zeros(2 * SAMPLE_RATE, np.float32)
    calls.clear()
    got = transcribe(frame_encoder(calls=calls), np.concatenate([silence, speech, silence, speech, silence]),
                     CHARS, F)
    assert got.text == "bc bc" and len(got["segments"]) == 2 and len(calls) == 2
    assert all(n < SAMPLE_RATE for n in calls)  # each region alone, with its padding only
    assert got["segments"][0]["start"] == 2.0 and got["segments"][1]["start"] == pytest.approx(4.16)


def test_segments_end_at_gaps_and_at_max_segment() -> None:
    """Words 'ab' every 0.4 s for 20 s, then 'cd' after a 1 s gap: a gap of segment_gap ends a segment, and no
    segment grows past max_segment (it ends before the word that would)."""
    word = [4, 4, 0, 5, 0, 2, 0, 0, 0, 0]  # "b", "c", " " then blanks: 10 frames = 0.4 s
    labels = word * 50 + [0] * 25 + [6, 0, 7, 0]
    got = transcribe(frame_encoder(), label_wave(labels), CHARS, F,
                     TranscribeOptions(vad=False, max_segment=5.0, segment_gap=0.5))
    segs = got["segments"]
    assert got.text == " ".join(["bc"] * 50 + ["de"])
    assert [s["text"].split() for s in segs[:-1]] == [["bc"] * 13] * 3 + [["bc"] * 11]
    assert segs[-1]["text"] == "de" and segs[-1]["start"] == pytest.approx(21.0)
    assert all(s["end"] - s["start"] <= 5.0 for s in segs)
    assert [s["id"] for s in segs] == list(range(len(segs)))


def test_options_are_checked() -> None:
    from utils.base.errors import OmniError
    for bad in ({"window": 2.0, "overlap": 1.5}, {"min_silence": 0}, {"speech_pad": 1.0},
                {"max_seconds": float("inf")}):
        with pytest.raises(OmniError):
            transcribe(frame_encoder(), np.zeros(1600, np.float32), CHARS, F, TranscribeOptions(**bad))
    with pytest.raises(OmniError, match="over the transcription limit"):
        transcribe(frame_encoder(), np.zeros(32000, np.float32), CHARS, F, TranscribeOptions(max_seconds=1.0))


# ---------------------------------------------------------------- formats and the command line

RESULT = {"text": "a b", "language": None, "duration": 3723.5, "segments": [
    {"id": 0, "start": 0.0, "end": 1.25, "text": "a"},
    {"id": 1, "start": 3661.001, "end": 3723.5, "text": "b --> c"}]}


def test_formats_parse_with_subtitle_parsers(tmp_path: Path) -> None:
    import srt
    import webvtt
    subs = list(srt.parse(format_transcript(RESULT, "srt")))
    assert [(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subs] == \
        [(0.0, 1.25, "a"), (3661.001, 3723.5, "b -> c")]
    (tmp_path / "x.vtt").write_text(format_transcript(RESULT, "vtt"))
    cues = webvtt.read(str(tmp_path / "x.vtt"))
    assert [(c.start, c.end, c.text) for c in cues] == [("00:00:00.000", "00:00:01.250", "a"),
                                                        ("01:01:01.001", "01:02:03.500", "b -> c")]
    assert format_transcript(RESULT, "tsv") == "start\tend\ttext\n0\t1250\ta\n3661001\t3723500\tb -> c\n"
    assert format_transcript(RESULT, "txt") == "a\nb --> c\n"
    assert json.loads(format_transcript(RESULT, "json")) == RESULT
    empty = {**RESULT, "text": "", "segments": []}
    assert list(srt.parse(format_transcript(empty, "srt"))) == []
    (tmp_path / "e.vtt").write_text(format_transcript(empty, "vtt"))
    assert len(webvtt.read(str(tmp_path / "e.vtt"))) == 0


def test_timestamps_round_to_the_nearest_millisecond() -> None:
    """srt and vtt stamps (and tsv's integer milliseconds) are rounded, not truncated: 1.001 s is 1000.999... ms
    in floating point and must still read ,001; a carry rolls into the seconds, minutes and hours."""
    cases = {1.001: "00:00:01,001", 1.0009999: "00:00:01,001", 0.0014999: "00:00:00,001", 0.0015001: "00:00:00,002",
             2.9999: "00:00:03,000", 59.9996: "00:01:00,000", 3599.9999: "01:00:00,000", 0.1 + 0.2: "00:00:00,300",
             3661.001: "01:01:01,001", 4.0 - 1e-9: "00:00:04,000", 0.0: "00:00:00,000"}
    segments = [{"id": i, "start": t, "end": t, "text": "x"} for i, t in enumerate(cases)]
    result = {"text": "", "language": None, "duration": 3600.0, "segments": segments}
    srt_stamps = re.findall(r"^(\S+) --> ", format_transcript(result, "srt"), re.M)
    vtt_stamps = re.findall(r"^(\S+) --> ", format_transcript(result, "vtt"), re.M)
    assert srt_stamps == list(cases.values())
    assert vtt_stamps == [stamp.replace(",", ".") for stamp in cases.values()]
    tsv_starts = [int(line.split("\t")[0]) for line in format_transcript(result, "tsv").splitlines()[1:]]
    assert tsv_starts == [int(stamp[:2]) * 3_600_000 + int(stamp[3:5]) * 60_000 + int(stamp[6:8]) * 1000
                          + int(stamp[9:]) for stamp in cases.values()]


def vtt_seconds(stamp: str) -> float:
    hours, minutes, seconds = stamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


@needs_demo_audio
def test_cli_writes_every_format_for_several_files(model, tmp_path: Path) -> None:
    import srt
    import webvtt
    green = EXAMPLES / "green_triangle.wav"
    out = tmp_path / "subs"
    proc = run_cli("--ckpt_dir", str(DEMO_AUDIO), "--transcribe", "--audio_in", str(EXAMPLE), str(green),
                   "--output_format", "all", "--output_dir", str(out))
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{stem}.{ext}" for stem in ("phrases", "green_triangle")
                                                           for ext in ("txt", "json", "srt", "vtt", "tsv"))
    for audio in (EXAMPLE, green):
        want = model.transcribe(str(audio))
        assert json.loads((out / f"{audio.stem}.json").read_text()) == want
        assert (out / f"{audio.stem}.txt").read_text() == "".join(s["text"] + "\n" for s in want["segments"])
        subs = list(srt.parse((out / f"{audio.stem}.srt").read_text()))
        cues = webvtt.read(str(out / f"{audio.stem}.vtt"))
        assert len(subs) == len(cues) == len(want["segments"])
        for sub, cue, seg in zip(subs, cues, want["segments"]):
            assert sub.content == cue.text == seg["text"]
            assert sub.start.total_seconds() == pytest.approx(seg["start"], abs=1e-3)
            assert vtt_seconds(cue.start) == pytest.approx(seg["start"], abs=1e-3)
            assert vtt_seconds(cue.end) == pytest.approx(seg["end"], abs=1e-3)
    assert_matches_truth(json.loads((out / "phrases.json").read_text()), TRUTH, [p["text"] for p in TRUTH])


@needs_demo_audio
def test_cli_one_file_goes_to_stdout(model) -> None:
    want = model.transcribe(str(EXAMPLE))
    base = ("--ckpt_dir", str(DEMO_AUDIO), "--transcribe", "--audio_in", str(EXAMPLE))
    txt, js, vtt = run_cli(*base), run_cli(*base, "--json"), run_cli(*base, "--output_format", "vtt")
    assert txt.returncode == js.returncode == vtt.returncode == 0, txt.stderr + js.stderr + vtt.stderr
    assert txt.stdout == format_transcript(want, "txt") and txt.stdout.count("\n") == len(TRUTH)
    assert json.loads(js.stdout) == want
    assert vtt.stdout == format_transcript(want, "vtt")


@needs_demo_audio
def test_cli_bad_inputs(tmp_path: Path) -> None:
    base = ("--ckpt_dir", str(DEMO_AUDIO), "--transcribe")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same = [str(EXAMPLE), str(tmp_path / "phrases.wav")]
    proc = run_cli(*base, "--audio_in", *same, "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "phrases.*" in proc.stderr
    assert not (tmp_path / "out").exists()
    # one missing file among several: an error line for it, the others written, exit 1
    out = tmp_path / "partial"
    proc = run_cli(*base, "--audio_in", str(tmp_path / "missing.wav"), str(EXAMPLE), "--output_dir", str(out))
    assert proc.returncode == 1
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == \
        [f"error: audio file {tmp_path / 'missing.wav'}: not found"]
    assert sorted(p.name for p in out.iterdir()) == ["phrases.txt"]
    proc = run_cli(*base, "--audio_in", str(EXAMPLE), "--max_transcribe_seconds", "2")
    assert proc.returncode == 1 and "over the transcription limit of 2 s" in proc.stderr and proc.stdout == ""
    (tmp_path / "file").write_text("x")
    proc = run_cli(*base, "--audio_in", str(EXAMPLE), str(EXAMPLES / "green_triangle.wav"), "--output_dir",
                   str(tmp_path / "file" / "d"))
    assert proc.returncode == 1 and proc.stderr.startswith("error: --output_dir")


@needs_demo_audio
def test_transcribe_py_has_whispers_habits(model, tmp_path: Path) -> None:
    """transcribe.py AUDIO... --model D: every format named after each input in the current directory (whisper's
    defaults), --language checked against the checkpoint's, --word_timestamps True|False."""
    want = model.transcribe(str(EXAMPLE))
    proc = run_cli(str(EXAMPLE), "--model", str(DEMO_AUDIO), "--language", "English", script="transcribe.py",
                   cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"phrases.{ext}" for ext in ("json", "srt", "tsv", "txt",
                                                                                        "vtt")]
    assert json.loads((tmp_path / "phrases.json").read_text()) == want
    assert (tmp_path / "phrases.srt").read_text() == format_transcript(want, "srt")
    out = tmp_path / "out"
    proc = run_cli(str(EXAMPLE), str(EXAMPLES / "green_triangle.wav"), "-m", str(DEMO_AUDIO), "--word_timestamps",
                   "False", "--output-format", "json", "--output-dir", str(out), "--language", "en",
                   script="transcribe.py")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["green_triangle.json", "phrases.json"]
    plain = json.loads((out / "phrases.json").read_text())
    assert plain["text"] == want["text"] and not any("words" in seg for seg in plain["segments"])
    proc = run_cli("--ckpt_dir", str(DEMO_AUDIO), "--transcribe", "--audio_in", str(EXAMPLE), str(EXAMPLE),
                   "--language", "fr", "--output_dir", str(tmp_path / "fr"))
    assert proc.returncode == 1 and proc.stderr == "error: language 'fr': this model transcribes en (English) only\n"
    assert not (tmp_path / "fr").exists()


@pytest.mark.parametrize("flags", [
    ["--audio_in", "a.wav", "--output_format", "srt"],
    ["--transcribe", "--audio_in", "a.wav", "--json", "--output_format", "srt"],
    ["--transcribe", "--audio_in", "a.wav", "--segment_gap", "0"],
    ["--transcribe", "--audio_in", "a.wav", "--output_format", "docx"],
    ["--transcribe", "--audio_in", "a.wav", "--word_timestamps", "maybe"],
    ["--audio_in", "a.wav", "--language", "en"],
])
def test_cli_usage_errors(flags: list[str]) -> None:
    proc = run_cli("--ckpt_dir", "nowhere", *flags)
    assert proc.returncode == 2 and "usage:" in proc.stderr


@needs_demo_audio
def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    long = tmp_path / "minute.wav"
    order = write_repeated(long, example_pieces(), 60)
    child = pexpect.spawn(sys.executable, [str(REPO / "infer_chat.py"), "--ckpt_dir", str(DEMO_AUDIO),
                                           "--transcribe", "--audio_in", str(long), "--output_dir", str(tmp_path)],
                          cwd=str(REPO), env={**os.environ, "OMP_NUM_THREADS": "1"}, encoding="utf-8",
                          timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "minute.wav:" in child.before and "s of audio" in child.before
    assert (tmp_path / "minute.txt").read_text().count("\n") == len(order)
