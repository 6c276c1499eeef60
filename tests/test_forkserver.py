"""The fork server (tests/forkserver.py) runs a program as a fresh interpreter does: each program here runs both
ways and must give the same exit status, stdout and stderr: exit codes and SystemExit's forms, uncaught
exceptions and their tracebacks, SIGINT and SIGTERM deaths, atexit callbacks and threads at exit, a stdout that
cannot be flushed at exit, argv / sys.path[0] / cwd / environment / TMPDIR / stdin, a new session, and a start-up
variable (OMP_NUM_THREADS, read by `import torch`)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import forkserver

SCRIPT = textwrap.dedent('''
    import json, os, sys, tempfile
    print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "name": __name__,
                      "file": __file__, "executable": sys.executable, "var": os.environ.get("FS_VAR"),
                      "tmp": tempfile.gettempdir(), "stdin": sys.stdin.read(), "session": os.getsid(0) == os.getpid(),
                      "main": sys.modules["__main__"].__dict__.get("MARK")}))
    MARK = 1
''')

PROGRAMS = {
    "exit_3": "import sys; sys.exit(3)",
    "exit_none": "import sys; print('out'); sys.exit()",
    "exit_text": "import sys; sys.exit('bye')",
    "exit_256": "raise SystemExit(259)",
    "uncaught": "def f():\n    1/0\nf()",
    "keyboard_interrupt": "raise KeyboardInterrupt",
    "sigterm_default": "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
    "atexit_and_thread": "import atexit, sys, threading\natexit.register(print, 'at exit', file=sys.stderr)\n"
                         "threading.Thread(target=lambda: print('thread')).start()",
    "exception_in_atexit": "import atexit\natexit.register(lambda: 1/0)",
    "module_argv": "import sys; print(sys.argv[1:])",
}


def both(args: list, **kw) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    fresh = subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)
    forked = forkserver.run(args, capture_output=True, text=True, timeout=60, **kw)
    return fresh, forked


@pytest.mark.parametrize("name", PROGRAMS)
def test_a_program_ends_as_in_a_fresh_interpreter(name: str) -> None:
    fresh, forked = both([sys.executable, "-c", PROGRAMS[name], "arg"])
    seen = [(r.returncode, r.stdout, re.sub(r"0x[0-9a-f]+", "0x...", r.stderr)) for r in (fresh, forked)]
    assert seen[1] == seen[0]


def test_a_script_sees_what_a_fresh_interpreter_sees(tmp_path: Path) -> None:
    script = tmp_path / "folder" / "show.py"
    script.parent.mkdir()
    script.write_text(SCRIPT)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "FS_VAR": "x y", "TMPDIR": str(tmp_path / "tmp")}
    for session in (False, True):
        fresh, forked = both([sys.executable, str(script), "a", "b c"], input="from stdin", env=env, cwd=tmp_path,
                             start_new_session=session)
        assert forked.returncode == fresh.returncode == 0, (fresh.stderr, forked.stderr)
        assert json.loads(forked.stdout) == json.loads(fresh.stdout)
        assert json.loads(fresh.stdout)["session"] is session and json.loads(fresh.stdout)["tmp"] == env["TMPDIR"]
    fresh, forked = both([sys.executable, "-m", "folder.show", "m"], cwd=tmp_path)
    assert json.loads(forked.stdout) == json.loads(fresh.stdout) and json.loads(fresh.stdout)["argv"][1:] == ["m"]


def test_stdout_that_cannot_be_flushed_at_exit() -> None:
    """Exit status 120 and the interpreter's "Exception ignored" line, as when a reader closed the pipe."""
    args = [sys.executable, "-c", "import io, sys\nsys.stdout = io.TextIOWrapper(open(1, 'wb', closefd=False))\n"
                                  "print('still in the buffer at exit')"]  # buffered whatever PYTHONUNBUFFERED says
    results = []
    for start in (subprocess.Popen, forkserver.popen):
        proc = start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()
        results.append((proc.stderr.read(), proc.wait()))
    assert results[0] == results[1] and results[0][1] == 120


def test_start_up_variables_reach_import_torch() -> None:
    """OMP_NUM_THREADS is read when torch loads: a run that sets it is forked from a server started with it."""
    code = "import torch; print(torch.get_num_threads())"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fresh, forked = both([sys.executable, "-c", code], env=env)
    assert forked.stdout == fresh.stdout == "1\n"


def test_the_runs_are_forked_and_start_up_subjects_are_not() -> None:
    """The comparisons above compare a fork with a fresh interpreter, not two fresh ones."""
    proc = forkserver.popen([sys.executable, "-c", "import os; print(os.getppid())"], stdout=subprocess.PIPE, text=True)
    assert isinstance(proc, forkserver.ForkedPopen) and int(proc.communicate()[0]) != os.getpid()
    for args, kw in (([sys.executable, "-X", "importtime", "-c", "pass"], {}), ([sys.executable, "-c", "pass"],
                     {"fresh": True}), (["true"], {}), ([sys.executable, "-c", "pass"], {"preexec_fn": os.getpid})):
        with forkserver.popen(args, **kw) as proc:
            assert not isinstance(proc, forkserver.ForkedPopen), args


def test_resource_limits_hold_in_the_child() -> None:
    """`rlimits` are set in the child, fresh or forked, and only there."""
    import resource
    code = "import resource; print(resource.getrlimit(resource.RLIMIT_FSIZE))"
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    for fresh in (True, False):
        r = forkserver.run([sys.executable, "-c", code], fresh=fresh, rlimits={resource.RLIMIT_FSIZE: (4096, hard)},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout == f"(4096, {hard})\n", r
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] != 4096
