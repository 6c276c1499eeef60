"""The C step's cache and compiler under faults and hostile neighbours (utils/engine/native/step.py), through the
real CLI: a library is loaded only if it is ours (planted ones never run, group/other-writable ones are refused),
a damaged one is rebuilt, one without the expected functions or needing a sanitizer runtime is refused with the
reason, the compiler is bounded and cleaned up after (timeout, Ctrl-C), its output read whatever its bytes,
unreadable settings are an `error:` naming the variable, and a missing home never puts the cache under the
current directory."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests import forkserver
from tests.conftest import DEMO, REPO, c_step_missing, run_cli

pytestmark = pytest.mark.skipif(c_step_missing() is not None, reason=f"no C decode step: {c_step_missing()}")

ASK = ("--ckpt_dir", str(DEMO), "--text", "What is 3 plus 4?", "--json")
OTHER_UID = 12345  # a user that is not us
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MUOMNI_CACHE_DIR for this test (not yet created), the compiler settings cleared."""
    for name in ("CC", "MUOMNI_CFLAGS", "MUOMNI_COMPILE_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "cache"
    monkeypatch.setenv("MUOMNI_CACHE_DIR", str(path))
    return path


def kernel(*extra: str) -> str:
    """The decode_kernel an answer of the demo model reports; the answer must be right and the exit clean."""
    done = run_cli(*ASK, *extra)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["text"] == "7"
    return out["timing"]["decode_kernel"]


def refused(*extra: str) -> str:
    """The one `error:` line of `--decode_kernel c`, which must exit 1 and print no answer."""
    done = run_cli(*ASK, "--decode_kernel", "c", *extra)
    assert done.returncode == 1 and done.stdout == "", done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "unexpected" not in last
    return last


def shell_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def real_cc() -> str:
    return shutil.which("cc")


def builds(where: Path) -> list[Path]:
    return sorted(where.glob("decode_step-*.so"))


def planted_library(tmp_path: Path, marker: Path) -> bytes:
    """A library whose constructor writes `marker`: whatever loads it runs that code."""
    src = tmp_path / "planted.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void ran(void) {\n'
                   f'    FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n}}\n')
    out = tmp_path / "planted.so"
    subprocess.run([real_cc(), "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out.read_bytes()


def plant(path: Path, data: bytes, owner: int = OTHER_UID) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o755)
    os.chown(path, owner, owner)


def target_name() -> str:
    """The file name the build takes for the current settings (the name an attacker would plant)."""
    code = "from utils.engine.native.step import toolchain; print(toolchain().target.name)"
    return forkserver.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=REPO).stdout.strip()


# ---------------------------------------------------------------- only our libraries are loaded

@as_root
@pytest.mark.parametrize("case", ["shared", "shared-owned-by-other", "private-dir-planted"])
def test_a_library_planted_in_a_shared_cache_never_runs(cache: Path, tmp_path: Path, case: str) -> None:
    """MUOMNI_CACHE_DIR a 1777 directory (as /tmp) where another user planted a library with the build's name:
    its code never runs. Owned by root (or us) the directory holds our own private muomni-UID directory, where
    the step is built and used; owned by the other user (who may then remove or rename anything in it), or with
    a muomni-UID directory the other user made first, it is refused and the torch step says why."""
    marker = tmp_path / "planted-code-ran"
    data = planted_library(tmp_path, marker)
    cache.mkdir()
    cache.chmod(0o1777)
    name = target_name()
    plant(cache / name, data)
    private = cache / f"muomni-{os.geteuid()}"
    if case == "shared-owned-by-other":
        os.chown(cache, OTHER_UID, OTHER_UID)
    elif case == "private-dir-planted":
        plant(private / name, data)
        os.chown(private, OTHER_UID, OTHER_UID)
    got = kernel()
    assert not marker.exists()
    if case == "shared":
        assert got.startswith("c (") and [p.name for p in builds(private)] == [name]
        assert (private.stat().st_mode & 0o777) == 0o700
    else:
        where = cache if case == "shared-owned-by-other" else private
        assert got.startswith("torch (") and f"{where} is owned by uid {OTHER_UID}" in got
        assert f"is owned by uid {OTHER_UID}" in refused()
    assert not marker.exists()


