"""The C decode step (utils/engine/native/step.c): built with the machine's C compiler on first use, loaded with ctypes.

Why: a Thinker decode step through torch is some 150 small ops whose dispatch (2-17 µs each) costs more than
their arithmetic at μOmni sizes; the C step does a whole step (or a whole prompt's prefill) in one call,
reading each weight once per call for all rows (see the C file for the numbers it computes), on
torch.get_num_threads() threads (what --threads sets: a session's pool of workers, started once; the same
numbers on any count; `native_model` reports the count). float32, int8 (quant.Int8Linear) and int4
(quant.Int4Linear, groups of 32) weights run here; the Talker, the reference decode mode, MoE blocks,
bfloat16/float16 weights and non-CPU devices stay on the torch path.

`native_model(model, kernel, reference, screen)` says which path a generation takes and why: decode_kernel
"auto" takes the C step where it applies, "c" requires it (OmniError naming the reason otherwise), "torch"
never takes it. The library is compiled once per source, compiler, flags and CPU into the cache directory
(`MUOMNI_CACHE_DIR`, else `$XDG_CACHE_HOME/muomni`, else `~/.cache/muomni`, else, without a usable home,
`$TMPDIR/muomni-UID`; written atomically, as decode_step-TOOLCHAIN-SOURCE.so), with `$CC` (default `cc`),
`-O3 -march=native -pthread` and then `$MUOMNI_CFLAGS`: about a second, bounded by `MUOMNI_COMPILE_TIMEOUT`
seconds (default 60). Writing a build removes that toolchain's builds of other versions of step.c (see
`remove_stale_builds`).

A library is loaded only if it is ours, as ssh treats keys (see `private_dir` and `_not_ours`): the
cache directory and every directory above it owned by us or root and not writable by others (a shared
sticky directory such as /tmp holds a private muomni-UID directory instead), the library a regular file of
ours that nobody else can write; anything else is refused with the reason. Each build ends with a trailer
holding the sha256 of the bytes before it (one file, so library and digest are replaced together); a library
whose digest disagrees (damaged, overwritten, not ours to trust) is rebuilt. Before any call the library must
not need a sanitizer runtime (which aborts a Python process that did not start with it), must export every
function declared here, and must report, through `mu_abi`, its ABI version and the layout of the structs it
shares with the ctypes declarations below; a library that fails these is rebuilt once, and if the fresh build
still fails it is not used. Without a compiler, if the build fails or the checks refuse it, the torch path
runs and the reason is reported (`--verbose`, `--json` timing `decode_kernel`; `--decode_kernel c` is an
error naming it). Settings that cannot be read (`MUOMNI_CFLAGS`, `MUOMNI_COMPILE_TIMEOUT`) are an OmniError
naming the variable wherever the C step is looked for (decode_kernel auto or c), as they are the user's error.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn

from models.layers import Block, GeluMLP, SwiGLU, weights_key
from models.thinker import ThinkerLM
from utils.base.defaults import DECODE_KERNELS
from utils.base.errors import OmniError
from utils.weights.quant import INT4_GROUP, GreedyHead, Int4Linear, Int8Linear

SOURCE = Path(__file__).with_name("step.c")
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-pthread")
COMPILE_TIMEOUT_S = 60.0  # seconds per compiler run unless MUOMNI_COMPILE_TIMEOUT says
REAP_TIMEOUT_S = 5.0  # after killing a compiler: how long its output pipes may stay open (a process that left
#                       its group keeps them; the group's own processes close them as they die)


class _Linear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("panels", ctypes.c_int32), ("format", ctypes.c_int32)]


FORMAT_PLAIN, FORMAT_INT4 = 0, 1  # mu_linear.format: float32 / int8 (told by scale), int4


class _Layer(ctypes.Structure):
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("eps1", ctypes.c_float),
                ("eps2", ctypes.c_float), ("qkv", _Linear), ("o", _Linear), ("up", _Linear), ("down", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in ("n_layers", "d", "heads", "kv_heads", "head_dim", "d_ff",
                                                     "vocab", "gelu", "rope_len", "screen_k")] + [
        ("layers", ctypes.POINTER(_Layer)), ("emb", ctypes.c_void_p), ("norm", ctypes.c_void_p),
        ("eps", ctypes.c_float), ("head", _Linear), ("screen", _Linear), ("screen_x", ctypes.c_float),
        ("screen_c", ctypes.c_float), ("screen_slack", ctypes.c_float), ("cos", ctypes.c_void_p),
        ("rot_sin", ctypes.c_void_p)]


class _Session(ctypes.Structure):
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("layer_stride", ctypes.c_int64),
                ("row_stride", ctypes.c_int64), ("head_stride", ctypes.c_int64), ("columns", ctypes.c_int32),
                ("rows", ctypes.c_int32), ("positions", ctypes.c_int32), ("threads", ctypes.c_int32),
                ("scratch", ctypes.c_void_p), ("pool", ctypes.c_void_p)]


ABI_VERSION = 4  # step.c's MU_ABI_VERSION: bump both when a struct above or an exported signature changes
SHARED_STRUCTS = (_Linear, _Layer, _Model, _Session)  # step.c's mu_linear, mu_layer, mu_model, mu_session
SIGNATURES = {  # every function step.c exports: (restype, argtypes)
    "mu_abi": (ctypes.c_int32, [ctypes.POINTER(ctypes.c_int32), ctypes.c_int32]),
    "mu_step": (ctypes.c_int, [ctypes.POINTER(_Model), ctypes.POINTER(_Session), ctypes.c_int32, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
    "mu_prefill": (ctypes.c_int, [ctypes.POINTER(_Model), ctypes.POINTER(_Session), ctypes.c_int32, ctypes.c_int32,
                                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]),
    "mu_scratch_bytes": (ctypes.c_size_t, [ctypes.POINTER(_Model), ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                                           ctypes.c_int32]),
    "mu_pool_new": (ctypes.c_void_p, [ctypes.c_int32]),
    "mu_pool_free": (None, [ctypes.c_void_p]),
    "mu_features": (ctypes.c_char_p, []),
    "mu_f32_panels": (ctypes.c_int, []),
    "mu_int8_tiles": (ctypes.c_int, []),
    "mu_int4_kernel": (ctypes.c_char_p, []),
}
# Symbols only a library built with a sanitizer that must be the process's first library imports (ASan, HWASan,
# TSan, MSan): loading it into Python aborts the process with one line of the runtime's, so it is refused first.
SANITIZER_INITS = (b"__asan_init", b"__hwasan_init", b"__tsan_init", b"__msan_init")
# A build's last bytes: TRAILER_TAG, then the sha256 (hex) of every byte before the tag. The dynamic loader
# reads an ELF file through its headers' offsets, so bytes after the sections are ignored.
TRAILER_TAG = b"\n#muomni-sha256 "
TRAILER_BYTES = len(TRAILER_TAG) + 64

# Build outputs in the cache directory: decode_step-TOOLCHAIN-SOURCE.so, TOOLCHAIN a hash of the compiler's
# version, the flags, the machine and the CPU's features, SOURCE a hash of step.c; being built: .build-*/
# directories. Earlier versions wrote native_decode-KEY.so.
BUILD_NAME = re.compile(r"decode_step-([0-9a-f]{12})-([0-9a-f]{12})\.so")
LEGACY_BUILD_NAME = re.compile(r"native_decode-[0-9a-f]{20}\.so")


def struct_layout() -> list[tuple[str, int]]:
    """(what, bytes) for what step.c's mu_abi reports: per shared struct its size, then each field's offset in
    declaration order, as the ctypes declarations above lay them out."""
    out = []
    for struct in SHARED_STRUCTS:
        out.append((f"sizeof {struct.__name__}", ctypes.sizeof(struct)))
        out += [(f"{struct.__name__}.{name}", getattr(struct, name).offset) for name, _ in struct._fields_]
    return out


def abi_mismatch(lib: ctypes.CDLL) -> str | None:
    """Why `lib` (its functions declared from SIGNATURES) cannot be used with the structs declared here (its ABI
    version or its struct layout differs), or None when it agrees."""
    want = struct_layout()
    got = (ctypes.c_int32 * (len(want) + 1))()  # one more: a longer list in the library shows there
    version = lib.mu_abi(got, len(got))
    if version != ABI_VERSION:
        return f"it speaks ABI {version}, step.py ABI {ABI_VERSION}"
    for (what, expected), have in zip([*want, ("the end of the layout", -1)], got):
        if have != expected:
            return f"{what} is {have} there, {expected} in step.py"
    return None


def _usable_home() -> str | None:
    """The home directory (HOME, else the passwd entry) if it is an absolute path to a directory, else None:
    without either expanduser hands back "~" itself, and a relative HOME would put the cache under the current
    directory (an empty one, which expanduser takes for "/", is no home either)."""
    home = os.environ.get("HOME")
    if home is None:
        home = os.path.expanduser("~")
    return home if os.path.isabs(home) and os.path.isdir(home) else None


def _shared_sticky(st: os.stat_result) -> bool:
    """A directory others may write to but not rename or remove our entries in (as /tmp, mode 1777)."""
    return stat.S_ISDIR(st.st_mode) and bool(st.st_mode & 0o022) and bool(st.st_mode & stat.S_ISVTX)


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring); in a shared sticky directory (/tmp-like, as a
    MUOMNI_CACHE_DIR or the temporary directory), a muomni-UID directory of ours inside it. Creates nothing."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    home = _usable_home()
    if os.environ.get("MUOMNI_CACHE_DIR"):
        base = Path(os.path.abspath(os.environ["MUOMNI_CACHE_DIR"]))
    elif os.path.isabs(xdg):  # the XDG spec: a relative XDG_CACHE_HOME is invalid and ignored
        base = Path(xdg) / "muomni"
    elif home is not None:
        base = Path(home) / ".cache" / "muomni"
    else:
        base = Path(tempfile.gettempdir()) / f"muomni-{os.geteuid()}"
    try:
        shared = _shared_sticky(os.stat(base))
    except OSError:  # not there yet: created private by `private_dir`
        shared = False
    return base / f"muomni-{os.geteuid()}" if shared else base


def _not_ours(path: Path, st: os.stat_result, what: str, root_too: bool = False) -> str | None:
    """Why `path` (stat `st`) cannot be trusted as `what` (as ssh judges a key's path: owned by this user, or by
    root with `root_too`, and writable by nobody else), or None."""
    uid = os.geteuid()
    if st.st_uid != uid and not (root_too and st.st_uid == 0):
        return f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"{what} {path} is writable by group or others (mode {stat.filemode(st.st_mode)})"
    return None


def _untrusted_above(dirs: list[Path], path: Path) -> str | None:
    """Why one of `dirs` (resolved directories above the cache directory `path`) could let someone else replace
    what is below it, or None: each must be owned by us or root and writable by nobody else, unless it is
    sticky (nobody else can rename or remove our entry there)."""
    for above in dirs:
        st = os.stat(above)
        if not _shared_sticky(st) or st.st_uid not in (0, os.geteuid()):
            why = _not_ours(above, st, "the directory", root_too=True)
            if why is not None:
                return f"{why}, above the cache directory {path}; set MUOMNI_CACHE_DIR to a private directory"
    return None


def private_dir(path: Path) -> Path | str:
    """`path` (cache_dir()) resolved, with any missing directories created 0700, if it and every directory above
    it can be trusted to hold code we load (see `_untrusted_above`; it itself ours and writable by nobody
    else); else why not. Nothing is created under a directory that is not trusted."""
    try:
        missing, have = [], path
        while not os.path.lexists(have):
            missing.append(have)
            have = have.parent
        have = Path(os.path.realpath(have))
        why = _untrusted_above([*reversed(have.parents), have], path) if missing else None
        if why is not None:
            return why
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another process made it first: judged below
                os.mkdir(d, 0o700)
        real = Path(os.path.realpath(path))  # judged and used from here on: a link swapped later is not followed
        why = _untrusted_above(list(reversed(real.parents)), path)
        if why is not None:
            return why
        st = os.stat(real)
    except OSError as exc:
        return f"cannot create the cache directory {path} ({exc.strerror or exc}; set MUOMNI_CACHE_DIR)"
    if not stat.S_ISDIR(st.st_mode):
        return f"the cache directory {path} is not a directory"
    why = _not_ours(real, st, "the cache directory")
    return real if why is None else f"{why}; set MUOMNI_CACHE_DIR to a private directory"


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so a cached -march=native build is not reused on another CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def compile_flags() -> list[str]:
    """CFLAGS, then `MUOMNI_CFLAGS` (e.g. "-march=x86-64-v2" to build for older CPUs than this one); an
    OmniError naming the variable if its value cannot be split as a shell would."""
    extra = os.environ.get("MUOMNI_CFLAGS", "")
    try:
        return [*CFLAGS, *shlex.split(extra)]
    except ValueError as exc:
        raise OmniError(f"MUOMNI_CFLAGS {extra!r}: {exc} (the flags are split as a shell would)") from None


def compile_timeout() -> float:
    """Seconds a compiler run may take: `MUOMNI_COMPILE_TIMEOUT`, else COMPILE_TIMEOUT_S; an OmniError naming
    the variable if it is not a number of seconds above 0."""
    text = os.environ.get("MUOMNI_COMPILE_TIMEOUT", "")
    if not text:
        return COMPILE_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise OmniError(f"MUOMNI_COMPILE_TIMEOUT {text!r}: use a number of seconds above 0")
    return seconds


def run_compiler(argv: list[str], what: str, cwd: str | None = None, env: dict[str, str] | None = None
                 ) -> tuple[int, str, str] | str:
    """(exit status, stdout, stderr) of the compiler command `argv`, its output decoded leniently (a compiler
    may print any bytes); or why it gave none, `what` naming the run. The compiler runs in a process group of
    its own, killed whole (its cc1, as, ld) when it exceeds compile_timeout() or when we are interrupted."""
    timeout = compile_timeout()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, start_new_session=True)
    except OSError as exc:
        return f"{what} does not run ({exc.strerror or exc})"
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:  # the timeout, or a signal's exception (Ctrl-C): nothing of it may outlive us
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=REAP_TIMEOUT_S)  # returns once the last of the group is gone
        proc.wait()
        if isinstance(exc, subprocess.TimeoutExpired):
            return f"{what} did not finish in {timeout:g} s (MUOMNI_COMPILE_TIMEOUT)"
        raise
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _digest(*parts: bytes) -> str:
    """12 hex digits naming `parts` in a build's file name (collisions are as unlikely as they need to be)."""
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


