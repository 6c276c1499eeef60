"""batch.py: the same job on --engine local and on a real local Ray cluster (2 CPUs, started once for the module
with `ray start --head` and stopped at the end), --resume after kill -9 of the driver, a Ray worker killed
mid-job, the journal's edge cases, --task transcribe, and infer_chat.py --batch_file agreeing with batch.py.

Expected records come from the library (omni.load_model(...).answer) or from the local engine, never from
hard-coded text. The demo checkpoint (checkpoints/demo, in the repository) answers text, image and audio.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests import forkserver
from tests.conftest import DEMO, EXAMPLES, REPO, run_cli
from utils.base.cpus import physical_cores

GEN = ["--max_new_tokens", "12"]
LONG = ["--max_new_tokens", "40", "--ignore_eos"]  # a job long enough to be killed halfway
ACTOR_TITLE = "ray::MapWorker(MapBatches(RayWorker))"  # Ray's process title for our actors


def batch_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "batch.py"), "--ckpt_dir", str(DEMO), *args]


def run_batch(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return forkserver.run(batch_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def journal_records(path: Path) -> list[dict]:
    """The finished records in a journal (complete lines only; the header skipped)."""
    data = path.read_bytes()
    lines = data[:data.rfind(b"\n") + 1].decode("utf-8").splitlines()
    return [json.loads(line) for line in lines[1:]]


def without_timing(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in rec.items() if k != "timing"} for rec in recs]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Text, image (relative to the file), audio, video, an id, a blank line, bad JSON and a missing image."""
    d = tmp_path_factory.mktemp("mixed")
    shutil.copy(EXAMPLES / "red_circle.png", d / "red.png")
    return write_lines(d / "requests.jsonl", [
        json.dumps({"text": "What is one plus two?", "id": "sum"}),
        json.dumps({"image": "red.png"}),
        "",
        json.dumps({"audio_in": str(EXAMPLES / "green_triangle.wav"), "text": "What did you hear?"}),
        "{not json",
        json.dumps({"text": "x", "image": str(d / "missing.png"), "id": 7}),
        json.dumps({"video": str(EXAMPLES / "shapes.mp4"), "video_frames": 2}),
        json.dumps({"text": "What colour is the square?", "image": str(EXAMPLES / "blue_square.png")}),
    ])


@pytest.fixture(scope="module")
def long_job(tmp_path_factory) -> Path:
    texts = ["what is one plus two", "tell me about the red circle", "once upon a time", "hello there"]
    return write_lines(tmp_path_factory.mktemp("long") / "long.jsonl",
                       [json.dumps({"text": f"{texts[i % 4]} {i}", "id": f"q{i}"}) for i in range(48)])


