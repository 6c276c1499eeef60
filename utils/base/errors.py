"""The one exception type for bad input (the CLI prints it as a single `error:` line and exits 1), how such a
line is kept to one line, and how the apps turn SIGINT/SIGTERM into exceptions so every cleanup runs."""
from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Any, NoReturn


class OmniError(Exception):
    """A problem with the user's files, flags or data, phrased so the user can fix it."""


class QueueFull(Exception):
    """More requests are waiting for a decode row than the engine's `max_queue` allows (the server: 429)."""


class EngineClosed(Exception):
    """The engine is shutting down and admits nothing new (the server: 503)."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread like KeyboardInterrupt is for SIGINT, so `finally` blocks
    remove temp files; the app exits with `status` (128 + the signal number) and no traceback."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.status = 128 + signum


def interrupt_status(exc: BaseException) -> int:
    """The exit status for an interruption: 130 for SIGINT (KeyboardInterrupt), 128 + N for Terminated."""
    return exc.status if isinstance(exc, Terminated) else 128 + signal.SIGINT


def handle_signals() -> None:
    """Install the apps' signal policy for the whole process (the scripts call it before main; a library or a
    test calling main() in-process keeps its own handlers):
    - SIGTERM/SIGHUP raise Terminated once (a second one during cleanup is ignored, so cleanup finishes);
    - SIGXFSZ is ignored, so a write over the file-size limit (ulimit -f) fails with EFBIG and is reported as an
      error instead of killing the process mid-write;
    - SIGPIPE keeps Python's default (BrokenPipeError), which the apps treat as "the reader went away"."""
    def raise_terminated(signum: int, frame: Any) -> None:
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(s) != signal.SIG_IGN:  # nohup'd runs keep ignoring SIGHUP
            signal.signal(s, raise_terminated)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def run_script(module: str) -> NoReturn:
    """Run script `module` (its own file, imported by name) and exit with its main()'s status under the apps'
    signal policy, so the policy holds from the script's first line to its last. A script calls this first, in
    its `if __name__ == "__main__":` block above its imports; the file then runs again as the module `module`,
    with every import and definition in it under the policy (Python's defaults printed a traceback for a SIGINT
    during `import torch`, and SIGTERM killed the process by the signal). An interruption `main` did not handle
    is a quiet 130 / 128 + N. Once the outcome is decided, SIGINT/SIGTERM/SIGHUP are ignored: a finished run exits
    with its status, and the interpreter's shutdown (atexit callbacks, where a KeyboardInterrupt printed
    "Exception ignored" and a traceback after a finished export, which then exited 0) is not interrupted. The
    outer `try` catches an interruption that lands in the inner handlers' first instructions."""
    def settle() -> None:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)

    status = 1
    try:
        try:
            handle_signals()
            status = importlib.import_module(module).main()
        except (KeyboardInterrupt, Terminated) as exc:
            settle()
            status = interrupt_status(exc)
            print("interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc), file=sys.stderr)
        finally:
            settle()
    except (KeyboardInterrupt, Terminated) as exc:  # between main's return and settle(): nothing is left to do
        settle()
        status = interrupt_status(exc)
    sys.exit(status)


def quiet_stdout() -> None:
    """After BrokenPipeError on stdout: point fd 1 at /dev/null so the interpreter's final flush is silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """`text` safe to print as one message line: control characters (a newline in a file name could forge a
    second `error:` line) and undecodable file-name bytes (lone surrogates) shown as escapes."""
    out = []
    for ch in str(text):
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0 or code in (0x2028, 0x2029):
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        elif 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's surrogateescape: the raw byte of a non-UTF-8 name
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)
