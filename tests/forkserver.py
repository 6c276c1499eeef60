"""A fork server for the Python processes the tests start: real processes without the 2.5 s `import torch`.

Why: nearly all of a CLI run on the demo model is the interpreter importing torch and the project (about 3 s of
CPU under load, of which the answer takes a few ms), and the suite starts several hundred such runs. Here one
helper interpreter per session (and per start-up environment, see startup_env) imports torch and the project's
modules, computes nothing (no torch thread pool, no C step: forking is then safe), and forks one child per run.
The child takes the run's stdin/stdout/stderr (the caller's pipes or files, passed over a Unix socket), argv,
cwd and environment, runs the script (or `-c` code, or `-m` module) as `__main__` the way `python` does (the
script's folder as sys.path[0]) and ends as the interpreter ends (`finish`: threads joined, atexit callbacks,
flushes, an uncaught exception's traceback and status 1, SIGINT's death). It is a separate process with its own pid, exit status and
signals; `ForkedPopen` is a `subprocess.Popen` whose child is that process, so pipes, text mode, timeouts,
`communicate`, `send_signal` and `wait` are Popen's own.

When a run gets a fresh interpreter instead (`popen` / `run` decide; the rule is in tests/conftest.py): the
caller asks for one (`fresh=True`: the test's subject is start-up itself), the command is not
`sys.executable` followed by a script, `-c` or `-m` (an interpreter option such as `-X importtime` is start-up),
Popen options the fork server does not reproduce (preexec_fn, pass_fds, shell, executable, user/group, umask,
process_group) are given, or the platform lacks os.pidfd_open (Linux has it from 5.3). Variables read while the
interpreter starts or imports torch (startup_env: PYTHON*, locale, OpenMP/BLAS threads, the loader...) are never
changed in a child: a run whose values differ from the session's goes to a fork server started with exactly
those values.

Differences from a fresh interpreter, none of which a test here depends on (tests/test_forkserver.py runs the same
programs both ways): modules are already imported (so their import-time work, and any signal during it, happened
in the server; the server refuses to serve if those imports printed anything), the hash seed is the server's, and
the modules' teardown at exit is skipped (`finish`).
"""
from __future__ import annotations

import atexit
import gc
import io
import json
import os
import random
import resource
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import types
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "numpy", "omni", "utils.cli.main", "utils.cli.transcribe_command", "utils.server.app",
           "utils.batch.main", "utils.weights.export_writer")
STARTUP_PREFIXES = ("PYTHON", "LC_", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "TORCH_", "PYTORCH_", "LD_",
                    "MALLOC_", "CUDA_")
STARTUP_NAMES = ("LANG", "LANGUAGE", "TZ")
UNSUPPORTED = {"preexec_fn": None, "pass_fds": (), "shell": False, "executable": None, "user": None, "group": None,
               "extra_groups": None, "umask": -1, "process_group": None}
MAX_REQUEST = 1 << 20


def startup_env(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The variables of `env` read at interpreter start-up or `import torch` (the key of a fork server)."""
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(STARTUP_PREFIXES) or k in STARTUP_NAMES))


# ---------------------------------------------------------------------------------------------------- server side


class Job:
    """One run, in the forked child: its request and its three standard streams."""

    def __init__(self, request: dict[str, Any], fds: list[int]) -> None:
        self.request, self.fds = request, fds

    def run(self) -> NoReturn:
        """Become the run's process, run it as `python` would, and end as the interpreter ends (`finish`)."""
        req = self.request
        if req["new_session"]:
            os.setsid()
        for which, limits in req["rlimits"]:
            resource.setrlimit(which, tuple(limits))
        for target, fd in enumerate(self.fds):
            os.dup2(fd, target)
        for fd in set(self.fds):
            os.close(fd)
        reopen_stdio()
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        tempfile.tempdir = None  # recomputed from this run's TMPDIR
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        status, interrupted = 0, False
        try:
            self.main(*req["argv"])
        except SystemExit as exc:
            status = exit_status(exc.code)
        except BaseException as exc:  # an uncaught exception: its traceback (from the script's frames), status 1
            interrupted = isinstance(exc, KeyboardInterrupt)
            tb = exc.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__, "<frozen runpy>"):
                tb = tb.tb_next
            sys.excepthook(type(exc), exc.with_traceback(tb), tb)
            status = 1
        finish(status, interrupted)

    @staticmethod
    def main(mode: str, *rest: str) -> None:
        """`python SCRIPT ARGS`, `python -c CODE ARGS` or `python -m MODULE ARGS`: argv, sys.path[0], __main__."""
        if mode in ("-c", "-m"):
            main = types.ModuleType("__main__")  # `python -c` / `-m` run in a bare __main__
            main.__builtins__ = __builtins__
            sys.modules["__main__"] = main
        if mode == "-c":
            sys.argv, sys.path[0] = ["-c", *rest[1:]], ""
            exec(compile(rest[0], "<string>", "exec"), main.__dict__)
        elif mode == "-m":
            sys.argv, sys.path[0] = ["-m", *rest[1:]], os.getcwd()
            runpy._run_module_as_main(rest[0], alter_argv=True)  # what `python -m` itself calls
        else:
            sys.argv, sys.path[0] = [mode, *rest], os.path.dirname(os.path.realpath(mode))
            runpy.run_path(mode, run_name="__main__")


