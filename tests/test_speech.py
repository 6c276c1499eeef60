"""Speech out: the Talker's decode modes, the 80 ms frame timing (1280 samples at 16 kHz, written as literals), HiFi-GAN vs Griffin-Lim, and --audio_out."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import run_cli
from utils.engine.speech import (SpeechOptions, frames_for_text, generate_codes, vocode_griffin_lim,
                          vocode_hifigan)
from utils.base.errors import OmniError


# ---------------------------------------------------------------- reference fixtures

def test_talker_greedy_24_via_api(fixture_dir: Path, expected: dict) -> None:
    from omni import load_model
    model = load_model(fixture_dir, device="cpu")
    speech = model.speak(frames=24, vocoder="griffin-lim")
    assert speech.codes.tolist() == expected["talker_greedy_24_causal"]
    assert speech.wave.shape == (24 * 1280,) and speech.sample_rate == 16000
    # the reference implementation's decode defect, on request only
    reference = generate_codes(model.parts.talker, 24, SpeechOptions(decode_attention="reference"))
    assert reference.tolist() == expected["talker_greedy_24"]


# ---------------------------------------------------------------- timing and vocoders (in-process)

def talker_mel(wave: np.ndarray) -> torch.Tensor:
    """The talker's training mel: power, n_fft 1024, win 1024, hop 1280, 128 HTK bands."""
    from utils.media.audio import power_mel
    return power_mel(wave, n_fft=1024, hop_length=1280, win_length=1024)


def test_griffin_lim_recovers_a_tone_at_80_ms_per_frame() -> None:
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    mel = talker_mel(tone)
    wave = vocode_griffin_lim(mel).numpy()
    assert wave.shape == (mel.shape[0] * 1280,)
    spectrum = np.abs(np.fft.rfft(wave[2000:-2000]))
    peak_hz = np.argmax(spectrum) * 16000 / (len(wave) - 4000)
    assert abs(peak_hz - 440) < 20, peak_hz  # the pitch survives the mel round trip
    assert 0.1 < np.abs(wave).max() < 1.5  # and roughly the loudness too


def test_hifigan_output_lasts_80_ms_per_frame(tiny_tree: Path) -> None:
    from omni import load_model
    model = load_model(tiny_tree, device="cpu")
    mel = torch.rand(7, 128)
    assert vocode_hifigan(model.parts.vocoder, mel).shape == (7 * 1280,)
    a = model.speak(frames=6, temperature=1.5, seed=4)
    b = model.speak(frames=6, temperature=1.5, seed=4)
    assert a.vocoder == "hifigan" and torch.equal(a.codes, b.codes) and np.array_equal(a.wave, b.wave)
    with pytest.raises(OmniError, match="empty"):
        model.speak("   ")
    assert frames_for_text("one two three") == 15


def test_speech_needs_a_talker(tiny_tree: Path) -> None:
    from omni import load_model
    model = load_model(tiny_tree / "thinker_tiny", device="cpu")
    with pytest.raises(OmniError, match="talker"):
        model.generate_speech("hello")


# ---------------------------------------------------------------- the CLI

def check_wav(path: Path, info: dict) -> None:
    wave, sr = sf.read(str(path))
    assert sr == 16000 and wave.ndim == 1
    assert abs(len(wave) / sr - info["frames"] * 0.08) <= 0.08
    assert abs(info["seconds"] - len(wave) / sr) < 1e-3 and info["sample_rate"] == 16000


def test_audio_out_with_hifigan(tiny_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "answer.wav"
    r = run_cli("--ckpt_dir", str(tiny_tree), "--text", "hello world", "--max_new_tokens", "20", "--ignore_eos",
                "--audio_out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    info = obj["audio_out"]
    assert info["vocoder"] == "hifigan" and info["path"] == str(out)
    assert info["frames"] == frames_for_text(obj["text"])  # the length follows the answer
    check_wav(out, info)
    assert "HiFi-GAN" in r.stderr
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no leftovers


def test_audio_out_falls_back_to_griffin_lim(tiny_tree: Path, tmp_path: Path) -> None:
    tree = tmp_path / "checkpoints"
    shutil.copytree(tiny_tree, tree)
    shutil.rmtree(tree / "vocoder_tiny")
    out = tmp_path / "answer.wav"
    r = run_cli("--ckpt_dir", str(tree), "--text", "hello world", "--max_new_tokens", "20", "--ignore_eos",
                "--audio_out", str(out), "--max_audio_frames", "9", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)["audio_out"]
    assert info["vocoder"] == "griffin-lim" and info["frames"] == 9
    check_wav(out, info)
    assert "Griffin-Lim" in r.stderr



def test_missing_vocoder_is_an_error_not_a_tone(tiny_tree: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """In-process: --vocoder hifigan without a vocoder checkpoint fails before anything is generated."""
    from utils.cli.main import main
    tree = tmp_path / "checkpoints"
    shutil.copytree(tiny_tree, tree)
    shutil.rmtree(tree / "vocoder_tiny")
    args = ["--ckpt_dir", str(tree), "--text", "hi", "--audio_out", str(tmp_path / "x.wav"), "--vocoder", "hifigan",
            "--quiet"]
    assert main(args, "infer_chat.py", "") == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error:") and "HiFi-GAN" in out.err
    assert not (tmp_path / "x.wav").exists()  # never a substitute tone


def test_audio_out_format_follows_the_suffix(tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """In-process: --audio_out x.mp3 writes MP3 (decoded by PyAV: the length --json reports); the API's out_path
    x.pcm the raw 16-bit samples of the same waveform it returns."""
    import av
    from omni import load_model
    from utils.cli.main import main
    out = tmp_path / "answer.mp3"
    assert main(["--ckpt_dir", str(tiny_tree), "--text", "hello world", "--max_new_tokens", "4", "--ignore_eos",
                 "--audio_out", str(out), "--json", "--quiet"], "infer_chat.py", "") == 0
    info = json.loads(capsys.readouterr().out)["audio_out"]
    assert out.read_bytes()[:3] == b"ID3"
    with av.open(str(out)) as container:
        samples = sum(f.samples for f in container.decode(container.streams.audio[0]))
        assert container.streams.audio[0].codec_context.sample_rate == 16000
    assert abs(samples / 16000 - info["seconds"]) < 0.08
    wave, sr = load_model(tiny_tree, device="cpu").generate_speech("hi there", out_path=tmp_path / "x.pcm")
    pcm = np.frombuffer((tmp_path / "x.pcm").read_bytes(), "<i2")
    assert sr == 16000 and np.array_equal(pcm, np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16))
