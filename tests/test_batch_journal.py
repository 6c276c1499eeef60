"""batch.py's journal is checked, never trusted, and is the job's lock; the output is a regular file; text that is
not valid UTF-8 is escaped, not fatal; SIGTERM / SIGINT end a job as 143 / 130 with its journal kept.

A running job is held at a known point without any timing: its first batch is BAD lines of bad JSON (no model
work), whose error messages (over 64 KiB) fill the stderr pipe the test does not read. Once the journal holds
those BAD records the job is blocked writing to stderr until the test reads it: a second run meets the lock, a
signal lands mid-job, and the journal it leaves is the real one the tampering cases start from.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import forkserver
from tests.conftest import EXAMPLES, REPO
from tests.test_batch import batch_cmd, journal_records, records, run_batch, write_lines
from utils.batch.job import MAX_JOURNAL_BYTES

BAD = 1000  # bad lines in the first batch: ~110 KB of `error:` lines, more than a pipe holds
GEN = ["--max_new_tokens", "3", "--batch_size", str(BAD)]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """BAD lines of bad JSON, then requests a, b, c."""
    return write_lines(tmp_path_factory.mktemp("job") / "in.jsonl",
                       ["{"] * BAD + [json.dumps({"text": f"hello {i}", "id": i}) for i in "abc"])


def start_blocked(job: Path, out: Path) -> subprocess.Popen:
    """A job held after journaling its first batch (blocked writing the batch's errors to a full stderr pipe)."""
    proc = forkserver.popen(batch_cmd(str(job), "-o", str(out), *GEN), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    wait_for_journal(proc, out, BAD)
    return proc


def wait_for_journal(proc: subprocess.Popen, out: Path, n: int) -> None:
    """Until the journal of `out` holds `n` records (the job then waits on its full stderr)."""
    journal = out.with_name(out.name + ".journal")
    while not (journal.exists() and len(journal_records(journal)) == n):
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before its batch was journaled: "
                        f"{proc.stderr.read()[-2000:]!r}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def terminated(job, tmp_path_factory) -> tuple[subprocess.Popen, bytes, bytes]:
    """A job sent SIGTERM mid-way: the process, its stderr and the journal it left."""
    out = tmp_path_factory.mktemp("terminated") / "out.jsonl"
    proc = start_blocked(job, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    journal = out.with_name(out.name + ".journal")
    return proc, err, journal.read_bytes() if journal.exists() else b""


def test_sigterm_ends_the_job_as_143_with_the_journal_kept(terminated, job, tmp_path) -> None:
    proc, err, journal = terminated
    assert proc.returncode == 143, err[-2000:]
    assert b"Traceback" not in err and b"terminated by signal 15" in err and b"rerun with --resume" in err
    assert journal.count(b"\n") == 1 + BAD  # the header and the first batch
    out = tmp_path / "out.jsonl"
    # a torn last line (a kill mid-write) is dropped, as before
    (tmp_path / "out.jsonl.journal").write_bytes(journal + b'{"line": %d, "id": "zz' % (BAD + 2))
    r = run_batch(str(job), "-o", str(out), *GEN, "--resume")
    assert r.returncode == 1, r.stderr  # the bad lines' records have "error"
    assert f"({BAD} from the journal)" in r.stderr
    assert [rec["id"] for rec in records(out)] == [*range(1, BAD + 1), "a", "b", "c"]


def test_a_running_job_is_locked_and_sigint_is_130(job, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    proc = start_blocked(job, out)
    try:
        for again in (["--resume"], []):
            r = run_batch(str(job), "-o", str(out), *GEN, *again)
            assert r.returncode == 1 and r.stderr.count("error:") == 1, r.stderr
            assert f"error: --output {out}: this job is already running" in r.stderr
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and b"Traceback" not in err, err[-2000:]
    assert len(journal_records(out.with_name("out.jsonl.journal"))) == BAD


def record_line(line: int, rid: object) -> bytes:
    return json.dumps({"line": line, "id": rid, "text": "forged"}).encode() + b"\n"


@pytest.mark.parametrize("forged, why", [
    (record_line(BAD + 2, "zzz"), f'the record of input line {BAD + 2} has id "zzz", that line\'s id is "b"'),
    (record_line(BAD + 9, "zzz"), f"input line {BAD + 9} is not one of this job's requests"),
    (b'{"id": "b", "text": "forged"}\n', 'no input line number ("line")'),
    (b'{"line": %d, "id": "b", "text": "\xff\xfe"}\n' % (BAD + 2), "not valid UTF-8"),
    (b"[%d]\n" % (BAD + 2), "expected a JSON object, found list"),
    (b'{"line": %d, "id": "b"}\n' % (BAD + 2), 'neither an answer ("text") nor an "error"'),
])
def test_a_journal_record_of_another_job_is_refused(terminated, job, tmp_path, forged, why) -> None:
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.journal"
    journal.write_bytes(terminated[2] + forged)
    r = run_batch(str(job), "-o", str(out), *GEN, "--resume")
    assert r.returncode == 1 and r.stderr.count("error:") == 1, r.stderr
    assert r.stderr.splitlines()[-1] == f"error: {journal}, line {BAD + 2}: {why}: not a record of this job " \
                                        f"(delete the journal to start over)"
    assert journal.read_bytes() == terminated[2] + forged and not out.exists()


def test_a_journal_that_is_not_a_regular_file_is_refused_unread(job, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.journal"
    os.mkfifo(journal)  # opening it for reading would wait for a writer
    r = run_batch(str(job), "-o", str(out), *GEN, "--resume", timeout=60)
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == \
        f"error: {journal}: not a regular file, so not a batch journal; remove it to start over", r.stderr
    journal.unlink()
    journal.symlink_to("/dev/zero")  # endless: read whole, it would fill the memory (bounded here to fail fast)
    for why in ("not a regular file", f"over the limit of {MAX_JOURNAL_BYTES:,} for a journal"):
        r = forkserver.run(batch_cmd(str(job), "-o", str(out), *GEN, "--resume"), capture_output=True, text=True,
                           timeout=120, cwd=REPO, rlimits={resource.RLIMIT_AS: (2 << 30, 2 << 30)})
        assert r.returncode == 1 and why in r.stderr.splitlines()[-1], r.stderr
        assert not out.exists()
        journal.unlink()
        with open(journal, "wb") as f:  # a regular file too large to be a journal (sparse: no disk used)
            f.truncate(MAX_JOURNAL_BYTES + 1)


def test_output_that_is_a_stream_is_refused(job, tmp_path) -> None:
    """-o naming this program's stdout, or a link to it or to a pipe: refused before any work, the link kept. (Not
    /dev/stdout itself: where the refusal is missing, a test run as root would replace the system's link.)"""
    to_stdout, to_fifo = tmp_path / "to_stdout.jsonl", tmp_path / "to_fifo.jsonl"
    to_stdout.symlink_to("/proc/self/fd/1")
    os.mkfifo(tmp_path / "fifo")
    to_fifo.symlink_to(tmp_path / "fifo")
    for target, why in (("/proc/self/fd/1", "is this program's standard output"),
                        (str(to_stdout), "is this program's standard output"),
                        (str(to_fifo), "not a regular file (a terminal, a pipe or a device)")):
        r = run_batch(str(job), "-o", target, *GEN, timeout=120)
        assert r.returncode == 1 and r.stdout == "" and r.stderr.count("error:") == 1, r.stderr
        assert r.stderr.startswith(f"error: --output {target}: {why}"), r.stderr
    assert to_stdout.is_symlink() and to_fifo.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == [
        "fifo", "to_fifo.jsonl", "to_stdout.jsonl"]


def test_text_that_is_not_utf8_is_escaped_not_fatal(tmp_path) -> None:
    """A request id with a lone surrogate, a recording whose name is not UTF-8: JSON escapes in the records, as
    on infer_chat.py's stdout, and every line answered."""
    job = write_lines(tmp_path / "in.jsonl", ['{"text": "hello", "id": "a\\ud800"}', '{"text": "hi", "id": "b"}'])
    out = tmp_path / "out.jsonl"
    r = run_batch(str(job), "-o", str(out), "--max_new_tokens", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert out.read_text(encoding="ascii").count('"id": "a\\ud800"') == 1
    assert [(rec["id"], "text" in rec) for rec in records(out)] == [("a\ud800", True), ("b", True)]

    d = tmp_path / "recordings"
    d.mkdir()
    odd = os.fsdecode(bytes(d) + b"/\xff.wav")
    shutil.copy(EXAMPLES / "green_triangle.wav", odd)
    shutil.copy(EXAMPLES / "green_triangle.wav", d / "b.wav")
    out = tmp_path / "transcripts.jsonl"
    r = run_batch("--task", "transcribe", str(d), "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    got = records(out)
    assert [rec["id"] for rec in got] == [str(d / "b.wav"), odd]
    assert got[0]["text"] == got[1]["text"]
    assert "\\udcff.wav" in out.read_text(encoding="ascii")


def test_sigterm_reaches_the_ray_driver_as_143(tmp_path) -> None:
    """ray.init puts in its own SIGTERM handler (sys.exit): batch.py's policy is restored after it. The driver is
    held as above: the workers' records are errors (a missing image with a long path) whose lines fill stderr."""
    pytest.importorskip("ray", reason="ray[data] is in requirements.txt")
    missing = "/nonexistent/" + ("d" * 200 + "/") * 15 + "x.png"  # ~3 KB per `error:` line
    job = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": "hi", "image": missing, "id": i}) for i in range(30)])
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)  # a local Ray instance of the job's own, stopped by it
    proc = forkserver.popen(batch_cmd(str(job), "-o", str(out), "--max_new_tokens", "2", "--engine", "ray",
                                      "--workers", "1", "--batch_size", "30"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    wait_for_journal(proc, out, 30)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and b"Traceback" not in err, err[-2000:]
    assert len(journal_records(out.with_name("out.jsonl.journal"))) == 30