def reopen_stdio() -> None:
    """sys.stdin/stdout/stderr built anew on fds 0-2 as the interpreter builds them at start-up (create_stdio):
    whether a stream is seekable, a terminal (line buffering) or unbuffered is then the run's, not the server's."""
    buffered = not sys.__stdout__.write_through  # -u or PYTHONUNBUFFERED, as the server started
    for fd, name, old in ((0, "stdin", sys.__stdin__), (1, "stdout", sys.__stdout__), (2, "stderr", sys.__stderr__)):
        write = fd > 0
        buf = io.open(fd, "wb" if write else "rb", buffering=-1 if buffered or not write else 0, closefd=False)
        raw = buf.raw if hasattr(buf, "raw") else buf
        raw.name = f"<{name}>"
        stream = io.TextIOWrapper(buf, old.encoding, old.errors, "\n", line_buffering=buffered and write and (
            raw.isatty() or fd == 2), write_through=not buffered and write)
        stream.mode = "w" if write else "r"
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def exit_status(code: object) -> int:
    """The status the interpreter exits with for `SystemExit(code)` (a code not an int is printed, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def finish(status: int, interrupted: bool) -> NoReturn:
    """End the child as Py_FinalizeEx would, up to its module teardown: non-daemon threads joined, atexit callbacks
    (the script's, then those registered by the preloaded modules), garbage collected, stdout and stderr flushed
    (120 if stdout cannot be, as the interpreter does), an unhandled KeyboardInterrupt ending by SIGINT. The
    teardown of the modules (some 0.4 s of CPU per child, copying the server's pages) is skipped: nothing of
    the project's is written there, and what a teardown could print is tested on fresh interpreters."""
    threading._shutdown()
    atexit._run_exitfuncs()
    gc.collect()
    try:
        if sys.stdout is not None and not sys.stdout.closed:
            sys.stdout.flush()
    except Exception as exc:
        print(f"Exception ignored in: {sys.stdout!r}", file=sys.stderr)  # the interpreter's words and status
        traceback.print_exception(exc.with_traceback(None), file=sys.stderr)
        status = 120
    try:
        if sys.stderr is not None and not sys.stderr.closed:
            sys.stderr.flush()
    except Exception:
        status = 120
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def serve(listening: int, lifeline: int) -> Job:
    """Import PRELOAD, then fork a child per request on the socket `listening` until `lifeline` (a pipe the tests
    hold) closes. Returns only in a child, with its Job; the server itself exits when the tests are gone."""
    listener = socket.socket(fileno=listening)
    for name in PRELOAD:
        __import__(name)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fstat(1).st_size or os.fstat(2).st_size:  # a fresh run would print it too: forked ones must not hide it
        sys.exit("fork server: the preloaded imports printed the above; no child would show it")
    gc.collect()
    gc.freeze()  # the imports' objects out of the children's collections (and their pages not copied by them)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(lifeline, selectors.EVENT_READ, "lifeline")
    running: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, the client's connection)
    while True:
        for key, _ in sel.select():
            if key.data == "lifeline":
                sys.exit(0)
            if key.data == "accept":
                conn, _ = listener.accept()
                msg, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    for pidfd, (_, other) in running.items():
                        os.close(pidfd)
                        other.close()
                    sel.close()
                    listener.close()
                    conn.close()
                    os.close(lifeline)
                    return Job(json.loads(msg), fds)
                for fd in fds:
                    os.close(fd)
                conn.send(json.dumps({"pid": pid}).encode())
                pidfd = os.pidfd_open(pid)
                running[pidfd] = (pid, conn)
                sel.register(pidfd, selectors.EVENT_READ, "exit")
            else:  # a child ended: its wait status to the client that started it
                pidfd = key.fd
                pid, conn = running.pop(pidfd)
                sel.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                try:
                    conn.send(json.dumps({"status": status}).encode())
                except OSError:  # the client went away (a Popen dropped unwaited); nothing to tell
                    pass
                conn.close()


# ---------------------------------------------------------------------------------------------------- client side


class Server:
    """One fork server process, started on first use with the session's environment plus one start-up env."""

    def __init__(self, startup: tuple[tuple[str, str], ...]) -> None:
        self.dir = tempfile.mkdtemp(prefix="muomni-forkserver-")
        self.path = os.path.join(self.dir, "socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(self.path)
        listener.listen(64)  # here, so that a client connects at once (and is answered after the imports)
        env = {k: v for k, v in os.environ.items() if k not in dict(startup_env(os.environ))}
        env.update(startup)
        lifeline_r, self.lifeline = os.pipe()
        self.log = tempfile.TemporaryFile(dir=self.dir)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys, tests.forkserver as f; f.serve(*map(int, sys.argv[1:])).run()",
             str(listener.fileno()), str(lifeline_r)], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=self.log, pass_fds=[listener.fileno(), lifeline_r])
        os.close(lifeline_r)
        listener.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self) -> None:
        os.close(self.lifeline)
        self.proc.wait()
        self.log.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


