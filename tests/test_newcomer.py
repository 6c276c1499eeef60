"""What a new user of the suite trips over (issue 12), each checked the way the user met it: the real scripts in
subprocesses on the shipped demo model and on real files. Expected answers come from the library (omni.py),
never from hard-coded strings.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_cli

DEMO = REPO / "checkpoints" / "demo"
EXAMPLES = REPO / "examples"
QUESTION = "What is 3 plus 4?"

pytestmark = pytest.mark.skipif(not (DEMO / "omni_sft_tiny" / "omni.pt").is_file(),
                                reason=f"{DEMO} not built (run: python tools/train_demo.py)")


@pytest.fixture(scope="module")
def model(one_thread):
    from omni import load_model
    return load_model(DEMO, device="cpu")


def demo(*args: str, **kw) -> subprocess.CompletedProcess:
    return run_cli("--ckpt_dir", str(DEMO), *args, **kw)


def one_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---------------------------------------------------------------- 1: the documented commands name the demo model

def test_1_wrong_root_suggests_the_model_dir_and_help_examples_exist(tmp_path: Path) -> None:
    r = run_cli("--ckpt_dir", "checkpoints", "--text", QUESTION)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "did you mean checkpoints/demo?" in r.stderr, r.stderr
    e = run_cli("--ckpt_root", "checkpoints", "--output_dir", str(tmp_path / "e"), script="export.py")
    assert e.returncode == 1 and "did you mean checkpoints/demo?" in e.stderr, e.stderr
    assert not (tmp_path / "e").exists()
    for script in ("infer_chat.py", "export.py"):
        help_text = "\n".join(line for line in run_cli("--help", script=script).stdout.splitlines()
                              if line.strip().startswith("python "))  # the examples
        dirs = re.findall(r"--(?:ckpt_dir|ckpt_root|omni_ckpt|thinker_ckpt|audio_ckpt|vision_ckpt|talker_ckpt|"
                          r"vocoder_ckpt) (\S+)", help_text)
        assert dirs, script
        for d in dirs:  # every directory an example names is in the shipped tree
            assert (REPO / d).is_dir(), (script, d)


# ---------------------------------------------------------------- 2: an over-long prompt keeps the answer's budget

def test_2_long_prompt_is_trimmed_and_the_answer_keeps_its_budget(model) -> None:
    short = one_json(demo("--text", QUESTION, "--json"))
    long_text = (QUESTION + " ") * 400
    r = demo("--text", long_text, "--json")
    obj = one_json(r)
    budget = model.sampling_options().max_new_tokens  # generation_config.json's
    assert obj["prompt_tokens"] == model.parts.ctx_len - budget - 1
    assert "warning: prompt trimmed" in r.stderr and f"max_new_tokens {budget}" in r.stderr
    assert obj["text"] == short["text"] and obj["generated_tokens"] == short["generated_tokens"]
    assert obj["text"] == model.chat(long_text)

    # only a budget the context cannot hold is reduced, and that is said
    r = demo("--text", long_text, "--json", "--max_new_tokens", "600")
    obj = one_json(r)
    assert f"max_new_tokens reduced from 600 to {model.parts.ctx_len - 3}" in r.stderr
    assert obj["prompt_tokens"] == 2

    # the same in a pipe
    p = demo("--json", stdin=long_text + "\n")
    assert p.returncode == 0 and "line 1: prompt trimmed" in p.stderr
    assert json.loads(p.stdout)["text"] == short["text"]


# ---------------------------------------------------------------- 3: pipes: one output line per message

def test_3_pipe_failures_keep_answers_aligned_and_input_lists_media(model) -> None:
    circle = str(EXAMPLES / "red_circle.png")
    long_line = "x" * 1_000_001
    lines = ["/image nope.png", "What do you see?", long_line, f"/image {circle}", "What do you see?", QUESTION]
    stdin = "\n".join(lines) + "\n"
    j = demo("--json", stdin=stdin)
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

    t = demo(stdin=stdin)
    assert t.returncode == 1
    assert t.stdout.split("\n")[:-1] == ["", "", objs[2]["text"], objs[3]["text"]]


# ---------------------------------------------------------------- 4: m4a / AAC audio

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


def test_4_m4a_audio_is_decoded(model, tmp_path: Path) -> None:
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
    r = demo("--audio_in", str(m4a), "--json")
    assert one_json(r)["text"] == model.chat(audio=str(m4a))


# ---------------------------------------------------------------- 5: repeated --image / --audio_in

def test_5_repeated_images_and_audio_are_all_used(model) -> None:
    circle, square = str(EXAMPLES / "red_circle.png"), str(EXAMPLES / "blue_square.png")
    obj = one_json(demo("--image", circle, "--image", square, "--json"))
    assert obj["text"] == model.chat(image=[circle, square])
    assert obj["text"] != model.chat(image=square)
    n_text = len(model.parts.tokenizer.prompt_ids("Describe what you see concisely."))
    assert obj["prompt_tokens"] == 2 + n_text
    clip = str(EXAMPLES / "green_triangle.wav")
    one = one_json(demo("--audio_in", clip, "--json"))
    two = one_json(demo("--audio_in", clip, "--audio_in", clip, "--json"))
    n_text = len(model.parts.tokenizer.prompt_ids("What did you hear?"))
    assert two["prompt_tokens"] - n_text == 2 * (one["prompt_tokens"] - n_text)
    assert two["text"] == model.chat(audio=[clip, clip])


# ---------------------------------------------------------------- 6: --video_frames range, --seed -1

def test_6_video_frames_limit_is_a_usage_error_and_seed_minus_one_is_random() -> None:
    from utils.cli import args as cli_args
    from utils.media import image
    assert cli_args.MAX_VIDEO_FRAMES == image.MAX_VIDEO_FRAMES  # the usage check and the decoder agree
    r = demo("--video", str(EXAMPLES / "shapes.mp4"), "--video_frames", "300")
    assert r.returncode == 2 and "--video_frames" in r.stderr and "256" in r.stderr
    sampled = ["--text", "Once upon a time", "--temperature", "1.5", "--max_new_tokens", "8", "--json"]
    a = one_json(demo(*sampled, "--seed", "-1"))
    assert isinstance(a["seed"], int) and a["seed"] >= 0
    again = one_json(demo(*sampled, "--seed", str(a["seed"])))
    assert again["token_ids"] == a["token_ids"]  # the reported seed reproduces the answer


# ---------------------------------------------------------------- 7: dash spellings, no prefix matching

def test_7_dash_aliases_and_exact_names_only(model) -> None:
    r = run_cli("--ckpt-dir", str(DEMO), "--text", QUESTION, "--max-new-tokens", "1", "--temp", "0", "--json")
    obj = one_json(r)
    assert obj["token_ids"] == model.answer(QUESTION, max_new_tokens=1).token_ids
    for prefix in (["--max_new", "3"], ["--tempera", "0"], ["--ckpt", str(DEMO)]):
        p = run_cli("--ckpt_dir", str(DEMO), "--text", "hi", *prefix)
        assert p.returncode == 2 and "unrecognized arguments" in p.stderr, prefix
    help_text = run_cli("--help").stdout
    assert "--ckpt-dir" in help_text and "--max-new-tokens" in help_text and "--temp" in help_text


# ---------------------------------------------------------------- 8: decode_tokens_per_s for any length

def test_8_decode_rate_counts_every_decode_step(model) -> None:
    ans = model.answer(QUESTION)  # a short answer ended by EOS
    short = one_json(demo("--text", QUESTION, "--json"))
    t = short["timing"]
    assert short["token_ids"] == ans.token_ids and len(ans.token_ids) < model.sampling_options().max_new_tokens
    assert t["decode_steps"] == short["generated_tokens"]  # the tokens after the first, and the EOS step
    assert t["decode_s"] > 0 and t["decode_tokens_per_s"] == pytest.approx(t["decode_steps"] / t["decode_s"], rel=1e-3)
    one = one_json(demo("--text", QUESTION, "--json", "--max_new_tokens", "1"))["timing"]
    assert one["decode_steps"] == 0 and one["decode_tokens_per_s"] == 0.0  # no step: no rate
    assert "decode_tokens_per_s" in (REPO / "README.md").read_text() and "decode_steps" in (
        REPO / "README.md").read_text()


# ---------------------------------------------------------------- 9: the Python API from another folder

def readme_python_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_9_readme_python_snippet_runs_from_elsewhere_as_documented(tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text()
    assert "PYTHONPATH=/path/to/muomni" in text  # the README says how to run it from elsewhere
    code = readme_python_block().replace("checkpoints/demo", str(DEMO)).replace("examples/", f"{EXAMPLES}/")
    code = code.replace('out_path="hello.wav"', f'out_path="{tmp_path / "hello.wav"}"')
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    bare = subprocess.run([sys.executable, "-c", "import omni"], cwd=tmp_path, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert "No module named 'omni'" in bare.stderr  # what the README warns about


# ---------------------------------------------------------------- 10: weights files and odd weights names

def test_10_weights_file_paths_and_other_names(model, tmp_path: Path) -> None:
    tree = tmp_path / "demo"
    shutil.copytree(DEMO, tree)
    omni_dir = tree / "omni_sft_tiny"
    (omni_dir / "omni.pt").rename(omni_dir / "omni_final.pt")
    expected = model.chat(image=str(EXAMPLES / "red_circle.png"))
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
    assert load_model(omni_dir / "omni_final.pt", device="cpu").chat(QUESTION) == model.chat(QUESTION)


# ---------------------------------------------------------------- --version, --info, --timings, --system

@pytest.mark.parametrize("script", ["infer_chat.py", "infer_safetensors.py", "export.py", "bench.py"])
def test_version_names_suite_torch_and_python(script: str) -> None:
    from importlib.metadata import version

    from utils.base.version import __version__
    r = subprocess.run([sys.executable, "-X", "importtime", str(REPO / script), "--version"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert __version__ in r.stdout and f"torch {version('torch')}" in r.stdout
    assert f"Python {sys.version.split()[0]}" in r.stdout
    if script != "export.py":  # these answer without importing torch
        assert not re.search(r"\|\s+torch$", r.stderr, re.M)


def test_info_model_card(model) -> None:
    import torch
    card = one_json(demo("--info", "--json"))
    assert set(card["components"]) == set(model.components)
    omni = torch.load(DEMO / "omni_sft_tiny" / "omni.pt", weights_only=True)
    thinker_params = sum(t.numel() for key in ("thinker", "proj_a", "proj_v") for t in omni[key].values())
    assert card["components"]["thinker"]["parameters"] == thinker_params
    vision = torch.load(DEMO / "vision_tiny" / "vision.pt", weights_only=True)
    vision_sd = vision.get("vit", vision)
    assert card["components"]["vision"]["parameters"] == sum(t.numel() for t in vision_sd.values())
    assert card["context_length"] == model.parts.ctx_len and card["dtype"] == "float32"
    assert card["vocabulary"]["tokenizer_pieces"] == model.parts.tokenizer.vocab_size
    assert card["decode_attention"] == model.sampling_options().decode_attention
    assert card["components"]["vision"]["config"].endswith("configs/vision_tiny.json")
    assert card["components"]["thinker"]["weights"].endswith("omni_sft_tiny/omni.pt")
    human = demo("--info")
    assert human.returncode == 0 and f"context length  {model.parts.ctx_len}" in human.stdout
    assert "decode mode" in human.stdout and f"{thinker_params:,} parameters" in human.stdout
    assert demo("--info", "--text", "hi").returncode == 2


def test_timings_summary_on_stderr() -> None:
    r = demo("--text", QUESTION, "--timings", "--json")
    obj = one_json(r)
    lines = r.stderr.splitlines()
    assert any(re.search(r"load time =\s+[\d.]+ ms", x) for x in lines)
    prompt = next(x for x in lines if "prompt eval time" in x)
    assert f"/ {obj['prompt_tokens']:5d} tokens" in prompt and "tokens per second" in prompt
    eval_line = next(x for x in lines if re.search(r"\beval time", x) and "prompt" not in x)
    assert f"/ {obj['timing']['decode_steps']:5d} runs" in eval_line
    quiet = demo("--text", QUESTION)
    assert "eval time" not in quiet.stderr  # only when asked (--timings or --verbose)


def test_system_prompt_is_prepended_and_absent_by_default(model) -> None:
    system = "Answer with digits."
    plain = one_json(demo("--text", QUESTION, "--json"))
    assert plain["prompt_tokens"] == len(model.parts.tokenizer.prompt_ids(QUESTION))  # format unchanged
    obj = one_json(demo("--text", QUESTION, "--system", system, "--json"))
    assert obj["prompt_tokens"] == len(model.parts.tokenizer.prompt_ids(f"{system} {QUESTION}"))
    assert obj["text"] == model.chat(f"{system} {QUESTION}") == model.chat(QUESTION, system=system)


def test_help_lists_the_new_flags() -> None:
    text = run_cli("--help").stdout
    for flag in ("--version", "--info", "--timings", "--system", "--seed", "-1"):
        assert flag in text, flag
    readme = (REPO / "README.md").read_text()
    for flag in ("--version", "--info", "--timings", "--system"):
        assert f"`{flag}" in readme, flag
