#!/usr/bin/env python3
"""Load test for serve.py: N concurrent streaming chat clients, each sending requests back to back.

Reports, per concurrency level: aggregate generated tokens/s, time to first token (p50/p95) and inter-token
latency (p50/p95, from the arrival times of the streamed chunks), and failed requests. Either point it at a
running server (--url) or let it start one on a free localhost port (--ckpt_dir; stopped afterwards).

    python tools/load_test.py --ckpt_dir checkpoints/demo --clients 1,4,16
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
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # omni and tools.bench_models, from anywhere
PROMPTS = ["What is 3 plus 4?", "What is 12 plus 30?", "Hello", "What is 7 plus 8?", "Tell me a story",
           "What is 25 plus 17?", "What do you see?", "What is 2 plus 2?"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, model: str,
                      headers: dict[str, str]) -> dict:
    """One streaming request: its TTFT, chunk gaps and token count (from the usage chunk)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "ignore_eos": True}
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(obj["error"]["message"])
            if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
        if not done:
            raise RuntimeError("the stream ended without [DONE]")
    return {"ttft": times[0] - t0 if times else float("nan"), "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens}


async def level(url: str, clients: int, requests: int, max_tokens: int, model: str, headers: dict[str, str]) -> dict:
    results: list[dict] = []
    failures: list[str] = []

    async def client_loop(c: int, http: httpx.AsyncClient) -> None:
        for i in range(requests):
            try:
                results.append(await one_request(http, url, PROMPTS[(c + i) % len(PROMPTS)], max_tokens, model,
                                                 headers))
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c, http) for c in range(clients)))
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc; its clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        asyncio.run(level(url, 1, 1, 8, args.model, headers))  # warm-up
        rows = []
        for n in levels:
            rounds, local = [], []
            for _ in range(args.rounds):
                if model is not None:
                    local.append(in_process(model, n, args.requests, args.max_tokens))
                c0 = cpu_seconds(proc.pid) if proc is not None else 0.0
                row = asyncio.run(level(url, n, args.requests, args.max_tokens, args.model, headers))
                if proc is not None and row["tokens"]:
                    row["server_cpu_us_per_token"] = round((cpu_seconds(proc.pid) - c0) / row["tokens"] * 1e6, 1)
                rounds.append(row)
            rounds.sort(key=lambda r: r["tokens_per_s"])
            row = rounds[len(rounds) // 2]
            row["failed"] = sum(r["failed"] for r in rounds)
            row["failures"] = [f for r in rounds for f in r["failures"]][:5]
            if local:
                row["in_process_tokens_per_s"] = statistics.median(r for r, _ in local)
                row["in_process_cpu_us_per_token"] = statistics.median(c for _, c in local)
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
        print(f"{'clients':>7} {'requests':>8} {'failed':>6} {'tokens/s':>9} {'x1':>6} {'TTFT p50':>9} {'p95':>8} "
              f"{'ITL p50':>8} {'p95':>7}" + (f" {'in-process':>10} {'server/in':>9} {'CPU/token':>9} {'in-proc':>7}" if ckpt_dir else "")
              + "  (times in ms, CPU in µs)")
        for r in rows:
            print(f"{r['clients']:>7} {r['requests']:>8} {r['failed']:>6} {r['tokens_per_s']:>9} {r['scaling']:>6} "
                  f"{r['ttft_p50_ms']:>9} {r['ttft_p95_ms']:>8} {r['itl_p50_ms']:>8} {r['itl_p95_ms']:>7}"
                  + (f" {r['in_process_tokens_per_s']:>10} {r['server_share']:>9} {r.get('server_cpu_us_per_token', '-'):>9} "
                     f"{r['in_process_cpu_us_per_token']:>7}" if ckpt_dir else ""))
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
