#!/usr/bin/env python3
"""Load test for serve.py: N concurrent streaming chat clients, each sending requests back to back.

Reports, per concurrency level: aggregate generated tokens/s, time to first token (p50/p95), inter-token latency
(p50/p95, from the arrival times of the streamed chunks; a chunk may carry several tokens), failed requests and the
client's CPU time per token. Either point it at a running server (--url) or let it start one on a free localhost
port (--ckpt_dir, or --tiny: the μOmni tiny configuration with random weights, tools/bench_models.py; stopped
afterwards).

A server it starts is measured beside the engine itself: at each level the same requests (prompts, budget, EOS
ignored) also run in this process through `answer_batch` with batch_size = clients, on the same thread count, and
the table shows that rate, the server's share of it (what the HTTP and streaming path costs), and the CPU time
per token of the server process, of its event loop's thread and of answer_batch. --rounds R measures every level
R times, in-process and server in turn, and reports the median round.

    python tools/load_test.py --ckpt_dir checkpoints/demo --clients 1,4,16
    python tools/load_test.py --tiny --clients 16 --requests 2 --rounds 3
    python tools/load_test.py --url http://127.0.0.1:8080 --clients 1,4,16 --json

Exit status 1 if any request failed, or with --min_scaling X when tokens/s at the largest level is below X times
tokens/s at the smallest.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # omni and tools.bench_models, from anywhere
PROMPTS = ["What is 3 plus 4?", "What is 12 plus 30?", "Hello", "What is 7 plus 8?", "Tell me a story",
           "What is 25 plus 17?", "What do you see?", "What is 2 plus 2?"]


COLUMNS = (("clients", "clients"), ("requests", "requests"), ("failed", "failed"), ("tokens/s", "tokens_per_s"),
           ("x1", "scaling"), ("TTFT p50", "ttft_p50_ms"), ("p95", "ttft_p95_ms"), ("ITL p50", "itl_p50_ms"),
           ("p95", "itl_p95_ms"), ("CPU client", "client_cpu_us_per_token"))
LOCAL_COLUMNS = (("CPU server", "server_cpu_us_per_token"), ("loop", "loop_cpu_us_per_token"),
                 ("in-process tokens/s", "in_process_tokens_per_s"), ("CPU", "in_process_cpu_us_per_token"),
                 ("server/in-process", "server_share"))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class Endpoint:
    """Where the requests go: an http:// URL's host, port and path prefix, and the request headers."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url}: use http://HOST[:PORT] (the load test's client speaks plain HTTP)")
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = parts.path.rstrip("/") + "/v1/chat/completions"
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())


