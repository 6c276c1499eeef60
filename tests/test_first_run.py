"""What a new user meets first, checked the way they meet it (the real scripts in subprocesses, on the shipped
demo model): a wrong model folder answered with the right one, --help examples that name folders which exist,
--version, --info and the flags --help lists. Expected values come from the library, never from hard-coded
strings."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEMO, QUESTION, REPO, needs_demo, run_cli

pytestmark = needs_demo


def test_wrong_root_suggests_the_model_dir_and_help_examples_exist(tmp_path: Path) -> None:
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


def test_info_model_card(demo_model) -> None:
    import torch
    model = demo_model
    r = run_cli("--ckpt_dir", str(DEMO), "--info", "--json")
    assert r.returncode == 0, r.stderr
    card = json.loads(r.stdout)
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
    human = run_cli("--ckpt_dir", str(DEMO), "--info")
    assert human.returncode == 0 and f"context length  {model.parts.ctx_len}" in human.stdout
    assert "decode mode" in human.stdout and f"{thinker_params:,} parameters" in human.stdout
    assert run_cli("--ckpt_dir", str(DEMO), "--info", "--text", "hi").returncode == 2


def test_help_lists_the_new_flags() -> None:
    text = run_cli("--help").stdout
    for flag in ("--version", "--info", "--timings", "--system", "--seed", "-1", "--ckpt-dir", "--max-new-tokens",
                 "--temp"):
        assert flag in text, flag
    readme = (REPO / "README.md").read_text()
    for flag in ("--version", "--info", "--timings", "--system"):
        assert f"`{flag}" in readme, flag
