"""infer_chat.py on the inputs users hand it, run as they run it (subprocesses on the shipped demo model and
real files): an over-long prompt, pipes with failing lines, m4a audio, repeated --image / --audio_in, and
--ckpt_dir naming a weights file or a folder with oddly named weights. Expected answers come from the library
(omni.py), never from hard-coded strings."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEMO, EXAMPLES, QUESTION, needs_demo, one_json, run_cli, run_demo

pytestmark = [needs_demo, pytest.mark.usefixtures("one_thread")]


def test_the_budget_is_an_upper_bound_and_only_a_crowding_prompt_is_trimmed(demo_model) -> None:
    model = demo_model
    short = model.answer(QUESTION)  # what the CLI answers to it: test_chat_flags checks the two agree
    long_text = (QUESTION + " ") * 400
    r = run_demo("--text", long_text, "--json")
    obj = one_json(r)
    budget = model.sampling_options().max_new_tokens  # generation_config.json's
    assert obj["prompt_tokens"] == model.parts.ctx_len - budget - 1
    assert "warning: prompt trimmed" in r.stderr and f"max_new_tokens {budget}" in r.stderr
    assert obj["text"] == short.text and obj["generated_tokens"] == short.generated_tokens
    assert obj["text"] == model.chat(long_text)

    # a budget over a quarter of the context keeps that quarter beside a trimmed prompt, and that is said
    ctx = model.parts.ctx_len
    r = run_demo("--text", long_text, "--json", "--max_new_tokens", "600")
    obj = one_json(r)
    assert f"max_new_tokens 600 cut to {ctx // 4}" in r.stderr
    assert obj["prompt_tokens"] == ctx - ctx // 4 - 1
    assert obj["budget_cut"] == {"requested": 600, "allowed": ctx // 4, "context": ctx}
    assert obj["prompt_trimmed"]["to"] == obj["prompt_tokens"]

    # a prompt that fits is kept whole and the budget (an upper bound, llama.cpp's spellings) cut to the rest:
    # said in --json even with --quiet
    r = run_cli("-m", str(DEMO), "-p", QUESTION, "-n", "1000", "--quiet")
    assert (r.returncode, r.stdout, r.stderr) == (0, short.text + "\n", "")
    r = run_cli("--model", str(DEMO), "--prompt", QUESTION, "--n-predict", "1000", "--json", "--quiet")
    obj = one_json(r)
    assert r.stderr == "" and obj["text"] == short.text and obj["prompt_tokens"] == short.prompt_tokens
    assert obj["budget_cut"] == {"requested": 1000, "allowed": ctx - 1 - short.prompt_tokens, "context": ctx}
    assert "prompt_trimmed" not in obj

    # the same in a pipe
    p = run_demo("--json", stdin=long_text + "\n")
    assert p.returncode == 0 and "line 1: prompt trimmed" in p.stderr
    assert json.loads(p.stdout)["text"] == short.text


def test_pipe_failures_keep_answers_aligned_and_input_lists_media(demo_model) -> None:
    model = demo_model
    circle = str(EXAMPLES / "red_circle.png")
    long_line = "x" * 1_000_001
    lines = ["/image nope.png", "What do you see?", long_line, f"/image {circle}", "What do you see?", QUESTION]
    stdin = "\n".join(lines) + "\n"
    j = run_demo("--json", stdin=stdin)
    assert j.returncode == 1
    objs = [json.loads(x) for x in j.stdout.splitlines()]
    assert len(objs) == 4  # four message lines, four output lines
    assert "error" in objs[0] and "nope.png" in objs[0]["error"]  # not answered without its image
    assert "error" in objs[1] and "longer than" in objs[1]["error"]
    assert objs[2]["input"] == {"text": "What do you see?", "image": [circle]}
    assert objs[2]["text"] == model.chat("What do you see?", image=circle)
    assert objs[3]["input"] == {"text": QUESTION} and objs[3]["text"] == model.chat(QUESTION)
    errors = [line for line in j.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2  # one per failed message: the /image failure is reported with its message
    assert errors[0].startswith("error: line 2: not answered, because of line 1: image file nope.png")
    assert sum(line.startswith("error: line 3: longer than") for line in j.stderr.splitlines()) == 1

    t = run_demo(stdin=stdin)
    assert t.returncode == 1
    assert t.stdout.split("\n")[:-1] == ["", "", objs[2]["text"], objs[3]["text"]]


def write_m4a(wave: np.ndarray, sr: int, path: Path) -> Path:
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=sr)
        stream.layout = "mono"
        for i in range(0, len(wave), 1024):
            frame = av.AudioFrame.from_ndarray(wave[None, i:i + 1024].astype(np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = sr, i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_m4a_audio_is_decoded(demo_model, tmp_path: Path) -> None:
    import soundfile as sf

    from utils.media.audio import load_audio
    wav = EXAMPLES / "green_triangle.wav"
    wave, sr = sf.read(str(wav), dtype="float32")
    m4a = write_m4a(wave if wave.ndim == 1 else wave[:, 0], sr, tmp_path / "green_triangle.m4a")
    decoded = load_audio(m4a)
    reference = load_audio(wav)
    n = min(len(decoded), len(reference))
    lag = int(np.argmax(np.correlate(decoded[:4000], reference[:2000], mode="valid")))  # the encoder's priming
    corr = np.corrcoef(decoded[lag:n], reference[:n - lag])[0, 1]
    assert corr > 0.95, corr
    r = run_demo("--audio_in", str(m4a), "--json")
    assert one_json(r)["text"] == demo_model.chat(audio=str(m4a))


def test_repeated_images_and_audio_are_all_used(demo_model) -> None:
    model = demo_model
    circle, square = str(EXAMPLES / "red_circle.png"), str(EXAMPLES / "blue_square.png")
    obj = one_json(run_demo("--image", circle, "--image", square, "--json"))
    assert obj["text"] == model.chat(image=[circle, square])
    assert obj["text"] != model.chat(image=square)
    n_text = len(model.parts.tokenizer.prompt_ids("Describe what you see concisely."))
    assert obj["prompt_tokens"] == 2 + n_text
    clip = str(EXAMPLES / "green_triangle.wav")
    one = one_json(run_demo("--audio_in", clip, "--json"))
    two = one_json(run_demo("--audio_in", clip, "--audio_in", clip, "--json"))
    n_text = len(model.parts.tokenizer.prompt_ids("What did you hear?"))
    assert two["prompt_tokens"] - n_text == 2 * (one["prompt_tokens"] - n_text)
    assert two["text"] == model.chat(audio=[clip, clip])


def test_weights_file_paths_and_other_names(demo_model, tmp_path: Path) -> None:
    tree = tmp_path / "demo"
    shutil.copytree(DEMO, tree)
    omni_dir = tree / "omni_sft_tiny"
    (omni_dir / "omni.pt").rename(omni_dir / "omni_final.pt")
    expected = demo_model.chat(image=str(EXAMPLES / "red_circle.png"))
    ask = ["--image", str(EXAMPLES / "red_circle.png"), "--json"]

    by_file = run_cli("--ckpt_dir", str(omni_dir / "omni_final.pt"), *ask)
    assert one_json(by_file)["text"] == expected
    by_dir = run_cli("--ckpt_dir", str(omni_dir), *ask)
    assert one_json(by_dir)["text"] == expected
    assert "omni_final.pt" in by_dir.stderr  # the note says which file was taken

    shutil.copy(omni_dir / "omni_final.pt", omni_dir / "omni_best.pt")
    several = run_cli("--ckpt_dir", str(omni_dir), *ask)
    assert several.returncode == 1 and several.stdout == "" and several.stderr.count("\n") == 1
    assert "omni_best.pt" in several.stderr and "omni_final.pt" in several.stderr
    assert "--ckpt_dir" in several.stderr  # how to pick one
    picked = run_cli("--ckpt_dir", str(omni_dir / "omni_best.pt"), *ask)
    assert one_json(picked)["text"] == expected

    from omni import load_model
    assert load_model(omni_dir / "omni_final.pt", device="cpu").chat(QUESTION) == demo_model.chat(QUESTION)
