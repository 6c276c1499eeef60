"""Shared test fixtures: the μOmni reference fixtures (../shared) and tiny self-built checkpoint trees."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURE = REPO.parent / "shared" / "fixtures" / "muomni_small"

sys.path.insert(0, str(REPO))


def c_step_missing() -> str | None:
    """Why the C decode step (utils/engine/native/step.py) cannot be built here, or None. Outside CI a test of it
    skips with that reason; in CI (which installs a compiler) it fails instead."""
    from utils.engine.native.step import library
    lib, why = library()
    return None if lib is not None or os.environ.get("CI") else why


def c_step_param(*before: object):
    """The "c" case of a decode-kernel parametrization (after the values `before` it), skipped with the reason
    where the step cannot build."""
    why = c_step_missing()
    return pytest.param(*before, "c", marks=pytest.mark.skipif(why is not None, reason=f"no C decode step: {why}"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine the threads' spin-waiting makes
    a module several times slower: one thread while the module runs, then the previous setting."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """../shared/fixtures/muomni_small, or a skip saying why. Under CI (the CI variable set) a missing fixture is a
    failure: there ../shared is always laid beside the clone, so its absence means the run checks nothing."""
    if not (SHARED_FIXTURE / "expected.json").is_file():
        message = f"μOmni reference fixtures not found at {SHARED_FIXTURE} (../shared beside the repo)"
        if os.environ.get("CI"):
            pytest.fail(message + ": required when CI is set")
        pytest.skip(message)
    return SHARED_FIXTURE


@pytest.fixture(scope="session")
def expected(fixture_dir: Path) -> dict:
    return json.loads((fixture_dir / "expected.json").read_text())


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete random μOmni tree in the trainers' layout (read-only for tests: copy before modifying)."""
    from tests.factory import make_tree
    return make_tree(tmp_path_factory.mktemp("tiny") / "checkpoints")


def run_cli(*args: str, script: str = "infer_chat.py", stdin: str | bytes | None = None,
            timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one of the CLIs as a user would, capturing stdout and stderr separately."""
    return subprocess.run([sys.executable, str(REPO / script), *args], input=stdin, capture_output=True,
                          text=not isinstance(stdin, bytes), timeout=timeout, cwd=cwd or REPO)