async def one_request(where: Endpoint, prompt: str, max_tokens: int, model: str) -> dict:
    """One streaming request: its TTFT, chunk gaps and token count (from the usage chunk). The client is a plain
    HTTP/1.1 reader of the chunked event stream over asyncio streams (one connection per request): on a machine it
    shares with the server it takes as little as it can of the CPU the server needs, which a general client
    (httpx: ~100 µs per event) does not."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                       "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    reader, writer = await asyncio.open_connection(where.host, where.port)
    try:
        writer.write(f"POST {where.path} HTTP/1.1\r\nHost: {where.host}:{where.port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                     f"{where.headers}\r\n".encode() + body)
        status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            chunked |= name.strip().lower() == "transfer-encoding" and "chunked" in value.lower()
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {(await reader.read())[:200]!r}")
        if not chunked:
            raise RuntimeError("the event stream is not chunked")
        buf, done = b"", False
        while not done:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                break
            buf += await reader.readexactly(size + 2)  # the data and its CRLF
            buf = buf[:-2]
            *events, buf = buf.split(b"\n\n")
            now = time.perf_counter()
            for event in events:
                if not event.startswith(b"data: "):
                    continue
                data = event[6:]
                if data == b"[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    raise RuntimeError(obj["error"]["message"])
                if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                    times.append(now)
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
        if not done:
            raise RuntimeError("the stream ended without [DONE]")
    finally:
        writer.close()
    return {"ttft": times[0] - t0 if times else float("nan"), "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens}


async def level(where: Endpoint, clients: int, requests: int, max_tokens: int, model: str) -> dict:
    results: list[dict] = []
    failures: list[str] = []

    async def client_loop(c: int) -> None:
        for i in range(requests):
            try:
                results.append(await one_request(where, PROMPTS[(c + i) % len(PROMPTS)], max_tokens, model))
            except (OSError, asyncio.IncompleteReadError, RuntimeError, ValueError, IndexError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    ttfts = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results) + len(failures), "failed": len(failures),
            "failures": failures[:5], "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
            "ttft_p50_ms": round(percentile(ttfts, 50) * 1e3, 1), "ttft_p95_ms": round(percentile(ttfts, 95) * 1e3, 1),
            "itl_p50_ms": round(percentile(gaps, 50) * 1e3, 2), "itl_p95_ms": round(percentile(gaps, 95) * 1e3, 2)}


def level_items(clients: int, requests: int) -> list[dict[str, str]]:
    """The requests of one level in the order its clients send them (client c's i-th: PROMPTS[(c + i) % 8])."""
    return [{"text": PROMPTS[(c + i) % len(PROMPTS)]} for i in range(requests) for c in range(clients)]


def in_process(model: Any, clients: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """Tokens/s of one level's requests through `answer_batch` in this process, `clients` rows at a time, and the
    CPU time it took per token (µs)."""
    t0, c0 = time.perf_counter(), time.process_time()
    answers = model.answer_batch(level_items(clients, requests), batch_size=clients, max_new_tokens=max_tokens,
                                 ignore_eos=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(a.generated_tokens for a in answers)
    return round(tokens / wall, 1), round(cpu / tokens * 1e6, 1)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU time of process `pid` so far, and of its main thread alone (where uvicorn runs the event
    loop: the HTTP and streaming path; the engine has a thread of its own). Linux /proc, in its clock ticks."""
    def read(stat: str) -> float:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")


def start_server(args: argparse.Namespace, ckpt_dir: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(REPO / "serve.py"), "--ckpt_dir", ckpt_dir, "--port", str(port),
           "--max_batch", str(args.max_batch), "--log_level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: serve.py exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("error: serve.py did not answer /health within 120 s")


def measure(args: argparse.Namespace, levels: list[int], headers: dict[str, str], ckpt_dir: str | None
            ) -> list[dict]:
    """Each level's row (the median round by server tokens/s), with the in-process rate and the CPU time per token
    of both (the server process's, read from /proc) when a server is started here on `ckpt_dir`."""
    model = None
    if ckpt_dir is not None:
        from omni import load_model
        from utils.base.cpus import service_threads
        model = load_model(ckpt_dir, device="cpu", threads=service_threads(args.threads))
        in_process(model, 1, 1, 8)  # warm-up (the C step built and loaded)
        proc, url = start_server(args, ckpt_dir)
    else:
        proc, url = None, args.url.rstrip("/")
    try:
        where = Endpoint(url, headers)
        asyncio.run(level(where, 1, 1, 8, args.model))  # warm-up
        rows = []
        for n in levels:
            rounds, local = [], []
            for _ in range(args.rounds):
                if model is not None:
                    local.append(in_process(model, n, args.requests, args.max_tokens))
                c0, mine = cpu_seconds(proc.pid) if proc is not None else (0.0, 0.0), time.process_time()
                row = asyncio.run(level(where, n, args.requests, args.max_tokens, args.model))
                mine = time.process_time() - mine
                if row["tokens"]:
                    row["client_cpu_us_per_token"] = round(mine / row["tokens"] * 1e6, 1)
                if proc is not None and row["tokens"]:
                    c1 = cpu_seconds(proc.pid)
                    row["server_cpu_us_per_token"] = round((c1[0] - c0[0]) / row["tokens"] * 1e6, 1)
                    row["loop_cpu_us_per_token"] = round((c1[1] - c0[1]) / row["tokens"] * 1e6, 1)
                rounds.append(row)
            rounds.sort(key=lambda r: r["tokens_per_s"])
            row = rounds[len(rounds) // 2]
            row["failed"] = sum(r["failed"] for r in rounds)
            row["failures"] = [f for r in rounds for f in r["failures"]][:5]
            if local:
                row["in_process_tokens_per_s"] = round(statistics.median(r for r, _ in local), 1)
                row["in_process_cpu_us_per_token"] = round(statistics.median(c for _, c in local), 1)
                row["server_share"] = round(row["tokens_per_s"] / row["in_process_tokens_per_s"], 3)
            rows.append(row)
        return rows
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="A running server, e.g. http://127.0.0.1:8080.")
    where.add_argument("--ckpt_dir", help="Start serve.py on this model (on a free localhost port).")
    where.add_argument("--tiny", action="store_true",
                       help="Start serve.py on the μOmni tiny configuration, random weights (tools/bench_models.py).")
    p.add_argument("--clients", default="1,4,16", help="Concurrency levels, comma-separated (default 1,4,16).")
    p.add_argument("--requests", type=int, default=4, help="Requests per client at each level (default 4).")
    p.add_argument("--max_tokens", type=int, default=128, help="Tokens per answer (EOS ignored; default 128).")
    p.add_argument("--max_batch", type=int, default=16, help="--max_batch for a started server (default 16).")
    p.add_argument("--threads", type=int, default=None,
                   help="--threads for a started server and the in-process run (default: serve.py's).")
    p.add_argument("--rounds", type=int, default=1,
                   help="Measure each level this many times, in-process and server interleaved; medians (default 1).")
    p.add_argument("--model", default="muomni", help="Model id to request (default muomni).")
    p.add_argument("--api_key", default=os.environ.get("OMNI_API_KEY"), help="Bearer key (default $OMNI_API_KEY).")
    p.add_argument("--min_scaling", type=float, default=None,
                   help="Fail unless tokens/s at the largest level >= this times tokens/s at the smallest.")
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.url:
        try:
            Endpoint(args.url, headers)
        except ValueError as exc:
            p.error(f"--url {exc}")
    with tempfile.TemporaryDirectory(prefix="muomni_load_") as tmp:
        ckpt_dir = args.ckpt_dir
        if args.tiny:
            from tools.bench_models import write_tree
            write_tree(Path(tmp))
            ckpt_dir = tmp
        rows = measure(args, levels, headers, ckpt_dir)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["scaling"] = round(r["tokens_per_s"] / base, 2) if base else 0.0
    if args.json:
        print(json.dumps({"max_tokens": args.max_tokens, "requests_per_client": args.requests, "rounds": args.rounds,
                          "levels": rows}))
    else:
        columns = COLUMNS + (LOCAL_COLUMNS if ckpt_dir else ())
        print(" ".join(f"{title:>{len(title) if len(title) > 6 else 7}}" for title, _ in columns))
        for r in rows:
            print(" ".join(f"{r.get(key, '-')!s:>{len(title) if len(title) > 6 else 7}}" for title, key in columns))
        print("(times in ms; CPU: µs per generated token, of the server process, its event loop's thread, this "
              "client, and answer_batch in process)")
    for r in rows:
        for f in r["failures"]:
            print(f"failed ({r['clients']} clients): {f}", file=sys.stderr)
    if any(r["failed"] for r in rows):
        return 1
    if args.min_scaling is not None and rows[-1]["scaling"] < args.min_scaling:
        print(f"error: {rows[-1]['clients']} clients reached {rows[-1]['scaling']}x the tokens/s of "
              f"{rows[0]['clients']}, below --min_scaling {args.min_scaling}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
