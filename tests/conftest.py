"""Shared test fixtures and paths: the μOmni reference fixtures (../shared), the shipped demo model, tiny
self-built checkpoint trees, and the one compile cache of the session."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURE = REPO.parent / "shared" / "fixtures" / "muomni_small"
DEMO = REPO / "checkpoints" / "demo"  # the shipped demo model (tools/train_demo.py)
EXAMPLES = REPO / "examples"
QUESTION = "What is 3 plus 4?"  # a prompt the demo answers with a short, EOS-ended answer
DEMO_BUILT = (DEMO / "omni_sft_tiny" / "omni.pt").is_file()
needs_demo = pytest.mark.skipif(not DEMO_BUILT, reason=f"{DEMO} not built (run: python tools/train_demo.py)")

sys.path.insert(0, str(REPO))

# SIGNALS. The tests send SIGINT, SIGTERM and SIGHUP and expect their default actions, but a runner can start
# with some ignored (`nohup` ignores SIGHUP; a shell without job control starts background commands with SIGINT
# ignored), and every process the tests start would inherit that (a program rightly keeps an ignored signal
# ignored). Restored here, before the fork server or any child starts.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGHUP, signal.SIG_DFL)

from tests import forkserver  # noqa: E402  (after the path: the fork server imports the project)

# FRESH INTERPRETERS. The Python processes the tests start (run_cli, run_demo, and forkserver.popen / .run where a
# test needs a Popen) are forked from a helper interpreter that has already imported torch and the project
# (tests/forkserver.py): a real process with its own pid, argv, cwd, environment, stdio, exit status and signals,
# minus the 2.5 s import. A test gets a fresh interpreter (`fresh=True`, or subprocess itself) where start-up is
# its subject: what happens while the interpreter starts or imports (signals during import, `--help` and usage
# errors that must not import torch, -X importtime), the README's commands run as written, a first run, and
# anything on a terminal (pexpect: a real pty in a process of its own). Variables read at start-up or by
# `import torch` (PYTHON*, locale, OMP_/MKL_ threads, LD_*; forkserver.startup_env) are honoured either way:
# a run that changes them is forked from a helper started with exactly those values.

# The C decode step is compiled into MUOMNI_CACHE_DIR. One fresh directory per test session, set here at import
# (before anything builds it, and inherited by every subprocess a test starts): the step compiles once per
# session, the tests never write to the user's ~/.cache, and never load a library planted or left there (a
# MUOMNI_CACHE_DIR of the user's is overridden too). A helper process that imports this file (test_errors'
# batch runner) keeps its session's directory.
OWNS_CACHE = "MUOMNI_TEST_SESSION_CACHE" not in os.environ
if OWNS_CACHE:
    os.environ["MUOMNI_TEST_SESSION_CACHE"] = tempfile.mkdtemp(prefix="muomni-test-cache-")
SESSION_CACHE = Path(os.environ["MUOMNI_TEST_SESSION_CACHE"])
os.environ["MUOMNI_CACHE_DIR"] = str(SESSION_CACHE)


def pytest_unconfigure(config: pytest.Config) -> None:
    if OWNS_CACHE:
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def c_step_built() -> None:
    """The C decode step compiled into the session's cache before the first test: otherwise the CLIs a test
    starts together (test_fixture starts 14) would each compile it alone. Where it cannot build, nothing
    happens here; the tests of the step say why (c_step_missing)."""
    from utils.engine.native.step import library
    library()


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
def demo_model():
    """The demo model, loaded once for the session (or a skip where it is not built). Shared: a test must not
    change it (quantize, load other weights); one that needs a changed model loads its own."""
    if not DEMO_BUILT:
        pytest.skip(f"{DEMO} not built (run: python tools/train_demo.py)")
    from omni import load_model
    return load_model(DEMO, device="cpu")


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
            timeout: float = 120, cwd: Path | None = None, env: dict[str, str] | None = None,
            fresh: bool = False) -> subprocess.CompletedProcess:
    """Run one of the CLIs as a user would (a process of its own: exit status, stdout and stderr captured
    separately, signals), forked by the session's fork server unless `fresh` (see FRESH INTERPRETERS above)."""
    return forkserver.run([sys.executable, str(REPO / script), *args], fresh=fresh, input=stdin,
                          capture_output=True, text=not isinstance(stdin, bytes), timeout=timeout, cwd=cwd or REPO,
                          env=env)


def run_demo(*args: str, **kw) -> subprocess.CompletedProcess:
    """infer_chat.py on the shipped demo model (run_cli's options)."""
    return run_cli("--ckpt_dir", str(DEMO), *args, **kw)


def one_json(r: subprocess.CompletedProcess) -> dict:
    """The one JSON object a successful `--json` run printed."""
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)
