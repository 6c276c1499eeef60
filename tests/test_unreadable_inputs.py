"""A checkpoint directory (or a directory around it) that cannot be read ends with one `error:` line naming
it, never `unexpected PermissionError`, and is never taken for absent (pathlib's glob skips an unreadable directory
without a word: a configs/ folder that cannot be listed would load spec defaults instead of the trainer config).

/proc is readable but holds entries that cannot be inspected (/proc/1/cwd, even for root): the real CLIs run on it.
Tests run as root, for whom mode 000 is still readable, so a directory a normal user could not read is emulated
in-process: os.stat, os.listdir and os.scandir refuse it and everything under it with EACCES, as the kernel does.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli
from utils.base.errors import OmniError
from utils.weights import export_writer
from utils.weights.loading import load_components


def assert_one_error(result, named: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and result.stdout == "", (result.returncode, result.stderr)
    assert lines[-1].startswith("error: ") and named in lines[-1], result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "unexpected" not in result.stderr


def test_ckpt_dir_proc_is_a_clean_error(tmp_path: Path) -> None:
    assert_one_error(run_cli("--ckpt_dir", "/proc", "--text", "hi", cwd=tmp_path), "--ckpt_dir /proc:")


def test_export_ckpt_root_proc_is_a_clean_error(tmp_path: Path) -> None:
    assert_one_error(run_cli("--ckpt_root", "/proc", "--output_dir", str(tmp_path / "out"), script="export.py",
                             cwd=tmp_path), "--ckpt_root /proc:")
    assert not (tmp_path / "out").exists()


def unlistable_proc_entry() -> str | None:
    """A directory under /proc that this process may not list (another process's cwd), or None."""
    for entry in ("/proc/1/cwd", "/proc/1/root"):
        try:
            os.listdir(entry)
        except PermissionError:
            return entry
        except OSError:
            continue
    return None


@pytest.mark.skipif(unlistable_proc_entry() is None, reason="every /proc/1 directory is readable here")
@pytest.mark.parametrize("script, flag", [("infer_chat.py", "--ckpt_dir"), ("export.py", "--ckpt_root")])
def test_unlistable_directory_is_named(script: str, flag: str, tmp_path: Path) -> None:
    entry = unlistable_proc_entry()
    extra = ["--text", "hi"] if script == "infer_chat.py" else ["--output_dir", str(tmp_path / "out")]
    assert_one_error(run_cli(flag, entry, *extra, script=script, cwd=tmp_path),
                     f"{flag} {entry}: cannot read (Permission denied)")


# ---------------------------------------------------------------- a directory only root could read, emulated

@pytest.fixture
def lock(monkeypatch: pytest.MonkeyPatch):
    """lock(d): from now on `d` cannot be listed and nothing inside it can be inspected (mode 000 for a normal user);
    `d` itself can still be stat'ed, as its parent is readable."""
    locked: list[str] = []
    real_stat, real_listdir, real_scandir = os.stat, os.listdir, os.scandir

    def refused(path, itself: bool) -> bool:
        if isinstance(path, int):
            return False
        p = os.path.abspath(os.fsdecode(path))
        return any(p.startswith(d + os.sep) or (itself and p == d) for d in locked)

    def denied(path) -> PermissionError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    def stat(path, *args, **kwargs):
        if refused(path, itself=False):
            raise denied(path)
        return real_stat(path, *args, **kwargs)

    def listdir(path="."):
        if refused(path, itself=True):
            raise denied(path)
        return real_listdir(path)

    def scandir(path="."):
        if refused(path, itself=True):
            raise denied(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "scandir", scandir)
    return lambda d: locked.append(str(Path(d).absolute()))


def test_unreadable_ckpt_dir_is_named(lock, tiny_tree: Path) -> None:
    lock(tiny_tree / "thinker_tiny")
    with pytest.raises(OmniError, match=f"^--ckpt_dir {tiny_tree / 'thinker_tiny'}: cannot read \\(Permission denied\\)$"):
        load_components(tiny_tree / "thinker_tiny")


def test_unreadable_component_dir_under_a_root_is_named(lock, tiny_tree: Path) -> None:
    lock(tiny_tree / "vision_tiny")
    with pytest.raises(OmniError, match=f"^directory {tiny_tree / 'vision_tiny'}: cannot read \\(Permission denied\\)$"):
        load_components(tiny_tree)


def test_unreadable_configs_dir_is_not_taken_for_no_config(lock, tiny_tree: Path) -> None:
    """Spec defaults would load (ctx_len 512 where the trainer config says 128) and answer differently."""
    lock(tiny_tree / "configs")
    with pytest.raises(OmniError, match=f"^directory {tiny_tree / 'configs'}: cannot read \\(Permission denied\\)$"):
        load_components(tiny_tree / "thinker_tiny")


def test_unreadable_export_sources_are_named(lock, tiny_tree: Path, tmp_path: Path) -> None:
    lock(tiny_tree / "talker_tiny")
    with pytest.raises(OmniError, match=f"^--talker_ckpt {tiny_tree / 'talker_tiny'}: cannot read "):
        export_writer.find_sources(named={"thinker_ckpt": str(tiny_tree / "thinker_tiny"),
                                          "talker_ckpt": str(tiny_tree / "talker_tiny")})
    lock(tmp_path / "cfg")
    (tmp_path / "cfg").mkdir()
    with pytest.raises(OmniError, match=f"^--configs_dir {tmp_path / 'cfg'}: cannot read "):
        export_writer.config_files(tmp_path / "cfg", {})
