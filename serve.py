#!/usr/bin/env python3
"""An OpenAI-compatible HTTP server for a μOmni model, with continuous batching.

Endpoints: POST /v1/chat/completions (text, image and audio input; streaming; spoken answers),
POST /v1/audio/transcriptions, POST /v1/audio/speech, GET /v1/models, GET /health, GET /metrics.
It binds 127.0.0.1 unless --host says otherwise; with --api_key every /v1 route needs
`Authorization: Bearer KEY`. Requests carry their media inline: the server never reads a path or fetches
a URL for a request. SIGTERM, SIGHUP or Ctrl-C stops it gracefully (exit status 0); during the model load they
stop it at once (exit 130 / 143 / 129).
"""
from __future__ import annotations

if __name__ == "__main__":  # first, so the signal policy covers every line below (utils.base.errors.run_script)
    from utils.base.errors import run_script
    run_script("serve")

import argparse
import logging
import socket
import sys
import traceback
from typing import Sequence

from utils.cli.args import (SERVICE_THREADS_HELP, Parser, add_dash_aliases, add_model_arguments, add_version_argument,
                            non_negative_float, non_negative_int, positive_float, positive_int)
from utils.base.cpus import service_threads
from utils.base.errors import OmniError

EPILOG = """examples:
  python serve.py --ckpt_dir checkpoints/demo --port 8080
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "muomni", "messages": [{"role": "user", "content": "What is 3 plus 4?"}]}'
  python serve.py --ckpt_dir checkpoints --host 0.0.0.0 --api_key "$(cat key.txt)" --max_batch 32

exit status: 0 after a requested stop (SIGTERM, SIGHUP, Ctrl-C), 1 on an error (one `error:` line), 2 usage error,
130 / 143 / 129 for a signal during the model load."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="serve.py", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "Checkpoint directory: a trainers' checkpoints/ root, an omni_sft dir, a merged export "
                           "or one weights file (as infer_chat.py).", SERVICE_THREADS_HELP)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="Address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it).")
    g.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one).")
    g.add_argument("--api_key", default=None, metavar="KEY",
                   help="Require 'Authorization: Bearer KEY' on every /v1 route (UTF-8; not empty, no control "
                        "characters or whitespace at either end).")
    g.add_argument("--model_name", default="muomni", metavar="NAME",
                   help="The model id /v1/models lists and requests name (default muomni).")
    g.add_argument("--max_batch", type=positive_int, default=16, metavar="N",
                   help="Rows decoded together (default 16); more requests wait in the queue.")
    g.add_argument("--max_queue", type=non_negative_int, default=64, metavar="N",
                   help="Requests that may wait for a row (default 64); past it the answer is 429 with "
                        "Retry-After.")
    g.add_argument("--max_body_mb", type=positive_float, default=32.0, metavar="MB",
                   help="Largest request body in MiB (default 32; larger is 413).")
    g.add_argument("--shutdown_timeout", type=non_negative_float, default=10.0, metavar="S",
                   help="On SIGTERM/SIGINT, seconds running answers may take to finish before they are cut "
                        "(default 10).")
    g.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"),
                   help="stderr log level (default info: one line per request with sizes and timings only).")
    g.add_argument("--no_webui", action="store_true",
                   help="Do not serve the chat page at / (the API routes stay).")
    g.add_argument("--verbose", action="store_true", help="Show Python tracebacks for errors.")
    add_version_argument(p, "serve.py")
    add_dash_aliases(p)
    return p


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so an address in use is one clear error, found at once."""
    if not 0 <= port <= 65535:
        raise OmniError(f"--port {port}: must be in 0..65535")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:  # socket.gaierror included
        raise OmniError(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})") from exc


def check_api_key(parser: argparse.ArgumentParser, key: str | None) -> None:
    """A key no client can send is a usage error, not a server that accepts `Bearer ` with nothing after it (an
    unset variable) or that nobody can reach (`$(cat key.txt)` of a CRLF file ends in \\r)."""
    if key is None:
        return
    if not key:
        parser.error("--api_key: the key is empty (an unset variable?); give a key or leave the flag out")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        parser.error("--api_key: the key is not valid UTF-8")
    if key != key.strip() or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in key):
        parser.error("--api_key: the key has control characters or whitespace at either end (a key read from a "
                     "file with CRLF line ends ends in \\r), which no client can send; remove them")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_api_key(parser, args.api_key)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        from omni import load_model
        from utils.server.app import OmniServer, ServerConfig, run_server
        sock = listen(args.host, args.port)
        model = load_model(args.ckpt_dir, device=args.device, dtype=args.dtype, quantize=args.quantize,
                           threads=service_threads(args.threads))
        if "thinker" not in model.components:
            raise OmniError(f"--ckpt_dir {args.ckpt_dir}: no thinker checkpoint found: nothing to chat with")
        logging.getLogger("muomni.server").info(
            "loaded %s in %.1f s on %s", ", ".join(model.components), model.load_seconds, model.device)
        engine = model.batch_engine(max_batch=args.max_batch, max_queue=args.max_queue)
        # the engine built and loaded its decode step (the C step where it applies) before any request
        print(f"decode kernel = {engine.kernel}", file=sys.stderr, flush=True)
        config = ServerConfig(model_id=args.model_name, api_key=args.api_key,
                              max_body_bytes=int(args.max_body_mb * 2 ** 20), shutdown_timeout=args.shutdown_timeout,
                              webui=not args.no_webui)
        run_server(OmniServer(model, engine, config), sock, args.log_level)
    except OmniError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