@pytest.fixture(scope="module")
def long_expected(long_job, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("long_local") / "out.jsonl"
    r = run_batch(str(long_job), "-o", str(out), *LONG, "--quiet")
    assert r.returncode == 0, r.stderr
    return without_timing(records(out))


# ---------------------------------------------------------------- the local engine

def test_local_mixed_batch_matches_the_library(mixed, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    r = run_batch(str(mixed), "-o", str(out), "--batch_size", "3", *GEN, "--quiet")
    assert r.returncode == 1, r.stderr  # two bad lines
    assert r.stdout == ""
    got = records(out)
    assert [rec["line"] for rec in got] == [1, 2, 4, 5, 6, 7, 8]
    assert [rec["id"] for rec in got] == ["sum", 2, 4, 5, 7, 7, 8]
    assert "not valid JSON" in got[3]["error"] and "missing.png" in got[4]["error"]
    assert "line 5:" in r.stderr and "line 6:" in r.stderr
    assert not (tmp_path / "out.jsonl.journal").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left

    from omni import load_model
    model = load_model(DEMO, device="cpu")
    asks = [dict(text="What is one plus two?"), dict(image=str(mixed.parent / "red.png")),
            dict(audio=str(EXAMPLES / "green_triangle.wav"), text="What did you hear?"), None, None,
            dict(video=str(EXAMPLES / "shapes.mp4"), video_frames=2),
            dict(text="What colour is the square?", image=str(EXAMPLES / "blue_square.png"))]
    for rec, ask in zip(got, asks):
        if ask is None:
            continue
        ans = model.answer(**ask, max_new_tokens=12)
        assert rec["token_ids"] == ans.token_ids and rec["text"] == ans.text, rec
        assert rec["prompt_tokens"] == ans.prompt_tokens and rec["generated_tokens"] == len(ans.token_ids)


def test_infer_chat_batch_file_agrees_with_batch_py(mixed, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    run_batch(str(mixed), "-o", str(out), *GEN, "--quiet")
    r = run_cli("--ckpt_dir", str(DEMO), "--batch_file", str(mixed), *GEN, "--quiet")
    assert r.returncode == 1
    chat = [json.loads(line) for line in r.stdout.splitlines()]
    assert [c["line"] for c in chat] == [rec["line"] for rec in records(out)]
    for c, rec in zip(chat, records(out)):
        assert c.get("text") == rec.get("text") and c.get("token_ids") == rec.get("token_ids")
        assert c.get("error") == rec.get("error")
    assert chat[0]["input"]["id"] == "sum"  # an id is accepted (and echoed) by --batch_file too


def test_system_prompt_as_in_infer_chat(tmp_path) -> None:
    """batch.py --system joins the system prompt before each request's text, as infer_chat.py --system does."""
    requests = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": "What is one plus two?"})])
    out = tmp_path / "out.jsonl"
    r = run_batch(str(requests), "-o", str(out), *GEN, "--system", "Answer briefly.", "--quiet")
    assert r.returncode == 0, r.stderr
    chat = run_cli("--ckpt_dir", str(DEMO), "--text", "What is one plus two?", "--system", "Answer briefly.", *GEN,
                   "--json", "--quiet")
    assert chat.returncode == 0, chat.stderr
    got, want = records(out)[0], json.loads(chat.stdout)
    assert got["token_ids"] == want["token_ids"] and got["prompt_tokens"] == want["prompt_tokens"]


def test_sampling_options_and_logprobs_as_in_the_library(tmp_path, demo_model) -> None:
    """The generation flags are the table's rows: penalties, logit_bias and logprobs reach each record, which
    equals the library's answer with the same options."""
    texts = ["What is 3 plus 4?", "What is 1 plus 1?"]
    requests = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in texts])
    out = tmp_path / "out.jsonl"
    r = run_batch(str(requests), "-o", str(out), "--max_new_tokens", "8", "--ignore_eos", "--logprobs", "1",
                  "--logit_bias", '{"466": -100}', "--frequency_penalty", "0.5", "--quiet")
    assert r.returncode == 0, r.stderr
    for rec, text in zip(records(out), texts, strict=True):
        want = demo_model.answer(text, max_new_tokens=8, ignore_eos=True, logprobs=1, logit_bias={466: -100},
                                 frequency_penalty=0.5)
        assert rec["token_ids"] == want.token_ids and 466 not in want.token_ids
        assert rec["logprobs"] == {"content": want.logprobs}


def test_decode_kernel_is_built_and_said_before_the_records(tmp_path) -> None:
    job = write_lines(tmp_path / "job.jsonl", [json.dumps({"text": "hello"}), "{not json"])
    plain = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    r = run_batch(str(job), "-o", str(tmp_path / "out.jsonl"), *GEN, env=plain)
    assert r.returncode == 1, r.stderr  # the bad line's record has "error"
    lines = r.stderr.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("decode kernel = ")]
    record_error = next(i for i, line in enumerate(lines) if line.startswith("error: line 2:"))
    assert said and said[0] < record_error and lines[said[0]].startswith(("decode kernel = c (",
                                                                           "decode kernel = torch (")), lines
    cores = physical_cores()  # the default --threads of batch.py (and serve.py)
    assert lines[said[0]].startswith("decode kernel = torch (") or f", {cores} thread" in lines[said[0]], lines
    # without a compiler: auto says torch and why; --decode_kernel c is the usual error before any record
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "MUOMNI_CACHE_DIR": str(tmp_path / "cache")}
    r = run_batch(str(job), "-o", str(tmp_path / "auto.jsonl"), *GEN, env=env)
    assert "decode kernel = torch (no C compiler" in r.stderr, r.stderr
    out = tmp_path / "c.jsonl"
    r = run_batch(str(job), "-o", str(out), *GEN, "--decode_kernel", "c", env=env)
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith(
        "error: --decode_kernel c: the C decode step cannot run here: no C compiler"), r.stderr
    assert "error: line" not in r.stderr and not out.exists() and not list(tmp_path.glob("c.jsonl*"))