class Toolchain:
    """The compiler and flags a build uses, and the build's path in the cache directory."""

    def __init__(self, exe: str, version: str, flags: list[str]) -> None:
        self.exe, self.version, self.flags = exe, version, flags
        key = _digest(version.encode(), " ".join(flags).encode(), platform.machine().encode(), _cpu_flags().encode())
        self.target = cache_dir() / f"decode_step-{key}-{_digest(SOURCE.read_bytes())}.so"


def toolchain() -> Toolchain | str:
    """The toolchain `$CC` (default `cc`) gives with compile_flags(), or why there is none."""
    cc = os.environ.get("CC", "cc")
    flags = compile_flags()
    exe = shutil.which(cc)
    if exe is None:
        return f"no C compiler ({cc!r} not found; set CC or install gcc)"
    done = run_compiler([exe, "--version"], f"the C compiler {cc!r}")
    if isinstance(done, str):
        return done
    return Toolchain(exe, done[1], flags)


def remove_stale_builds(kept: Path) -> None:
    """After `kept` was written: remove the builds of other versions of step.c for the same toolchain (names
    decode_step-TOOLCHAIN-OTHER.so, TOOLCHAIN as in `kept`) and every build of the earlier naming
    (native_decode-KEY.so). Nothing else is touched: builds for other compilers, flags or CPUs stay (another
    environment sharing the directory uses them), and so does every file not named by these patterns. A
    checkout with another step.c that shares the directory rebuilds its own on its next start (a second or so)."""
    mine = BUILD_NAME.fullmatch(kept.name)
    for path in kept.parent.iterdir():
        other = BUILD_NAME.fullmatch(path.name)
        if (other and other[1] == mine[1] and other[2] != mine[2]) or LEGACY_BUILD_NAME.fullmatch(path.name):
            with contextlib.suppress(FileNotFoundError):  # another process removed it first
                path.unlink()


