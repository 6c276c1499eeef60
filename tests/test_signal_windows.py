"""Every script's signal policy holds from its first line to its last: no window before the handlers are
installed (a SIGINT during `import torch` printed a traceback, a SIGTERM killed the process by the signal) and
none after the work is done (a SIGINT during the interpreter's shutdown printed "Exception ignored" and a
traceback, and the finished export exited 0 anyway).

Each run is a real script started through a small driver that counts the interpreter's audit events (imports,
file opens, renames, ...: sys.addaudithook) from the moment utils.base.errors, the module that holds the policy,
is imported, and sends the signal to its own process at a chosen event: a named phase (the first import of
torch, the first checkpoint read, the export's final rename), a seeded sample of event numbers spread over the
whole run, or inside the interpreter's exit (an atexit callback). No timing is involved: the point is an event
of the run. Every run must end with 130 / 143 / 129, or 0 with the work complete; never a traceback on stderr
and never a partial output.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import forkserver
from tests.conftest import REPO
from tests.test_serve import DEMO

WAIT = 300

# python -c DRIVER SCRIPT SPEC SIGNAL COUNT_FILE -- ARGS. SPEC: "count" (write the number of events counted to
# COUNT_FILE), "N" (signal at the N-th event), "EVENT:TEXT" (at the first EVENT whose arguments contain TEXT),
# "exit" (inside an atexit callback that runs when everything else has finished).
DRIVER = textwrap.dedent('''
    import atexit, os, runpy, sys
    script, spec, signum, count_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    args = sys.argv[sys.argv.index("--") + 1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    seen = 0
    done = False

    def policy_module_ready():
        module = sys.modules.get("utils.base.errors")
        return module is not None and getattr(module.__spec__, "_initializing", True) is False

    def hook(event, hook_args):
        global seen, done
        if done or not policy_module_ready():
            return
        seen += 1
        if spec.isdigit():
            hit = seen == int(spec)
        elif ":" in spec:
            name, text = spec.split(":", 1)
            hit = event == name and text in " ".join(map(str, hook_args))
        else:
            return
        if hit:
            done = True
            os.kill(os.getpid(), signum)

    def at_exit():
        if spec == "count":
            with open(count_file, "w") as f:
                f.write(str(seen))
        elif spec == "exit":
            os.kill(os.getpid(), signum)
            for _ in range(1000):  # a few instructions, so a Python-level handler would run here
                pass

    atexit.register(at_exit)  # registered first: runs last, after every other exit callback
    sys.addaudithook(hook)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
''')
STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def drive(script: str, spec: str, sig: int, args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", DRIVER, str(REPO / script), spec, str(int(sig)),
                           str(tmp / "count"), "--", *args], capture_output=True, text=True, timeout=WAIT,
                          cwd=tmp, env=env, stdin=subprocess.DEVNULL)


def clean(r: subprocess.CompletedProcess, sig: int) -> None:
    """The run ended by the policy: 0 or the signal's status, and no traceback."""
    assert r.returncode in (0, STATUS[sig]), (r.returncode, r.stderr)
    for word in ("Traceback", "Exception ignored", "KeyboardInterrupt", "error:"):
        assert word not in r.stderr, r.stderr


def points(script: str, args: list[str], tmp: Path, marks: list[str], n: int, seed: int) -> tuple[list[str], str]:
    """The named marks, "exit", and `n` seeded event numbers over a whole counted run; and its stdout."""
    r = drive(script, "count", signal.SIGINT, args, tmp)
    assert r.returncode == 0, r.stderr
    total = int((tmp / "count").read_text())
    rng = random.Random(seed)
    return [*marks, "exit", *map(str, sorted(rng.sample(range(1, total + 1), n)))], r.stdout


def files(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_signal_anywhere(tiny_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--ckpt_root", str(tiny_tree), "--output_dir", str(out)]
    specs, _ = points("export.py", args, tmp_path, ["import:torch", "open:.pt", "os.rename:.out.tmp-"], 6, 22)
    complete = files(out)
    assert "model.safetensors" in complete
    for i, spec in enumerate(specs):
        sig = (signal.SIGINT, signal.SIGTERM)[i % 2]
        target = tmp_path / f"out{i}"
        r = drive("export.py", spec, sig, ["--ckpt_root", str(tiny_tree), "--output_dir", str(target)], tmp_path)
        clean(r, sig)
        if r.returncode == 0 or target.exists():  # an export is there in full or not at all
            assert files(target) == complete, (spec, r.stderr)
        assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name], spec
        if spec == "exit":  # the work was done: the exit cannot be interrupted any more
            assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", ["infer_chat.py", "infer_safetensors.py"])
def test_chat_signal_anywhere(script: str, tiny_tree: Path, tmp_path: Path) -> None:
    ckpt = tiny_tree
    if script == "infer_safetensors.py":
        ckpt = tmp_path / "export"
        r = forkserver.run([sys.executable, str(REPO / "export.py"), "--ckpt_root", str(tiny_tree), "--output_dir",
                            str(ckpt)], capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 0, r.stderr
    args = ["--ckpt_dir", str(ckpt), "--text", "hello there", "--max_new_tokens", "4"]
    marks = ["import:utils.cli.main", "import:torch", "open:.safetensors" if script == "infer_safetensors.py"
             else "open:.pt"]
    specs, answer = points(script, args, tmp_path, marks, 3, 7)
    for i, spec in enumerate(specs):
        sig = (signal.SIGTERM, signal.SIGINT)[i % 2]
        r = drive(script, spec, sig, args, tmp_path)
        clean(r, sig)
        if r.returncode == 0:
            assert r.stdout == answer, spec
        if spec == "exit":
            assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not (DEMO / "omni_sft_tiny" / "omni.pt").is_file(), reason=f"{DEMO} not built")
@pytest.mark.parametrize("spec,sig", [("import:utils.cli.args", signal.SIGTERM), ("import:torch", signal.SIGINT),
                                      ("open:omni.pt", signal.SIGINT), ("open:omni.pt", signal.SIGTERM),
                                      ("open:thinker", signal.SIGHUP)],
                         ids=["args-SIGTERM", "torch-SIGINT", "load-SIGINT", "load-SIGTERM", "load-SIGHUP"])
def test_serve_signal_during_the_load(spec: str, sig: int, tmp_path: Path) -> None:
    """A signal before the server serves ends it at once with the signal's status, quietly."""
    r = drive("serve.py", spec, sig, ["--ckpt_dir", str(DEMO), "--port", "0", "--threads", "1"], tmp_path)
    assert r.returncode == STATUS[sig], r.stderr
    for word in ("Traceback", "Exception ignored", "KeyboardInterrupt", "error:", "serving "):
        assert word not in r.stderr, r.stderr