@pytest.mark.parametrize("what", ["library", "directory"])
def test_a_library_or_cache_others_can_write_is_refused(cache: Path, what: str) -> None:
    """A cached library writable by its group (anyone in it could have changed its code), or a cache directory
    writable by others and not sticky: refused with the reason (the torch step; an error under
    --decode_kernel c), never loaded."""
    assert kernel().startswith("c (")
    [lib] = builds(cache)
    if what == "library":
        lib.chmod(0o775)
    else:
        cache.chmod(0o777)
    got = kernel()
    assert got.startswith("torch (") and "is writable by group or others" in got
    assert str(lib if what == "library" else cache) in got
    assert "is writable by group or others" in refused()


@as_root
def test_a_library_owned_by_another_user_is_refused(cache: Path) -> None:
    assert kernel().startswith("c (")
    [lib] = builds(cache)
    os.chown(lib, OTHER_UID, OTHER_UID)
    got = kernel()
    assert got.startswith("torch (") and f"{lib} is owned by uid {OTHER_UID}" in got


def text_section(data: bytes) -> tuple[int, int]:
    """(offset, size) of an ELF64 little-endian file's .text section."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, = struct.unpack_from("<I", data, shoff + i * shentsize)
        offset, size = struct.unpack_from("<QQ", data, shoff + i * shentsize + 0x18)
        return name, offset, size
    names = section(shstrndx)[1]
    for i in range(shnum):
        name, offset, size = section(i)
        if data[names + name:].startswith(b".text\0"):
            return offset, size
    raise AssertionError("no .text section")


@pytest.mark.skipif(sys.byteorder != "little", reason="reads an ELF64 little-endian library")
def test_an_overwritten_library_is_rebuilt(cache: Path) -> None:
    """The cached library's code overwritten in place (here with ud2 instructions, which once killed the process
    with SIGILL): its digest disagrees, so it is rebuilt and the rebuild is used."""
    assert kernel().startswith("c (")
    [lib] = builds(cache)
    good = lib.read_bytes()
    if good[:5] != b"\x7fELF\x02":
        pytest.skip("not an ELF64 library")
    offset, size = text_section(good)
    with open(lib, "r+b") as f:
        f.seek(offset)
        f.write(b"\x0f\x0b" * (size // 2))
    assert kernel().startswith("c (")
    assert lib.read_bytes() == good  # rebuilt: the same bytes as the first build


def test_a_library_without_mu_step_is_refused_with_the_reason(cache: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that agrees on the ABI but lacks mu_step (a compiler that renames it): the torch step says which
    functions are missing, --decode_kernel c is an error saying so, and nothing is kept."""
    cc = shell_script(tmp_path / "cc", f'exec {real_cc()} -Dmu_step=mu_step_elsewhere "$@"\n')
    monkeypatch.setenv("CC", str(cc))
    got = kernel()
    assert got == ("torch (a fresh build of step.c does not match step.py: it has no mu_step "
                   "(not a build of this step.c))")
    assert refused().endswith("it has no mu_step (not a build of this step.c)")
    assert builds(cache) == []


# ---------------------------------------------------------------- the compiler

