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
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
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


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(REPO / "serve.py"), "--ckpt_dir", args.ckpt_dir, "--port", str(port),
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="A running server, e.g. http://127.0.0.1:8080.")
    where.add_argument("--ckpt_dir", help="Start serve.py on this model (on a free localhost port).")
    p.add_argument("--clients", default="1,4,16", help="Concurrency levels, comma-separated (default 1,4,16).")
    p.add_argument("--requests", type=int, default=4, help="Requests per client at each level (default 4).")
    p.add_argument("--max_tokens", type=int, default=128, help="Tokens per answer (EOS ignored; default 128).")
    p.add_argument("--max_batch", type=int, default=16, help="--max_batch for a started server (default 16).")
    p.add_argument("--threads", type=int, default=None, help="--threads for a started server.")
    p.add_argument("--model", default="muomni", help="Model id to request (default muomni).")
    p.add_argument("--api_key", default=os.environ.get("OMNI_API_KEY"), help="Bearer key (default $OMNI_API_KEY).")
    p.add_argument("--min_scaling", type=float, default=None,
                   help="Fail unless tokens/s at the largest level >= this times tokens/s at the smallest.")
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = None
    if args.ckpt_dir:
        proc, url = start_server(args)
    else:
        url = args.url.rstrip("/")
    try:
        asyncio.run(level(url, 1, 1, 8, args.model, headers))  # warm-up
        rows = [asyncio.run(level(url, n, args.requests, args.max_tokens, args.model, headers)) for n in levels]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["scaling"] = round(r["tokens_per_s"] / base, 2) if base else 0.0
    if args.json:
        print(json.dumps({"max_tokens": args.max_tokens, "requests_per_client": args.requests, "levels": rows}))
    else:
        print(f"{'clients':>7} {'requests':>8} {'failed':>6} {'tokens/s':>9} {'x1':>6} {'TTFT p50':>9} {'p95':>8} "
              f"{'ITL p50':>8} {'p95':>7}  (ms)")
        for r in rows:
            print(f"{r['clients']:>7} {r['requests']:>8} {r['failed']:>6} {r['tokens_per_s']:>9} {r['scaling']:>6} "
                  f"{r['ttft_p50_ms']:>9} {r['ttft_p95_ms']:>8} {r['itl_p50_ms']:>8} {r['itl_p95_ms']:>7}")
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