_SERVERS: dict[tuple[tuple[str, str], ...], Server] = {}


@atexit.register
def _close_servers() -> None:
    for server in _SERVERS.values():
        server.close()
    _SERVERS.clear()


class ForkedPopen(subprocess.Popen):
    """A Popen whose child the fork server forks: the same object as Popen's for the caller (pid, pipes, wait,
    communicate, signals), the wait status read from the server, which is the child's parent."""

    def __init__(self, args: list, rlimits: dict[int, tuple[int, int]] | None = None, **kw: Any) -> None:
        self._conn: socket.socket | None = None
        self._rlimits = rlimits or {}
        super().__init__(args, **kw)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                       restore_signals, gid, gids, uid, umask, start_new_session, process_group) -> None:
        env = dict(os.environ if env is None else env)
        request = {"argv": [os.fsdecode(a) for a in args[1:]], "cwd": os.fsdecode(cwd) if cwd else os.getcwd(),
                   "env": {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()},
                   "new_session": bool(start_new_session), "rlimits": list(self._rlimits.items())}
        key = startup_env(request["env"])
        server = _SERVERS.get(key) or _SERVERS.setdefault(key, Server(key))
        fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1, errwrite if errwrite != -1 else 2]
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect(server.path)
            socket.send_fds(conn, [json.dumps(request).encode()], fds)
            reply = conn.recv(4096)
        except OSError:
            reply = b""
        if not reply:
            conn.close()
            raise RuntimeError(f"the fork server ended (status {server.proc.poll()}):\n{server.output()}")
        self.pid, self._conn, self._child_created = json.loads(reply)["pid"], conn, True
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        """(pid, wait status) once the server reports the child's end, else (0, 0) under WNOHANG."""
        self._conn.setblocking(not wait_flags & os.WNOHANG)
        try:
            reply = self._conn.recv(4096)
        except BlockingIOError:
            return 0, 0
        if not reply:
            raise RuntimeError("fork server ended before its child")
        self._conn.close()
        return self.pid, json.loads(reply)["status"]

    def _internal_poll(self, _deadstate: int | None = None, **_: Any) -> int | None:
        if self.returncode is None and self._conn is not None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None:
                    pid, status = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(status)
            except (OSError, RuntimeError):
                if _deadstate is not None:
                    self.returncode = _deadstate
            finally:
                self._waitpid_lock.release()
        return self.returncode


def forkable(args: list, fresh: bool, kw: dict[str, Any]) -> bool:
    """Whether `args` (a Popen command) runs in a fork server child (module docstring: when it does not)."""
    if fresh or not hasattr(os, "pidfd_open") or len(args) < 2 or os.fsdecode(args[0]) != sys.executable:
        return False
    if any(name in kw and kw[name] != default for name, default in UNSUPPORTED.items()):
        return False
    first = os.fsdecode(args[1])
    return first in ("-c", "-m") and len(args) >= 3 or not first.startswith("-")


def popen(args: list, *, fresh: bool = False, rlimits: dict[int, tuple[int, int]] | None = None,
          **kw: Any) -> subprocess.Popen:
    """subprocess.Popen(args, **kw), the child forked by the fork server where `forkable`; `rlimits`
    ({resource.RLIMIT_...: (soft, hard)}) are set in the child before the program runs."""
    if forkable(args, fresh, kw):
        return ForkedPopen(args, rlimits=rlimits, **kw)
    if rlimits:
        assert "preexec_fn" not in kw, "rlimits or preexec_fn, not both"
        kw["preexec_fn"] = lambda: [resource.setrlimit(which, limits) for which, limits in rlimits.items()]
    return subprocess.Popen(args, **kw)


def run(args: list, *, fresh: bool = False, rlimits: dict[int, tuple[int, int]] | None = None, input: str | bytes | None = None, capture_output: bool = False,
        timeout: float | None = None, check: bool = False, **kw: Any) -> subprocess.CompletedProcess:
    """subprocess.run(args, ...) with its process started by `popen` (the same arguments and outcome)."""
    if input is not None:
        kw["stdin"] = subprocess.PIPE
    if capture_output:
        kw["stdout"] = kw["stderr"] = subprocess.PIPE
    with popen(args, fresh=fresh, rlimits=rlimits, **kw) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            exc.stdout, exc.stderr = proc.communicate()
            raise
        except BaseException:
            proc.kill()
            raise
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, args, out, err)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
