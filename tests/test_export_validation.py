"""export.py holds every trainer config it copies into <output_dir>/configs to the rules loading applies
(utils.weights.checkpoint.read_json, then utils.weights.components.check_config), so it never finishes an export
that infer_chat.py would then refuse. Real export.py / infer_chat.py subprocesses on the random `tiny_tree`, run
from a temporary folder (the omni config's cwd-relative pointers must not find the repository's checkpoints)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import run_cli

DIGITS_5000 = "1" * 5000  # over Python's 4300-digit int parsing limit: json.loads refuses it


def set_raw(name: str, key: str, raw: str) -> Callable[[Path], None]:
    """Rewrite `key` of configs/`name` to the JSON text `raw` (json.dumps cannot write a 5000-digit int)."""
    def edit(cfg_dir: Path) -> None:
        path = cfg_dir / name
        cfg = json.loads(path.read_text())
        cfg[key] = "@@RAW@@"
        path.write_text(json.dumps(cfg).replace('"@@RAW@@"', raw))
    return edit


def nested(cfg_dir: Path) -> None:
    (cfg_dir / "thinker_tiny.json").write_text('{"n_heads": ' + "[" * 100_000 + "]" * 100_000 + "}")


BAD_CONFIGS = {
    "n_heads_of_5000_digits": ("thinker_tiny.json", set_raw("thinker_tiny.json", "n_heads", DIGITS_5000)),
    "nested_100000_deep": ("thinker_tiny.json", nested),
    "ctx_len_over_the_limit": ("thinker_tiny.json", set_raw("thinker_tiny.json", "ctx_len", "1000000000")),
    "rope_theta_below_one": ("talker_tiny.json", set_raw("talker_tiny.json", "rope_theta", "1e-300")),
    "n_heads_zero_in_omni_overrides": ("omni_sft_tiny.json", set_raw("omni_sft_tiny.json", "thinker",
                                                                      '{"n_heads": 0}')),
    "upsample_rates_not_integers": ("vocoder_tiny.json", set_raw("vocoder_tiny.json", "upsample_rates", '["x"]')),
}


def configs_copy(tree: Path, tmp_path: Path) -> Path:
    cfg_dir = tmp_path / "cfg"
    shutil.copytree(tree / "configs", cfg_dir)
    return cfg_dir


def assert_refused(result, named: str, out: Path) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and result.stdout == "", (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
    assert "unexpected" not in result.stderr
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_configs_dir_copy_that_loading_refuses_is_refused(case: str, tiny_tree: Path, tmp_path: Path) -> None:
    name, edit = BAD_CONFIGS[case]
    cfg_dir = configs_copy(tiny_tree, tmp_path)
    edit(cfg_dir)
    out = tmp_path / "out"
    result = run_cli("--ckpt_root", str(tiny_tree), "--output_dir", str(out), "--configs_dir", str(cfg_dir),
                     script="export.py", cwd=tmp_path)
    assert_refused(result, str(cfg_dir / name), out)


def test_good_configs_dir_is_copied(tiny_tree: Path, tmp_path: Path) -> None:
    cfg_dir = configs_copy(tiny_tree, tmp_path)
    out = tmp_path / "out"
    result = run_cli("--ckpt_root", str(tiny_tree), "--output_dir", str(out), "--configs_dir", str(cfg_dir),
                     script="export.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "configs").iterdir()) == sorted(p.name for p in cfg_dir.iterdir())


def test_export_refuses_the_copy_infer_chat_would_refuse(tiny_tree: Path, tmp_path: Path) -> None:
    """Without a vocoder the export's config.json has no vocoder object, so loading reads configs/vocoder_tiny.json:
    a copy it cannot parse would make the finished export unloadable. The export refuses it instead; the same
    file placed into a good export shows that infer_chat.py refuses it too."""
    parts = [a for flag, d in (("omni_ckpt", "omni_sft_tiny"), ("thinker_ckpt", "thinker_tiny"))
             for a in (f"--{flag}", str(tiny_tree / d))]
    cfg_dir = configs_copy(tiny_tree, tmp_path)
    bad = cfg_dir / "vocoder_tiny.json"
    bad.write_text('{"upsample_rates": ' + DIGITS_5000 + "}")
    out = tmp_path / "out"
    assert_refused(run_cli(*parts, "--output_dir", str(out), "--configs_dir", str(cfg_dir), script="export.py",
                           cwd=tmp_path), str(bad), out)
    good = tmp_path / "good"
    assert run_cli(*parts, "--output_dir", str(good), script="export.py", cwd=tmp_path).returncode == 0
    (good / "configs" / "vocoder_tiny.json").write_bytes(bad.read_bytes())
    chat = run_cli("--ckpt_dir", str(good), "--text", "hi", "--max_new_tokens", "1", cwd=tmp_path)
    assert chat.returncode == 1 and "vocoder_tiny.json" in chat.stderr and "not valid JSON" in chat.stderr, \
        chat.stderr