def sleeping_cc(tmp_path: Path, ready: str = "") -> tuple[Path, Path]:
    """A compiler that answers --version, then (after `ready`, a shell command) waits forever in a child
    process of its own; (the script, the file where it writes that child's pid)."""
    pid = tmp_path / "sleeper.pid"
    cc = shell_script(tmp_path / "cc", '[ "$1" = --version ] && { echo sleepy-cc 1.0; exit 0; }\n'
                      f'sleep 1000 &\necho $! > {pid}\n{ready}\nwait\n')
    return cc, pid


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (exited, or a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_compiler_that_never_finishes_is_bounded(cache: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """MUOMNI_COMPILE_TIMEOUT bounds the build: the torch step says so, the compiler's whole process group is
    gone, the build's temporary directory too."""
    cc, pid = sleeping_cc(tmp_path)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("MUOMNI_COMPILE_TIMEOUT", "2")
    assert kernel() == "torch (the C compiler on step.c did not finish in 2 s (MUOMNI_COMPILE_TIMEOUT))"
    assert gone(int(pid.read_text()))
    assert list(cache.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_during_the_first_compile_leaves_nothing_behind(cache: Path, tmp_path: Path) -> None:
    """SIGINT while the compiler runs (it has written a temporary file into $TMPDIR): exit 130, the compiler's
    group killed, and neither $TMPDIR nor the cache directory keeps a file of it."""
    ready = tmp_path / "ready"
    os.mkfifo(ready)
    cc, pid = sleeping_cc(tmp_path, f'echo partial > "$TMPDIR/cc-temp.s"\necho ready > {ready}')
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "CC": str(cc), "TMPDIR": str(tmpdir)}
    proc = forkserver.popen([sys.executable, str(REPO / "infer_chat.py"), *ASK], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fd = os.open(ready, os.O_RDWR)  # never blocks; select wakes when the compiler has written its temporary file
    try:
        while not select.select([fd], [], [], 1.0)[0]:
            assert proc.poll() is None, proc.communicate()
    finally:
        os.close(fd)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and out == "", err
    assert gone(int(pid.read_text()))
    assert list(tmpdir.iterdir()) == [] and list(cache.iterdir()) == []


@pytest.mark.parametrize("where", ["version", "errors"])
def test_a_compiler_printing_bytes_that_are_not_utf8(cache: Path, tmp_path: Path, where: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Latin-1 in the compiler's --version (it then builds: the step is used and names it) or in its errors
    (the build fails: the reason quotes them, undecodable bytes replaced)."""
    if where == "version":
        body = f'[ "$1" = --version ] && {{ printf "caf\\351 cc 1.0\\n"; exit 0; }}\nexec {real_cc()} "$@"\n'
    else:
        body = '[ "$1" = --version ] && { echo plain-cc 1.0; exit 0; }\nprintf "erreur: \\351chec\\n" >&2\nexit 1\n'
    monkeypatch.setenv("CC", str(shell_script(tmp_path / "cc", body)))
    got = kernel()
    if where == "version":
        assert got.startswith("c (") and got.endswith(", caf\ufffd cc 1.0)")
    else:
        assert got == "torch (the C compiler failed on step.c: erreur: \ufffdchec)"


@pytest.mark.parametrize("name,value,why", [
    ("MUOMNI_CFLAGS", '-DX="', "No closing quotation (the flags are split as a shell would)"),
    ("MUOMNI_COMPILE_TIMEOUT", "soon", "use a number of seconds above 0"),
    ("MUOMNI_COMPILE_TIMEOUT", "0", "use a number of seconds above 0"),
])
def test_unreadable_compiler_settings_are_an_error_naming_them(cache: Path, name: str, value: str, why: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting that cannot be read is the user's error, under auto as under c: one `error:` line naming it."""
    monkeypatch.setenv(name, value)
    done = run_cli(*ASK)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == f"error: {name} {value!r}: {why}"
    assert refused().startswith(f"error: {name} ")


def test_a_sanitizer_build_is_refused_with_the_reason(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MUOMNI_CFLAGS=-fsanitize=address builds a library whose loading would abort Python (the ASan runtime
    must come first): it is refused before loading, with the reason, and not kept."""
    monkeypatch.setenv("MUOMNI_CFLAGS", "-fsanitize=address")
    got = kernel()
    assert got.startswith("torch (a fresh build of step.c needs a sanitizer's runtime (__asan_init)"), got
    assert "-fsanitize" in refused()
    assert builds(cache) == []


@pytest.mark.parametrize("home", ["", "relative/home"])
def test_without_a_usable_home_the_cache_is_private_and_not_in_the_cwd(tmp_path: Path, home: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """HOME empty or relative (as a HOME unset without a passwd entry leaves "~"): the cache goes to a private
    muomni-UID directory of the temporary directory, never under the current directory."""
    for name in ("MUOMNI_CACHE_DIR", "XDG_CACHE_HOME", "CC", "MUOMNI_CFLAGS", "MUOMNI_COMPILE_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", home)
    tmpdir, cwd = tmp_path / "tmpdir", tmp_path / "cwd"
    tmpdir.mkdir(mode=0o700)
    cwd.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    done = run_cli(*ASK, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["timing"]["decode_kernel"].startswith("c (")
    assert list(cwd.iterdir()) == []
    private = tmpdir / f"muomni-{os.geteuid()}"
    assert len(builds(private)) == 1 and (private.stat().st_mode & 0o777) == 0o700