def compile_library(tools: Toolchain, out: str) -> str | None:
    """Compile step.c into `out`, in `out`'s directory (a private one, also the compiler's TMPDIR, so its
    temporary files go where the caller removes them); None, or why it failed."""
    where = os.path.dirname(out)
    done = run_compiler([tools.exe, *tools.flags, "-o", out, str(SOURCE), "-lm"],
                        f"the C compiler on {SOURCE.name}", cwd=where, env={**os.environ, "TMPDIR": where})
    if isinstance(done, str):
        return done
    if done[0] != 0:
        first = (done[2].strip().splitlines() or ["no message"])[0]
        return f"the C compiler failed on {SOURCE.name}: {first}"
    if not os.path.isfile(out):
        return f"the C compiler exited 0 on {SOURCE.name} but wrote no library"
    return None


def _load(path: Path, data: bytes, what: str) -> tuple[ctypes.CDLL | None, str | None]:
    """(the library at `path`, whose bytes are `data`, with its functions declared, if it can be called with the
    declarations here, else None; why not, naming it `what`)."""
    runtime = next((name.decode() for name in SANITIZER_INITS if name in data), None)
    if runtime is not None:
        return None, (f"{what} needs a sanitizer's runtime ({runtime}), which cannot be loaded into Python: "
                      f"build without -fsanitize (MUOMNI_CFLAGS, CC)")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"cannot load {what} ({exc})"
    missing = [name for name in SIGNATURES if not hasattr(lib, name)]
    if missing:
        return None, f"{what} does not match step.py: it has no {', '.join(missing)} (not a build of this step.c)"
    for name, (restype, argtypes) in SIGNATURES.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    why = abi_mismatch(lib)
    return (lib, None) if why is None else (None, f"{what} does not match step.py: {why}")


