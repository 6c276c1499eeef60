"""The CLI as a user drives it: one-shot, pipes, JSON, sampling flags, streaming, video, errors and exit codes.

Most checks run the real scripts in subprocesses (tests.conftest.run_cli) on the random `tiny_tree`; several
checks share one process where that is natural, since every process pays for importing torch.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import forkserver
from tests.conftest import REPO, run_cli

FLAGS = ["--ckpt_dir", "--device", "--dtype", "--text", "--prompt", "--image", "--video", "--video_frames",
         "--audio_in", "--transcribe", "--max_new_tokens", "--temperature", "--top_k", "--top_p",
         "--repetition_penalty", "--seed", "--ignore_eos", "--decode_attention", "--json", "--no_stream",
         "--audio_out", "--audio_temperature", "--audio_top_k", "--max_audio_frames", "--vocoder", "--quiet",
         "--verbose", "--ocr", "--ocr_max_len"]
JSON_KEYS = {"text", "token_ids", "prompt_tokens", "generated_tokens", "timing"}
TIMING_KEYS = {"load_s", "prefill_s", "decode_s", "decode_tokens_per_s"}


def make_video(path: Path, n_frames: int = 8, size: int = 32) -> Path:
    """A tiny MPEG-4 clip whose frames cycle through red, green and blue."""
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            img = np.zeros((size, size, 3), np.uint8)
            img[..., i % 3] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def tokenizer(tree: Path):
    from utils.media.tokenizer import Tokenizer
    return Tokenizer(tree / "thinker_tiny" / "tokenizer.model")


# ---------------------------------------------------------------- help and usage errors (no model loaded)

@pytest.mark.parametrize("script", ["infer_chat.py", "infer_safetensors.py"])
def test_help_lists_every_flag_with_examples(script: str) -> None:
    r = run_cli("--help", script=script)
    assert r.returncode == 0, r.stderr
    for flag in FLAGS:
        assert flag in r.stdout, flag
    assert "examples:" in r.stdout and "--audio_out hello.wav" in r.stdout and "printf" in r.stdout
    assert "not conditioned on the text" in " ".join(r.stdout.split())  # the Talker caveat is stated


@pytest.mark.parametrize("bad", [
    ["--temperature", "-1"], ["--top_p", "0"], ["--top_p", "1.5"], ["--top_k", "-3"], ["--max_new_tokens", "0"],
    ["--max_new_tokens", "ten"], ["--repetition_penalty", "0"], ["--seed", "-2"], ["--video_frames", "0"], ["--video_frames", "300"],
    ["--max_audio_frames", "-5"], ["--temperature", "nan"], ["--decode_attention", "sideways"],
    ["--device", "tpu"], ["--dtype", "int8"], ["--transcribe"], ["--audio_out", "x.wav"],
    ["--ocr"], ["--ocr", "--image", "a.png", "--prompt", "p"], ["--ocr_max_len", "0"],
])
def test_invalid_values_are_usage_errors(bad: list[str], tmp_path: Path) -> None:
    r = run_cli("--ckpt_dir", str(tmp_path), *bad)
    assert r.returncode == 2, (bad, r.stderr)
    assert r.stdout == ""
    assert "error:" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- errors with a model

def test_missing_devices_and_dirs_are_one_line_errors(tiny_tree: Path, tmp_path: Path) -> None:
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is not an error here")
    r = run_cli("--ckpt_dir", str(tiny_tree), "--text", "hi", "--device", "cuda")
    assert r.returncode == 1 and r.stdout == ""
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "cuda" in errors[0].lower() and "Traceback" not in r.stderr


def test_unexpected_exceptions_and_interrupts(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                              tiny_tree: Path) -> None:
    """In-process: a bug becomes one `error:` line suggesting --verbose; --verbose adds the traceback;
    KeyboardInterrupt exits 130."""
    import omni
    from utils.cli.main import main

    def broken(*a, **k):
        raise RuntimeError("kaboom")
    monkeypatch.setattr(omni, "load_model", broken)
    args = ["--ckpt_dir", str(tiny_tree), "--text", "hi"]
    assert main(args, "infer_chat.py", "") == 1
    err = capsys.readouterr().err
    assert "error: unexpected RuntimeError: kaboom" in err and "--verbose" in err and "Traceback" not in err
    assert main(args + ["--verbose"], "infer_chat.py", "") == 1
    assert "Traceback" in capsys.readouterr().err

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(omni, "load_model", interrupted)
    assert main(args, "infer_chat.py", "") == 130


def test_bad_inputs_are_one_line_errors(capsys: pytest.CaptureFixture, tiny_tree: Path, tmp_path: Path,
                                        fixture_inputs: Path) -> None:
    """In-process (the subprocess path of OmniError is covered above): missing dirs, a file with no video."""
    from utils.cli.main import main
    assert main(["--ckpt_dir", str(tmp_path / "nowhere"), "--text", "hi", "--quiet"], "infer_chat.py", "") == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error:") and out.err.count("\n") == 1
    args = ["--ckpt_dir", str(tiny_tree), "--video", str(fixture_inputs / "audio.wav"), "--quiet"]
    assert main(args, "infer_chat.py", "") == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error:") and "no video stream" in out.err


# ---------------------------------------------------------------- one-shot

def test_one_shot_text_and_json(tiny_tree: Path) -> None:
    common = ["--ckpt_dir", str(tiny_tree), "--text", "what is one plus two ?", "--max_new_tokens", "12"]
    j = run_cli(*common, "--json", "--verbose")
    assert j.returncode == 0, j.stderr
    obj = json.loads(j.stdout)
    assert JSON_KEYS <= set(obj) and TIMING_KEYS <= set(obj["timing"])
    assert obj["generated_tokens"] == len(obj["token_ids"]) <= 12
    assert obj["prompt_tokens"] == 1 + len(tokenizer(tiny_tree).encode("what is one plus two ?"))
    assert "loading" in j.stderr  # with --verbose, loading messages go to stderr; stdout holds the answer only
    quiet_script = run_cli(*common)
    assert quiet_script.returncode == 0 and quiet_script.stderr == ""  # not a terminal: no loading chatter
    t = run_cli(*common, "--quiet", "--no_stream")
    assert t.returncode == 0 and t.stderr == ""
    assert t.stdout == obj["text"] + "\n"


def test_image_audio_and_prompt_flag(tiny_tree: Path, fixture_inputs: Path) -> None:
    """--prompt replaces the default text; an image is one token; audio adds its encoder frames."""
    r = run_cli("--ckpt_dir", str(tiny_tree), "--image", str(fixture_inputs / "image.png"), "--audio_in",
                str(fixture_inputs / "audio.wav"), "--prompt", "what do you see ?", "--max_new_tokens", "4",
                "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    text_ids = 1 + len(tokenizer(tiny_tree).encode("what do you see ?"))
    audio_tokens = 13  # 1 s: 101 mel frames, three stride-2 convolutions -> 51 -> 26 -> 13
    assert obj["prompt_tokens"] == 1 + audio_tokens + text_ids


@pytest.fixture(scope="module")
def fixture_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 s 16 kHz tone and a small image, written here so these tests need no ../shared."""
    import soundfile as sf
    from PIL import Image
    d = tmp_path_factory.mktemp("inputs")
    t = np.arange(16000) / 16000
    sf.write(str(d / "audio.wav"), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(d / "image.png")
    return d


def test_video_frames_become_image_tokens(tiny_tree: Path, tmp_path: Path) -> None:
    video = make_video(tmp_path / "clip.mp4")
    r = run_cli("--ckpt_dir", str(tiny_tree), "--video", str(video), "--video_frames", "3", "--max_new_tokens", "4",
                "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    default_prompt = 1 + len(tokenizer(tiny_tree).encode("Describe what you see concisely."))
    assert json.loads(r.stdout)["prompt_tokens"] == 3 + default_prompt


# ---------------------------------------------------------------- pipes

def test_pipe_one_answer_per_line(tiny_tree: Path, fixture_inputs: Path) -> None:
    lines = ["what is one plus two ?", "", "hello world", f"/image {fixture_inputs / 'image.png'}",
             "what do you see ?", "a red circle ."]
    stdin = "\n".join(lines) + "\n"
    j = run_cli("--ckpt_dir", str(tiny_tree), "--max_new_tokens", "8", "--json", "--quiet", stdin=stdin)
    assert j.returncode == 0 and j.stderr == ""
    objs = [json.loads(l) for l in j.stdout.splitlines()]
    assert [o["input"]["text"] for o in objs] == [l for l in lines if not l.startswith("/")]
    assert objs[3]["input"]["image"] == [str(fixture_inputs / "image.png")]  # the media is listed
    assert [set(o["input"]) for o in objs].count({"text", "image"}) == 1
    assert all(JSON_KEYS <= set(o) for o in objs)
    assert objs[1]["text"] == "" and objs[1]["generated_tokens"] == 0  # empty line, empty answer
    n_text = lambda s: 1 + len(tokenizer(tiny_tree).encode(s))  # noqa: E731
    assert objs[3]["prompt_tokens"] == 1 + n_text("what do you see ?")  # the image went to the next line only
    assert objs[4]["prompt_tokens"] == n_text("a red circle .")

    t = run_cli("--ckpt_dir", str(tiny_tree), "--max_new_tokens", "8", stdin=stdin)
    assert t.returncode == 0, t.stderr
    assert t.stdout.split("\n")[:-1] == [o["text"] for o in objs]  # same answers, one per line
    assert "attached image" in t.stderr


# ---------------------------------------------------------------- sampling

def test_seeded_sampling_is_reproducible(tiny_tree: Path) -> None:
    common = ["--ckpt_dir", str(tiny_tree), "--temperature", "3", "--top_k", "50", "--top_p", "0.95",
              "--repetition_penalty", "1.2", "--max_new_tokens", "24", "--ignore_eos", "--decode_attention",
              "causal", "--quiet"]
    piped = run_cli(*common, "--seed", "11", stdin="hello world\nhello world\n")
    first, second = piped.stdout.splitlines()
    assert first == second  # every answer is seeded afresh
    same = run_cli(*common, "--seed", "11", "--text", "hello world", "--json")
    assert json.loads(same.stdout)["text"] == first and json.loads(same.stdout)["generated_tokens"] == 24
    other = run_cli(*common, "--seed", "12", "--text", "hello world")
    assert other.returncode == 0 and other.stdout.strip() != first


# ---------------------------------------------------------------- streaming

def test_streaming_prints_while_generating_and_ctrl_c_exits_130(long_tree: Path) -> None:
    """Text arrives before generation ends (we interrupt it mid-answer); the pieces are the answer's prefix."""
    args = ["--ckpt_dir", str(long_tree), "--text", "once upon a time", "--ignore_eos"]
    ref = run_cli(*args, "--max_new_tokens", "40", "--json", "--quiet")
    full = json.loads(ref.stdout)["text"]
    proc = forkserver.popen([sys.executable, str(REPO / "infer_chat.py"), *args, "--max_new_tokens", "2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        first = os.read(proc.stdout.fileno(), 64)  # blocks until the first piece is flushed
        assert first and proc.poll() is None
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out = (first + rest).decode()
    assert proc.returncode == 130, err
    assert out.endswith("\n")  # the partial answer's line is ended
    partial = out[:-1]
    assert partial and (full.startswith(partial) or partial.startswith(full))
    assert b"interrupted" in err


@pytest.fixture(scope="module")
def long_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny tree with a 2048-token context, so an answer can run long enough to be interrupted."""
    from tests.factory import make_tree
    return make_tree(tmp_path_factory.mktemp("long") / "checkpoints", ctx_len=2048)


# ---------------------------------------------------------------- in-process: API and detokeniser

def test_stream_joins_to_chat_and_spaces_survive(tiny_tree: Path) -> None:
    from omni import load_model
    from utils.media.tokenizer import IncrementalDecoder
    model = load_model(tiny_tree, device="cpu")
    pieces = list(model.stream("hello world", max_new_tokens=20, ignore_eos=True, decode_attention="causal"))
    assert "".join(pieces) == model.chat("hello world", max_new_tokens=20, ignore_eos=True,
                                         decode_attention="causal")
    tok = model.parts.tokenizer
    text = "hello world how are you"
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push(i) for i in tok.encode(text)) + dec.flush() == text


def test_incremental_decoder_holds_back_partial_characters() -> None:
    """Byte-level ids: a multi-byte character is emitted only once all its bytes are there."""
    from utils.media.tokenizer import IncrementalDecoder

    class ByteTokenizer:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

        def decode_alone(self, token_id):
            return self.decode([token_id])
    text = "naïve 日本 ok"
    dec = IncrementalDecoder(ByteTokenizer())  # type: ignore[arg-type]
    pieces = [dec.push(b) for b in text.encode("utf-8")]
    assert "".join(pieces) + dec.flush() == text
    assert "\ufffd" not in "".join(pieces)
    assert pieces.count("") == 1 + 2 + 2  # ï is 2 bytes, 日 and 本 are 3: held back 1, 2 and 2 times


# ---------------------------------------------------------------- the reference fixtures through the CLI

@pytest.mark.parametrize("mode", ["default", "reference"])
def test_cli_reproduces_reference_ids(fixture_dir: Path, expected: dict, mode: str) -> None:
    """Causal decoding by default; --decode_attention reference gives the reference implementation's ids."""
    extra = [] if mode == "default" else ["--decode_attention", "reference"]
    r = run_cli("--ckpt_dir", str(fixture_dir / "export"), "--image", str(fixture_dir / "inputs" / "image.png"),
                "--audio_in", str(fixture_dir / "inputs" / "audio_16k.wav"), "--text", expected["mm_prompt"],
                "--max_new_tokens", "16", "--json", "--quiet", "--device", "cpu", *extra, script="infer_safetensors.py")
    assert r.returncode == 0, r.stderr
    key = "mm_greedy_16_image_audio" + ("_causal" if mode == "default" else "")
    assert json.loads(r.stdout)["token_ids"] == expected[key][:16]