def test_local_resume_after_kill_with_a_torn_journal_line(long_job, long_expected, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.journal"
    proc = forkserver.popen(batch_cmd(str(long_job), "-o", str(out), *LONG, "--batch_size", "2", "--quiet"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    wait_for_progress(proc, journal, 4)
    proc.kill()
    proc.wait()
    kept = journal_records(journal)
    assert 4 <= len(kept) < len(long_expected), "the job finished before it could be killed"
    assert not out.exists()
    with open(journal, "ab") as f:  # as if the kill had landed in the middle of a write
        f.write(b'{"line": 999, "id": "to')
    r = run_batch(str(long_job), "-o", str(out), *LONG, "--batch_size", "2", "--resume")
    assert r.returncode == 0, r.stderr
    assert f"({len(kept)} from the journal)" in r.stderr
    assert without_timing(records(out)) == long_expected
    assert not journal.exists()


def test_journal_guards(long_job, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.journal"
    journal.write_text(json.dumps({"journal": "muomni-batch-journal/1", "job": "another job"}) + "\n")
    r = run_batch(str(long_job), "-o", str(out))
    assert r.returncode == 1 and "--resume" in r.stderr and r.stderr.count("error:") == 1
    r = run_batch(str(long_job), "-o", str(out), "--resume")
    assert r.returncode == 1 and "different job" in r.stderr
    assert journal.exists() and not out.exists()
    r = run_batch(str(long_job), "-o", str(tmp_path))
    assert r.returncode == 1 and "is a directory" in r.stderr
    r = run_batch(str(long_job), "-o", str(long_job))
    assert r.returncode == 1 and "is the input" in r.stderr
    r = run_batch(str(long_job), "-o", str(out), "--workers", "2")
    assert r.returncode == 2 and "--engine ray" in r.stderr
    r = run_batch(str(long_job), str(long_job), "-o", str(out))
    assert r.returncode == 2


def test_transcribe_a_directory_and_files(tmp_path) -> None:
    d = tmp_path / "recordings"
    (d / "sub").mkdir(parents=True)
    shutil.copy(EXAMPLES / "green_triangle.wav", d / "b.wav")
    shutil.copy(EXAMPLES / "green_triangle.wav", d / "sub" / "a.wav")
    (d / "notes.txt").write_text("not audio")
    (d / "broken.wav").write_bytes(b"RIFF....WAVEfmt ")
    out = tmp_path / "out.jsonl"
    r = run_batch("--task", "transcribe", str(d), str(EXAMPLES / "green_triangle.wav"), "-o", str(out), "--quiet")
    assert r.returncode == 1  # broken.wav
    got = records(out)
    assert [rec["id"] for rec in got] == [str(d / "b.wav"), str(d / "broken.wav"), str(d / "sub" / "a.wav"),
                                          str(EXAMPLES / "green_triangle.wav")]
    from omni import load_model
    expected = load_model(DEMO, device="cpu").transcribe(EXAMPLES / "green_triangle.wav")
    assert [rec.get("text") for rec in got] == [expected.text, None, expected.text, expected.text]
    assert [rec.get("segments") for rec in got] == [expected.segments, None, expected.segments, expected.segments]
    assert "broken.wav" in got[1]["error"]


# ---------------------------------------------------------------- a real Ray cluster

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_env():
    """`ray start --head` with 2 CPUs on 127.0.0.1 (token authentication with a token of its own), stopped at
    the end of the module: the environment a driver needs to reach it, with the address."""
    pytest.importorskip("ray", reason="ray[data] is in requirements.txt")
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay short
    (tmp / "token").write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp / "token"),
           "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
                             "--node-ip-address", "127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
                             "--temp-dir", str(tmp / "ray")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen = []
        for line in head.stdout:  # it prints its banner, then blocks until it is told to stop
            seen.append(line)
            if "Ray runtime started" in line or "will now block" in line:
                break
        else:
            pytest.fail("ray start failed:\n" + "".join(seen))
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        head.send_signal(signal.SIGTERM)  # --block: it stops the processes it started
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a graceful GCS drain can take half a minute: not needed here
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        for pid in processes_mentioning(str(tmp)):  # what the reaper missed (workers live in their own groups)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def ray_args(env: dict, *more: str) -> list[str]:
    return ["--engine", "ray", "--ray_address", env["RAY_ADDRESS"], *more]


def test_ray_output_equals_local(mixed, tmp_path, ray_env) -> None:
    local, on_ray, inline = tmp_path / "local.jsonl", tmp_path / "ray.jsonl", tmp_path / "inline.jsonl"
    r = run_batch(str(mixed), "-o", str(local), *GEN, "--quiet")
    assert r.returncode == 1, r.stderr
    r = run_batch(str(mixed), "-o", str(on_ray), *GEN, *ray_args(ray_env, "--workers", "2", "--batch_size", "2"),
                  env=ray_env)
    assert r.returncode == 1, r.stderr
    assert without_timing(records(on_ray)) == without_timing(records(local))
    assert r.stdout == "" and "2 errors" in r.stderr and "engine ray, 2 workers" in r.stderr
    # media shipped in the dataset: the same records, the missing file reported the same way
    r = run_batch(str(mixed), "-o", str(inline), *GEN, *ray_args(ray_env, "--workers", "1", "--inline_media"),
                  env=ray_env)
    assert r.returncode == 1, r.stderr
    assert without_timing(records(inline)) == without_timing(records(local))


def wait_for_progress(proc: subprocess.Popen, journal: Path, n: int, timeout: float = 240) -> int:
    """Wait until `journal` holds at least `n` finished records (the job is mid-way)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before it could be killed:\n{proc.stderr.read()}")
        if journal.exists() and len(journal_records(journal)) >= n:
            return len(journal_records(journal))
        time.sleep(0.05)
    pytest.fail("the job made no progress")


def test_ray_resume_after_the_driver_is_killed(long_job, long_expected, tmp_path, ray_env) -> None:
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.journal"
    args = [str(long_job), "-o", str(out), *LONG, *ray_args(ray_env, "--workers", "1", "--batch_size", "2")]
    proc = forkserver.popen(batch_cmd(*args), env=ray_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    wait_for_progress(proc, journal, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = journal_records(journal)
    assert 2 <= len(kept) < len(long_expected), "the job finished before it could be killed"
    assert not out.exists()
    r = run_batch(*args, "--resume", env=ray_env)
    assert r.returncode == 0, r.stderr
    assert f"({len(kept)} from the journal)" in r.stderr  # nothing finished was redone
    assert without_timing(records(out)) == long_expected  # complete, in order, no duplicate
    assert not journal.exists()


def command_lines() -> dict[int, str]:
    found = {}
    for proc in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if proc.name.isdigit():
            try:
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return found


def processes_mentioning(text: str) -> list[int]:
    return [pid for pid, cmd in command_lines().items() if text in cmd]


def actor_pids() -> set[int]:
    return {pid for pid, cmd in command_lines().items() if cmd.startswith(ACTOR_TITLE)}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the Ray actor's process through /proc")
def test_ray_worker_killed_mid_job_is_retried(long_job, long_expected, tmp_path, ray_env) -> None:
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.journal"
    before = actor_pids()
    proc = forkserver.popen(batch_cmd(str(long_job), "-o", str(out), *LONG,
                                      *ray_args(ray_env, "--workers", "1", "--batch_size", "2")),
                            env=ray_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    wait_for_progress(proc, journal, 2)
    victims = actor_pids() - before
    assert len(victims) == 1, victims  # the job's one worker
    victim = victims.pop()
    os.kill(victim, signal.SIGKILL)
    remaining = len(long_expected) - len(journal_records(journal))
    assert remaining > 0, "the job finished before its worker could be killed"
    successors = set()
    while proc.poll() is None:  # Ray restarts the actor (a new process) and retries its batch
        successors |= actor_pids() - before - {victim}
        time.sleep(0.05)
    assert proc.returncode == 0, proc.stderr.read()
    assert successors, "no new worker process was started"
    assert without_timing(records(out)) == long_expected