def _open_cached(target: Path) -> tuple[ctypes.CDLL | None, str | None, bool]:
    """(the cached build at `target` if it passes every check, else None; why not; whether a rebuild may replace
    it: yes for a missing, damaged or foreign file of ours, no for a file we cannot trust to be ours)."""
    what = f"the compiled kernel {target}"
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None, None, True
    except OSError as exc:
        return None, f"cannot read {what} ({exc.strerror or exc})", False
    if not stat.S_ISREG(st.st_mode):
        return None, f"{what} is not a regular file; remove it", False
    why = _not_ours(target, st, "the compiled kernel")
    if why is not None:
        return None, f"{why}; remove it", False
    try:
        data = target.read_bytes()
    except OSError as exc:
        return None, f"cannot read {what} ({exc.strerror or exc})", False
    body, tail = data[:-TRAILER_BYTES], data[-TRAILER_BYTES:]
    if tail != TRAILER_TAG + hashlib.sha256(body).hexdigest().encode():
        return None, f"{what} does not hold its digest (damaged, or not written by step.py)", True
    lib, why = _load(target, body, what)
    return lib, why, True


def _build(tools: Toolchain, target: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """Compile in a private temporary directory of the cache directory (removed whatever happens), load and check
    the library there under its temporary name (dlopen would hand back an older library already loaded under the
    target's name), then move it, its digest appended, into place and remove the stale builds. A library that
    fails the checks is not kept."""
    try:
        work = tempfile.mkdtemp(prefix=".build-", dir=target.parent)
    except OSError as exc:
        return None, (f"cannot write the compiled kernel to {target.parent} ({exc.strerror or exc}; "
                      f"set MUOMNI_CACHE_DIR)")
    try:
        built = os.path.join(work, "step.so")
        why = compile_library(tools, built)
        if why is not None:
            return None, why
        data = Path(built).read_bytes()
        lib, why = _load(Path(built), data, f"a fresh build of {SOURCE.name}")
        if lib is None:
            return None, why
        final = os.path.join(work, target.name)
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
        with open(fd, "wb") as f:
            f.write(data + TRAILER_TAG + hashlib.sha256(data).hexdigest().encode())
        os.chmod(final, 0o755)  # whatever the umask: a library others may write is refused when it is next loaded
        os.replace(final, target)
    except OSError as exc:
        return None, f"cannot write the compiled kernel {target} ({exc.strerror or exc})"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    remove_stale_builds(target)
    return lib, None


def load_library() -> tuple[ctypes.CDLL | None, str]:
    """`library()` without the per-process cache: the cached build if it passes the checks, else one (re)build;
    (None, why) if that fails too, or if the cache directory or the cached file cannot be trusted."""
    tools = toolchain()
    if isinstance(tools, str):
        return None, tools
    where = private_dir(tools.target.parent)
    if isinstance(where, str):
        return None, where
    target = where / tools.target.name
    lib, why, rebuild = _open_cached(target)
    if lib is None:
        if not rebuild:
            return None, why
        lib, why = _build(tools, target)  # not built yet, or unusable (damaged, foreign, another ABI): once
        if lib is None:
            return None, why
    compiler = (tools.version.splitlines() or [tools.exe])[0]
    return lib, f"c ({lib.mu_features().decode(errors='replace')}, {compiler})"


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded C step, "c (FEATURES, COMPILER)"), or (None, why not). Built at most once per process."""
    return load_library()


class Unsupported(Exception):
    """The model (or these options) cannot take the C step; the message says why."""


def _f32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise Unsupported(f"{what} is {t.dtype} on {t.device.type} (the C step takes float32 on the CPU)")
    return t.detach().contiguous()


def to_panels(w: torch.Tensor) -> torch.Tensor:
    """A float32 weight (n, k) as ceil(n / 64) panels (k, 64): row 64 p + l of `w` in column l of panel p, zero
    rows past n (the layout of the C file's linear_panels)."""
    n, k = w.shape
    padded = torch.zeros(-(-n // 64) * 64, k, dtype=w.dtype)
    padded[:n] = w
    return padded.view(-1, 64, k).transpose(1, 2).contiguous()


def to_int8_tiles(w: torch.Tensor, rows: int) -> torch.Tensor:
    """uint8 weights (n, k) as ceil(n / rows) tiles of `rows` rows, each k / 16 groups of (rows, 16) bytes, zero
    rows past n (the layout of the C file's linear_u8_avx2: one sequential stream a tile)."""
    n, k = w.shape
    padded = torch.zeros(-(-n // rows) * rows, k, dtype=w.dtype)
    padded[:n] = w
    return padded.view(-1, rows, k // 16, 16).transpose(1, 2).contiguous()


def to_int4_tiles(codes: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """int4 codes (n, k / 2) in quant.pack_nibbles' layout and their (scale, zero) pairs (k / 32, n, 2) bfloat16
    as the C file's int4 tiles: ceil(n / 8) tiles of 8 rows (zero rows past n), each k / 32 groups of 160 bytes
    (the 16 bytes of rows 0, 4, 1, 5, 2, 6, 3, 7, then the 8 rows' pairs): one sequential stream a tile, the same
    5 bits a weight."""
    n, half = codes.shape
    groups = half * 2 // INT4_GROUP
    rows = -(-n // 8) * 8
    padded = torch.zeros(rows, groups, INT4_GROUP // 2, dtype=torch.uint8)
    padded[:n] = codes.view(n, groups, INT4_GROUP // 2)
    parts = padded.view(-1, 2, 4, groups, INT4_GROUP // 2).permute(0, 3, 2, 1, 4).reshape(-1, groups, 128)
    pairs = torch.zeros(rows, groups, 4, dtype=torch.uint8)
    pairs[:n] = scale_zero.to(torch.bfloat16).contiguous().view(torch.uint8).view(groups, n, 4).transpose(0, 1)
    return torch.cat([parts, pairs.view(-1, 8, groups, 4).transpose(1, 2).reshape(-1, groups, 32)], 2).contiguous()


def int8_layout(lib: ctypes.CDLL, flipped: torch.Tensor) -> tuple[torch.Tensor, int]:
    """int8 weights with their sign bit flipped (uint8, (n, k)) as the library takes them: (weights, panels), in
    tiles (panels 1) where it has the tile kernel and k is a multiple of 16, else as rows (0)."""
    rows = lib.mu_int8_tiles()
    if rows and flipped.shape[1] % 16 == 0:
        return to_int8_tiles(flipped, rows), 1
    return flipped, 0


class NativeView:
    """A NativeModel with one greedy screen (or none): the C struct a session passes to the step."""

    def __init__(self, native: "NativeModel", struct: _Model, keep: list[torch.Tensor]) -> None:
        self.lib, self.vocab, self.struct, self.keep = native.lib, native.vocab, struct, keep
        self.native = native  # what the struct's weight pointers point into
        self.ref = ctypes.byref(struct)


class NativeModel:
    """A Thinker's weights laid out for the C step (fused q/k/v and gate/up copies, float32 weights in panels,
    int8 weights with their sign bit flipped, in tiles where the library has that kernel, int4 codes with their
    (scale, zero) pairs in tiles of 8 rows) and the C struct pointing at them. Holds every tensor the struct points to;
    `view(screen)` adds a greedy screen (the int8 copy of the head) without redoing the rest. `int4` says whether
    any weights are int4."""

    def __init__(self, lib: ctypes.CDLL, model: ThinkerLM) -> None:
        self.lib, self.keep, self.int4 = lib, [], False
        blocks = list(model.blocks)
        if not blocks:
            raise Unsupported("a thinker without blocks")
        first = blocks[0].attn
        h, g, dk = first.n_heads, first.n_kv_heads, first.head_dim
        if dk % 2 or h % g:
            raise Unsupported(f"{h} heads over {g} KV heads of {dk}")
        layers = (_Layer * len(blocks))()
        gelu = isinstance(getattr(blocks[0], "mlp", None), GeluMLP)
        for i, block in enumerate(blocks):
            layers[i] = self._layer(block, i, gelu, (h, g, dk))
        emb = _f32(model.tok_emb.weight, "the token embedding")
        d, vocab = emb.shape[1], emb.shape[0]
        ffn = blocks[0].mlp
        d_ff = ffn.down_proj.in_features if isinstance(ffn, SwiGLU) else ffn.fc2.in_features
        rot = model.rotary
        cos, rot_sin = _f32(rot.cos, "the rotary table"), _f32(rot.rot_sin, "the rotary table")
        self.keep += [layers, emb, cos, rot_sin]
        self.struct = _Model(n_layers=len(blocks), d=d, heads=h, kv_heads=g, head_dim=dk, d_ff=d_ff, vocab=vocab,
                             gelu=int(gelu), rope_len=cos.shape[0], screen_k=0,
                             layers=layers, emb=emb.data_ptr(), norm=self._norm(model.norm, "final norm"),
                             eps=model.norm.eps, head=self._linear([model.lm_head], "lm_head"),
                             cos=cos.data_ptr(), rot_sin=rot_sin.data_ptr())
        self.vocab = vocab
        self.views: "weakref.WeakKeyDictionary[GreedyHead, NativeView]" = weakref.WeakKeyDictionary()
        self.plain = NativeView(self, self.struct, [])

    def view(self, screen: GreedyHead | None) -> NativeView:
        """The struct with `screen` (a float32 head's int8 screen; ignored for an int8 or int4 head), built once
        per screen."""
        head = self.struct.head
        if screen is None or head.scale is not None or head.format != FORMAT_PLAIN:
            return self.plain
        hit = self.views.get(screen)
        if hit is None:
            n, k = screen.qweight.shape
            flipped, panels = int8_layout(self.lib, (screen.qweight.view(torch.uint8) ^ 128).contiguous())
            scale = screen.scale.float().contiguous()
            struct = _Model.from_buffer_copy(self.struct)
            struct.screen = _Linear(flipped.data_ptr(), scale.data_ptr(), None, n, k, panels)
            struct.screen_k = screen.k
            struct.screen_x = screen.err_max + screen.fp_term
            struct.screen_c = screen.half_n1_max
            struct.screen_slack = GreedyHead.SLACK
            hit = self.views[screen] = NativeView(self, struct, [flipped, scale])
        return hit

    def _norm(self, norm: nn.Module, what: str) -> int:
        w = _f32(norm.weight, what)
        self.keep.append(w)
        return w.data_ptr()

    def _linear(self, mods: list[nn.Module], what: str) -> _Linear:
        """One C linear computing the modules' outputs side by side (all float32 nn.Linear, all Int8Linear or
        all Int4Linear)."""
        panels, fmt = 0, FORMAT_PLAIN
        if all(type(m) is nn.Linear for m in mods):
            w = torch.cat([_f32(m.weight, what) for m in mods]) if len(mods) > 1 else _f32(mods[0].weight, what)
            scale = None
            if self.lib.mu_f32_panels():
                w, panels = to_panels(w), 1
        elif all(type(m) is Int8Linear for m in mods):
            flipped = (torch.cat([m.qweight for m in mods]).view(torch.uint8) ^ 128).contiguous()
            w, panels = int8_layout(self.lib, flipped)
            scale = torch.cat([m.scale for m in mods]).float().contiguous()
        elif all(type(m) is Int4Linear for m in mods):
            if any(m.group != INT4_GROUP for m in mods):
                raise Unsupported(f"{what}: int4 groups of {mods[0].group} (the C step takes {INT4_GROUP})")
            w = to_int4_tiles(torch.cat([m.codes for m in mods]), torch.cat([m.scale_zero for m in mods], dim=1))
            scale, fmt, self.int4 = None, FORMAT_INT4, True
        else:
            kinds = ", ".join(sorted({type(m).__name__ for m in mods}))
            raise Unsupported(f"{what} is {kinds} (the C step takes float32, int8 or int4 weights)")
        biases = [m.bias for m in mods]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise Unsupported(f"{what}: bias on some parts only")
        bias = None if biases[0] is None else torch.cat([_f32(b, what) for b in biases]).contiguous()
        self.keep += [t for t in (w, scale, bias) if t is not None]
        n, k = sum(m.out_features for m in mods), mods[0].in_features
        return _Linear(w.data_ptr(), None if scale is None else scale.data_ptr(),
                       None if bias is None else bias.data_ptr(), n, k, panels, fmt)

    def _layer(self, block: Block, i: int, gelu: bool, heads: tuple[int, int, int]) -> _Layer:
        attn, ffn = block.attn, getattr(block, "mlp", None)
        if ffn is None:
            raise Unsupported("mixture-of-experts blocks")
        if (attn.n_heads, attn.n_kv_heads, attn.head_dim) != heads or isinstance(ffn, GeluMLP) != gelu:
            raise Unsupported("blocks of different shapes")
        where = f"block {i}"
        qkv = [attn.qkv] if attn.fused_qkv else [attn.q, attn.k, attn.v]
        up = [ffn.fc1] if gelu else [ffn.gate_proj, ffn.up_proj]
        down = ffn.fc2 if gelu else ffn.down_proj
        return _Layer(norm1=self._norm(block.norm1, where), norm2=self._norm(block.norm2, where),
                      eps1=block.norm1.eps, eps2=block.norm2.eps, qkv=self._linear(qkv, where),
                      o=self._linear([attn.o], where), up=self._linear(up, where), down=self._linear([down], where))


class NativeSession:
    """The C step bound to one KV cache (models.layers.KVCache) and a scratch buffer for up to `positions`
    positions per call (a prefill's length; at least the cache's rows), computing on `threads` threads (default
    torch.get_num_threads(), what --threads sets): the caller and a pool of threads - 1 workers started here and
    kept until the session is freed. All allocated once; `prefill` and `step` allocate nothing. The numbers do
    not depend on `threads`."""

    def __init__(self, native: NativeView, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: int = 1,
                 threads: int | None = None) -> None:
        if cache_k.dtype != torch.float32 or cache_k.stride() != cache_v.stride() or cache_k.stride(-1) != 1 \
                or cache_k.stride(-2) != cache_k.shape[-1]:
            raise Unsupported("the KV cache layout")
        threads = torch.get_num_threads() if threads is None else threads
        if threads < 1:
            raise ValueError(f"threads {threads}: the C step runs on at least one")
        self.native = native
        rows, columns = cache_k.shape[1], cache_k.shape[3]
        positions = max(rows, positions)
        self.struct = _Session(k=cache_k.data_ptr(), v=cache_v.data_ptr(), layer_stride=cache_k.stride(0),
                               row_stride=cache_k.stride(1), head_stride=cache_k.stride(2), columns=columns,
                               rows=rows, positions=positions, threads=threads)
        self.scratch = torch.empty(native.lib.mu_scratch_bytes(native.ref, rows, positions, columns, threads),
                                   dtype=torch.uint8)
        self.struct.scratch = self.scratch.data_ptr()
        if threads > 1:
            pool = native.lib.mu_pool_new(threads)
            if not pool:
                raise OmniError(f"the C step cannot start {threads - 1} worker threads (--threads {threads})")
            self.struct.pool = pool
            weakref.finalize(self, native.lib.mu_pool_free, pool)  # joins the workers
        self.threads = threads
        self.keep = (cache_k, cache_v)
        self.ref = ctypes.byref(self.struct)
        self.ids = torch.zeros(rows, dtype=torch.long)
        self.logits = torch.empty(rows, native.vocab)
        # what a call of r rows returns, viewed once here: a view costs microseconds, a small model's step ~100
        self.id_views = [self.ids[:r] for r in range(rows + 1)]
        self.logit_views = [self.logits[:r] for r in range(rows + 1)]
        self.id_ptr, self.logit_ptr = self.ids.data_ptr(), self.logits.data_ptr()
        self.c_step, self.model_ref = native.lib.mu_step, native.ref

    def _out(self, rows: int, greedy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.id_views[rows], None if greedy else self.logit_views[rows]

    def prefill(self, embeds: torch.Tensor, row: int, first: int, greedy: bool) -> torch.Tensor:
        """Run the prompt `embeds` (n, d) into cache row `row` at columns first..first+n-1. Returns the last
        position's greedy id (1,) with `greedy`, else its logits (1, V): views the next call overwrites."""
        if embeds.dtype != torch.float32 or not embeds.is_contiguous():
            embeds = embeds.to(torch.float32).contiguous()
        ids, logits = self._out(1, greedy)
        rc = self.native.lib.mu_prefill(self.native.ref, self.ref, row, embeds.shape[0], embeds.data_ptr(), first,
                                        None if logits is None else logits.data_ptr(), ids.data_ptr())
        if rc:
            raise ValueError(f"a prompt of {embeds.shape[0]} positions at column {first} of row {row} does not fit "
                             f"the cache or the session")
        return ids if greedy else logits

    def step(self, tokens: torch.Tensor, pos: int, first: torch.Tensor | None, greedy: bool) -> torch.Tensor:
        """Feed `tokens` (B,) at cache column `pos` (row b's sequence starts at column first[b], a contiguous
        int64 tensor of at least B entries; None: 0). Returns the greedy ids (B,) with `greedy`, else the logits
        (B, V): views of buffers the next step overwrites."""
        rows = tokens.shape[0]
        if tokens.dtype != torch.long or not tokens.is_contiguous():
            tokens = tokens.to(torch.long).contiguous()
        if first is not None and (first.dtype != torch.long or not first.is_contiguous() or first.shape[0] < rows):
            raise ValueError(f"first: a contiguous int64 tensor of at least {rows} entries")
        rc = self.c_step(self.model_ref, self.ref, rows, tokens.data_ptr(), pos,
                         None if first is None else first.data_ptr(), None if greedy else self.logit_ptr,
                         self.id_ptr)
        if rc:
            raise ValueError("token id outside the vocabulary" if rc == -1 else
                             f"cache column {pos} outside the cache (or before a row's first column)")
        return self.id_views[rows] if greedy else self.logit_views[rows]


_MODELS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, NativeModel]]" = weakref.WeakKeyDictionary()


def native_model(model: nn.Module, kernel: str, reference: bool, screen: GreedyHead | None
                 ) -> tuple[NativeView | None, str]:
    """(the C step's view of `model` with `screen`, "c (FEATURES[, int4 KERNEL], N threads, COMPILER)"), or
    (None, "torch (why)") — the decode path a generation with decode_kernel `kernel` takes (on
    torch.get_num_threads() threads; KERNEL: the int4 weights' kernel, where the model has any). `kernel` "c"
    raises OmniError instead of falling back. The weights are laid out once per weight version."""
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel {kernel!r}: use one of {', '.join(DECODE_KERNELS)}")
    if kernel == "torch":
        return None, "torch (asked for)"
    reason = None
    if reference:
        reason = "the reference decode mode"
    elif not isinstance(model, ThinkerLM):
        reason = f"a {type(model).__name__}"
    elif model.tok_emb.weight.device.type != "cpu":
        reason = f"device {model.tok_emb.weight.device.type}"
    lib, detail = library() if reason is None else (None, reason)
    if lib is None:
        reason = detail
    else:
        key = weights_key([model])
        hit = _MODELS.get(model)
        native = hit[1] if hit is not None and hit[0] == key else None
        if native is None:
            try:
                native = NativeModel(lib, model)
            except Unsupported as exc:
                reason = str(exc)
            else:
                _MODELS[model] = (key, native)
        if native is not None:
            threads = torch.get_num_threads()  # what a NativeSession made now computes on
            features, compiler = detail.split(", ", 1)  # library()'s "c (FEATURES, COMPILER)"
            if native.int4:  # the kernel the int4 weights take
                features += f", int4 {lib.mu_int4_kernel().decode()}"
            return native.view(screen), f"{features}, {threads} thread{'s' if threads > 1 else ''}, {compiler}"
    if kernel == "c":
        raise OmniError(f"--decode_kernel c: the C decode step cannot run here: {reason}")
    return None, f"torch ({reason})"
