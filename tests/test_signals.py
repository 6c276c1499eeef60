"""Signals, concurrent exports and closed pipes end cleanly.

Every run is a real CLI process (infer_chat.py or export.py). To hit a phase exactly, the process is started
through a tiny driver that wraps one library function of that phase (reading a checkpoint, generating, writing
the WAV, writing or verifying the export, removing the replaced export) so that it announces itself in a marker
file and then waits; the test sends the signal when the marker appears (an event, not a sleep), and checks:
exit status 130 (SIGINT) or 143 (SIGTERM), no traceback, no temp file or directory left, the previous output
byte for byte intact.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests import forkserver
from tests.conftest import REPO

WAIT = 120.0  # seconds for a marker or an exit before the test calls it a hang

# The driver: python -c DRIVER SCRIPT PHASE MARKER [GO] -- ARGS. It wraps the phase's function, then runs SCRIPT
# as __main__ exactly as `python SCRIPT ARGS` would.
DRIVER = textwrap.dedent('''
    import os, runpy, sys, time
    script, phase, marker, go = sys.argv[1:5]
    args = sys.argv[sys.argv.index("--") + 1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))

    def pause():
        if os.path.exists(marker):  # once: a cleanup calling the same function again must not wait
            return
        open(marker, "w").close()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if go != "-" and os.path.exists(go):
                return
            time.sleep(0.02)

    def before(module, name, when=lambda *a, **k: True):
        original = getattr(module, name)
        def wrapped(*a, **k):
            if when(*a, **k):
                pause()
            return original(*a, **k)
        setattr(module, name, wrapped)

    def after(module, name):
        original = getattr(module, name)
        def wrapped(*a, **k):
            result = original(*a, **k)
            pause()
            return result
        setattr(module, name, wrapped)

    if phase == "load":
        import utils.weights.loading
        before(utils.weights.loading, "read_torch_file")
    elif phase == "generate":
        import omni
        original = omni.generate
        def generate(*a, **k):
            for i, token in enumerate(original(*a, **k)):
                yield token
                if i == 0:
                    pause()
        omni.generate = generate
    elif phase == "write_wav":  # the temp WAV is complete, the rename is next
        before(os, "replace", lambda src, dst, *a, **k: str(src).endswith(".tmp"))
    elif phase == "export_write":  # wrapped where the export calls it, imported before this driver or not
        import utils.weights.export_writer
        after(utils.weights.export_writer, "save_file")
    elif phase == "export_verify":
        import utils.weights.export_writer
        before(utils.weights.export_writer, "load_export")
    elif phase == "export_replace":  # the new export is in place, the replaced one is being removed
        import shutil
        before(shutil, "rmtree", lambda path, *a, **k: ".old-" in os.path.basename(str(path)))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
''')


def start(script: str, phase: str, marker: Path, args: list[str], cwd: Path, go: Path | None = None,
          **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return forkserver.popen([sys.executable, "-c", DRIVER, str(REPO / script), phase, str(marker),
                             str(go) if go else "-", "--", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (rc {proc.returncode}) before reaching the phase:\n{err.decode()}")
        assert time.monotonic() < deadline, "hang: the phase was never reached"
        time.sleep(0.02)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"hang after the signal:\n{err.decode()}")
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def assert_answers(export: Path) -> None:
    """The export at `export` is complete: it is a merged export and loads (as infer_safetensors.py finds and
    loads it: export_file, then omni.load_model, which checks every tensor against the config) and answers, in
    this process rather than a fresh one."""
    from omni import load_model
    from utils.weights.export_format import export_file
    export_file(export)
    assert len(load_model(export, device="cpu").answer("hi", max_new_tokens=2).token_ids) >= 1


def snapshot(d: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `d` (the previous output, to compare byte for byte)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def work_files(d: Path) -> list[str]:
    """Temp files and directories of ours anywhere under `d`."""
    return [str(p) for p in d.rglob(".*") if re.search(r"\.tmp$|\.(tmp|old)-\d+-", p.name)]


@pytest.fixture(scope="module")
def export_dir(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished export made by export.py (the 'previous output' that a forced export replaces)."""
    out = tmp_path_factory.mktemp("signals") / "previous"
    r = forkserver.run([sys.executable, str(REPO / "export.py"), "--ckpt_root", str(tiny_tree), "--output_dir",
                        str(out)], capture_output=True, text=True, timeout=WAIT, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return out


SIGNALS = [pytest.param(signal.SIGINT, 130, id="SIGINT"), pytest.param(signal.SIGTERM, 143, id="SIGTERM")]


@pytest.mark.parametrize("sig,status", SIGNALS)
@pytest.mark.parametrize("phase", ["load", "generate", "write_wav"])
def test_chat_signal_at_each_phase(phase: str, sig: int, status: int, tiny_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    out.write_bytes(b"the previous take")
    proc = start("infer_chat.py", phase, tmp_path / "marker",
                 ["--ckpt_dir", str(tiny_tree), "--text", "hello there", "--max_new_tokens", "4",
                  "--audio_out", str(out)], cwd=tmp_path)
    wait_for(tmp_path / "marker", proc)
    if phase == "write_wav":
        assert [p.name for p in tmp_path.glob(".out.wav.*.tmp")], "the temp WAV should exist at this point"
    proc.send_signal(sig)
    rc, stdout, stderr = finish(proc)
    assert rc == status, stderr
    assert "Traceback" not in stderr and "error:" not in stderr, stderr
    assert out.read_bytes() == b"the previous take"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker", "out.wav"], work_files(tmp_path)


@pytest.mark.parametrize("sig,status", SIGNALS)
@pytest.mark.parametrize("phase", ["load", "export_write", "export_verify", "export_replace"])
def test_export_signal_at_each_phase(phase: str, sig: int, status: int, tiny_tree: Path, export_dir: Path,
                                     tmp_path: Path) -> None:
    target = tmp_path / "export"
    shutil.copytree(export_dir, target)
    before = snapshot(target)
    proc = start("export.py", phase, tmp_path / "marker", ["--ckpt_root", str(tiny_tree), "--output_dir",
                                                           str(target), "--force", "--verify"], cwd=tmp_path)
    wait_for(tmp_path / "marker", proc)
    proc.send_signal(sig)
    rc, stdout, stderr = finish(proc)
    assert rc == status, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and "error:" not in stderr, stderr
    assert not work_files(tmp_path), work_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "marker"]
    if phase == "export_replace":  # the new export was already in place: it stays, complete
        assert snapshot(target).keys() == before.keys()
        assert_answers(target)
    else:
        assert snapshot(target) == before


def export_args(tree: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt_root", str(tree), "--output_dir", str(out), "--verify", *extra]


@pytest.mark.parametrize("force", [False, True], ids=["without_force", "with_force"])
def test_two_exports_to_one_directory(force: bool, tiny_tree: Path, tmp_path: Path) -> None:
    """Both runs are held after writing their temp export (so both passed the early target check), then
    released together: without --force exactly one wins and the other says the target is taken; with --force
    both succeed one after the other. Either way the result is one complete export and no leftovers."""
    out, go = tmp_path / "out", tmp_path / "go"
    extra = ("--force",) if force else ()
    procs = [start("export.py", "export_verify", tmp_path / f"marker{i}", export_args(tiny_tree, out, *extra),
                   cwd=tmp_path, go=go) for i in range(2)]
    for i, proc in enumerate(procs):
        wait_for(tmp_path / f"marker{i}", proc)
    assert not out.exists() and len(work_files(tmp_path)) == 2
    go.touch()
    results = [finish(p) for p in procs]
    codes = sorted(r[0] for r in results)
    for rc, stdout, stderr in results:
        assert "Traceback" not in stderr, stderr
    if force:
        assert codes == [0, 0], results
    else:
        assert codes == [0, 1], results
        loser = next(r for r in results if r[0] == 1)
        assert re.fullmatch(r"error: --output_dir .*already holds an export; pass --force to replace it\n", loser[2])
    assert not work_files(tmp_path), work_files(tmp_path)
    assert_answers(out)


def test_a_killed_exports_temp_dir_is_cleaned_by_the_next_run(tiny_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start("export.py", "export_write", tmp_path / "marker", export_args(tiny_tree, out), cwd=tmp_path)
    wait_for(tmp_path / "marker", proc)
    proc.kill()  # SIGKILL: nothing can clean up
    proc.wait()
    left = work_files(tmp_path)
    assert len(left) == 1 and f".out.tmp-{proc.pid}-" in left[0]
    r = forkserver.run([sys.executable, str(REPO / "export.py"), *export_args(tiny_tree, out)], capture_output=True,
                       text=True, timeout=WAIT, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"removed {left[0]}, left by the dead process {proc.pid}" in r.stderr
    assert not work_files(tmp_path) and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("reader", ["head -c 1", "true"])
def test_export_into_a_closed_pipe_completes(reader: str, tiny_tree: Path, tmp_path: Path) -> None:
    """`export.py ... | head -c 1`: the export is complete, so losing the table is not an error (exit 0, no
    'Broken pipe'); `| true` closes the pipe before anything is printed (it has ended before the export starts),
    which makes EPIPE certain."""
    out = tmp_path / "out"
    with open(os.devnull, "wb") as sink:
        pipe = subprocess.Popen(reader.split(), stdin=subprocess.PIPE, stdout=sink)
    if reader == "true":
        pipe.wait()
    r = forkserver.run([sys.executable, str(REPO / "export.py"), "--ckpt_root", str(tiny_tree), "--output_dir",
                        str(out)], stdout=pipe.stdin, stderr=subprocess.PIPE, text=True, timeout=WAIT, cwd=tmp_path)
    pipe.stdin.close()
    assert pipe.wait() == 0
    assert r.returncode == 0, r.stderr
    assert "Broken pipe" not in r.stderr and "Traceback" not in r.stderr and "error" not in r.stderr, r.stderr
    assert (out / "model.safetensors").is_file() and not work_files(tmp_path)
