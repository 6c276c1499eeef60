"""batch.py: one batch job, on this machine or on a Ray cluster.

Requests come from a JSON Lines file (as infer_chat.py --batch_file) or, with --task transcribe, from audio files
and directories. Records go to --output in input order, written atomically at the end; finished records are
journaled per batch beside it (OUTPUT.journal), so a killed job continues with --resume; the journal is checked
record by record when it is reopened, and locked while a run holds it (one run per output at a time).

--engine local answers in this process with the batched generation (omni.OmniModel.answer_batch).
--engine ray builds a Ray Data pipeline: the requests become a dataset, `map_batches` runs RayWorker, a callable
class whose actors each load the model once (ActorPoolStrategy, `--workers` of them); Ray restarts an actor that
dies and retries its batch (max_restarts / max_task_retries). No scheduling or retrying of our own.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from utils.batch.job import (Journal, MaterializedMedia, Row, file_rows, inline_media, job_key, process_rows,
                             read_batch_file, record)
from utils.cli.args import (SERVICE_THREADS_HELP, Parser, add_dash_aliases, add_generation_arguments,
                            add_model_arguments, add_version_argument, check_format_flags, generation_options,
                            non_negative_float, non_negative_int, positive_float, positive_int, run_command)
from utils.cli.console import Console
from utils.base.cpus import service_threads
from utils.base.errors import OmniError, Terminated

ROOT = Path(__file__).resolve().parents[2]
# What a Ray worker imports of this checkout (omni.py and the layers below it): shipped to every node as the
# job's working_dir. Weights and media are not shipped: the workers read them from paths they can see.
WORKER_CODE = ("omni.py", "utils", "models")
RAY_ONLY = ("ray_address", "workers", "cpus_per_worker", "gpus_per_worker", "max_retries")

EPILOG = """examples:
  # answer every line of a JSON Lines file on this machine
  python batch.py --ckpt_dir checkpoints/demo requests.jsonl -o answers.jsonl
  # the same job on a local Ray instance (started and stopped by batch.py), 2 workers
  python batch.py --ckpt_dir checkpoints/demo requests.jsonl -o answers.jsonl --engine ray --workers 2
  # on an existing cluster (`ray start --head` on one machine, `ray start --address=HEAD:6379` on the others)
  python batch.py --ckpt_dir /shared/ckpt /shared/requests.jsonl -o answers.jsonl --engine ray --ray_address auto
  # transcribe a directory of recordings
  python batch.py --ckpt_dir checkpoints/demo --task transcribe recordings/ -o transcripts.jsonl
  # continue a job that was killed or interrupted
  python batch.py --ckpt_dir checkpoints/demo requests.jsonl -o answers.jsonl --resume

request lines: {"text": ..., "image": PATH, "audio_in": PATH, "video": PATH, "prompt": ..., "id": ...} (all
optional; relative paths against the current directory, else the file's). Output lines, in input order:
{"line", "id", "text", "token_ids", "prompt_tokens", "generated_tokens", "timing"} (transcription: {"line", "id",
"text", "segments", "timing"}) or {"line", "id", "error"}; "id" is the request's id, else its line number
(transcription: the audio path).
With --engine ray the workers open the checkpoint and the media themselves: those paths must be visible to every
worker (the same path on a shared filesystem), or use --inline_media to ship the media bytes in the dataset.
exit status: 0 every line answered, 1 a line failed (its record has "error") or the job failed, 2 usage error,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM); either way the finished lines are kept for --resume."""


# ---------------------------------------------------------------- arguments

def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="A JSON Lines file of requests; with --task transcribe, audio files and directories; with "
                        "--task ocr, image files and directories.")
    p.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="Where the JSON Lines records go (written atomically when the job is complete).")
    p.add_argument("--task", choices=("chat", "transcribe", "ocr"), default="chat",
                   help="chat (default): answer each request (a request with \"task\": \"ocr\" reads its image's "
                        "text); transcribe: the CTC transcript of each audio file; ocr: the text of each image "
                        "(ocr_text, ocr_ids, ocr_stop).")
    p.add_argument("--resume", action="store_true",
                   help="Continue an interrupted job from OUTPUT.journal: finished lines are not redone.")

    add_model_arguments(p, "Checkpoint directory or merged export (as infer_chat.py); with --engine ray every "
                           "worker opens it, so it must be visible to them under the same path.", SERVICE_THREADS_HELP)

    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (default): this process; ray: a Ray Data pipeline of model-loading actors.")
    g.add_argument("--batch_size", type=positive_int, default=8, metavar="N",
                   help="Requests decoded together (and journaled together) per batch (default 8).")
    g.add_argument("--ray_address", metavar="ADDR",
                   help="The Ray cluster: auto (the one `ray start` runs on this machine) or HOST:PORT. Default: "
                        "$RAY_ADDRESS, else a local Ray instance started for this job.")
    g.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="Ray actors, each holding one copy of the model (default: the cluster's CPUs / "
                        "--cpus_per_worker).")
    g.add_argument("--cpus_per_worker", type=positive_float, default=None, metavar="N",
                   help="CPUs Ray reserves for each actor (default 1; also its torch threads).")
    g.add_argument("--gpus_per_worker", type=non_negative_float, default=None, metavar="N",
                   help="GPUs Ray reserves for each actor (default 0; e.g. 1 with --device cuda).")
    g.add_argument("--max_retries", type=non_negative_int, default=None, metavar="N",
                   help="Times Ray restarts a dead actor and retries its batch (default 3).")
    g.add_argument("--inline_media", action="store_true",
                   help="Ship the media files' bytes in the dataset instead of their paths (for workers that "
                        "cannot see the driver's files).")

    add_generation_arguments(p)  # as infer_chat.py; a seeded row samples the same however lines are batched

    g = p.add_argument_group("messages")
    g.add_argument("--quiet", action="store_true", help="Print nothing on stderr except errors.")
    g.add_argument("--verbose", action="store_true", help="Show Ray's logs and Python tracebacks.")
    add_version_argument(p, prog)
    add_dash_aliases(p)
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors argparse cannot express (exit 2)."""
    if args.task == "chat" and len(args.inputs) != 1:
        parser.error("--task chat reads one JSON Lines file (several inputs are for --task transcribe or ocr)")
    flag = check_format_flags(parser, args)
    if args.task != "chat" and flag:
        parser.error(f"{flag} is for --task chat")
    if args.engine != "ray":
        given = [f"--{name}" for name in RAY_ONLY if getattr(args, name) is not None]
        if args.inline_media:
            given.append("--inline_media")
        if given:
            parser.error(f"{', '.join(given)} need --engine ray")
    if args.quiet and args.verbose:
        parser.error("--quiet and --verbose cannot be combined")


def check_output(given: str, inputs: list[str]) -> Path:
    """Fail before any work when the output cannot be written where asked (the CLI's checks for --audio_out:
    this program's stdout or stderr, a directory, ...), is not a regular file (a terminal, a pipe, a device: the
    records are renamed into place, which would replace it) or would overwrite an input. Returns the path to
    write: a symlink's target, so the link stays a link."""
    from omni import check_output_path

    path = check_output_path(given, "--output")
    if path.exists() and not path.is_file():
        raise OmniError(f"--output {given}: not a regular file (a terminal, a pipe or a device); give a file path")
    for name in inputs:
        if path.exists() and Path(name).exists() and path.samefile(name):
            raise OmniError(f"--output {given}: is the input {name}")
    return path


# ---------------------------------------------------------------- engines

def run_local(args: argparse.Namespace, rows: list[Row], gen: dict[str, Any], con: Console,
              finished: Callable[[list[dict[str, Any]]], None]) -> str:
    """Answer in this process, --batch_size rows at a time."""
    from omni import load_model

    con.status(f"loading μOmni from {args.ckpt_dir} ...")
    model = load_model(args.ckpt_dir, device=args.device, dtype=args.dtype, quantize=args.quantize,
                       threads=service_threads(args.threads))
    if args.task == "chat":  # the decode step built and loaded before the first batch (--decode_kernel c: or fail)
        con.info(f"decode kernel = {model.decode_kernel(args.decode_kernel or 'auto')}")
    for lo in range(0, len(rows), args.batch_size):
        finished(process_rows(model, rows[lo:lo + args.batch_size], args.task, gen))
    return f"engine local, {model.device}"


class RayWorker:
    """The Ray Data actor: loads the model once, then turns each batch of rows into their records."""

    def __init__(self, ckpt_dir: str, device: str, dtype: str | None, quantize: str | None, task: str,
                 gen: dict[str, Any]) -> None:
        from omni import load_model

        self.model = load_model(ckpt_dir, device=device, dtype=dtype, quantize=quantize)
        self.task, self.gen = task, gen
        if task == "chat":  # as run_local: the decode step built before the actor takes a batch
            self.model.decode_kernel(gen.get("decode_kernel", "auto"))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        rows = [Row.from_json(text) for text in batch["row"]]
        media = MaterializedMedia(rows, [json.loads(text) for text in batch["media"]])
        try:
            records = [media.restore(rec) for rec in process_rows(self.model, rows, self.task, self.gen)]
        finally:
            media.close()
        return {"record": [json.dumps(rec) for rec in records]}  # ASCII: Ray's strings are valid UTF-8 only


def ray_failure(exc: Exception) -> str:
    """What stopped a Ray job, in one line: the worker's OmniError (e.g. a checkpoint it cannot load; Ray passes
    it on as text inside its own error), else the first line of Ray's message."""
    found = re.findall(r"OmniError: (.+)", str(exc))
    return found[-1] if found else str(exc).splitlines()[0]


def stage_code(where: str) -> str:
    """Copy WORKER_CODE into `where` (a directory Ray packs and ships) and return it."""
    for name in WORKER_CODE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, Path(where) / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, Path(where) / name)
    return where


def run_ray(args: argparse.Namespace, rows: list[Row], gen: dict[str, Any], con: Console,
            finished: Callable[[list[dict[str, Any]]], None]) -> str:
    # Ray prints its workers' failures on stdout; batch.py's stdout carries no answers, but keep it clean anyway
    with tempfile.TemporaryDirectory(prefix="muomni-batch-code-") as code_dir, \
            contextlib.redirect_stdout(sys.stderr):
        return run_pipeline(args, rows, gen, con, finished, code_dir)


def run_pipeline(args: argparse.Namespace, rows: list[Row], gen: dict[str, Any], con: Console,
                 finished: Callable[[list[dict[str, Any]]], None], code_dir: str) -> str:
    """A Ray Data pipeline: rows -> map_batches(RayWorker) on an actor pool -> records streamed back here."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise OmniError(f"--engine ray needs Ray Data ({exc}): pip install -r requirements.txt") from exc

    unusable = [row for row in rows if row.request is None]  # no worker needed to report these
    if unusable:
        finished([record(row, OmniError(row.error)) for row in unusable])
    rows = [row for row in rows if row.request is not None]
    if not rows:
        return "engine ray (nothing left for the workers)"
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or "local"  # "local": a new private instance
    options: dict[str, Any] = {"address": address, "logging_level": logging.WARNING, "log_to_driver": args.verbose,
                               "runtime_env": {"working_dir": stage_code(code_dir)}}
    if address == "local":
        options["include_dashboard"] = False
    con.status("starting a local Ray instance ..." if address == "local" else f"connecting to Ray at {address} ...")
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise OmniError(f"--ray_address {address}: "
                        f"cannot start or reach Ray ({str(exc).splitlines()[0]}; a cluster with token "
                        f"authentication also needs RAY_AUTH_MODE=token here)") from exc
    finally:  # ray.init puts in its own SIGTERM handler (sys.exit): the process's policy stays ours
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        cpus = args.cpus_per_worker or 1.0
        workers = args.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
        retries = 3 if args.max_retries is None else args.max_retries
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts lines
        context.print_on_execution_start = False
        # Ray Data's log (a warning that its bars are off, a stack trace when the job fails) only with --verbose:
        # our bar counts the lines, and a failure ends in one `error:` line
        logging.getLogger("ray.data").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
        items = [{"row": row.to_json(), "media": json.dumps(inline_media(row) if args.inline_media else {})}
                 for row in rows]
        blocks = math.ceil(len(items) / args.batch_size)
        workers = min(workers, blocks)  # an actor with no batch to run would only load the model
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        with warnings.catch_warnings():
            # Ray 2.60 names no other way to bound an actor pool's restarts and retries than these
            # "ray_remote_args" (deprecated for 2.64); its default, unbounded, would retry a crashing line forever
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(
                RayWorker, batch_size=args.batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
                fn_constructor_kwargs={"ckpt_dir": os.path.abspath(args.ckpt_dir), "device": args.device,
                                       "dtype": args.dtype, "quantize": args.quantize, "task": args.task,
                                       "gen": gen},
                num_cpus=cpus, num_gpus=args.gpus_per_worker or 0, max_restarts=retries, max_task_retries=retries)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                finished([json.loads(text) for text in batch["record"]])
        except ray.exceptions.RayError as exc:
            raise OmniError(f"the Ray job failed: {ray_failure(exc)}") from exc
    finally:
        ray.shutdown()
    return f"engine ray, {workers} worker{'s' if workers != 1 else ''}"


# ---------------------------------------------------------------- the job

def run(args: argparse.Namespace, con: Console) -> int:
    t0 = time.perf_counter()
    output = check_output(args.output, args.inputs)
    rows = read_batch_file(args.inputs[0], flag="INPUT") if args.task == "chat" else file_rows(args.inputs, args.task)
    if not rows:
        con.warn(f"{args.inputs[0]}: no requests in it")
    gen = generation_options(args) if args.task == "chat" else {}
    journal = Journal(output, job_key(rows, {"task": args.task, "ckpt_dir": os.path.abspath(args.ckpt_dir),
                                              "dtype": args.dtype, "quantize": args.quantize, "gen": gen}),
                      rows)
    done = journal.open(args.resume)
    pending = [row for row in rows if row.line not in done]
    resumed = len(rows) - len(pending)
    from tqdm import tqdm

    bar = tqdm(total=len(rows), initial=resumed, unit="line", desc="batch", file=con.err,
               disable=not con.progress_enabled)
    new_records: list[dict[str, Any]] = []

    def finished(records: list[dict[str, Any]]) -> None:
        new = journal.append(records)
        new_records.extend(new)
        with tqdm.external_write_mode(file=con.err):
            for rec in new:
                if "error" in rec:
                    con.error(f"line {rec['line']}: {rec['error']}")
                for note in rec.get("warnings", []):
                    con.warn(f"line {rec['line']}: {note}")
        bar.update(len(new))

    engine = "nothing left to do"
    try:
        if pending:
            engine = (run_ray if args.engine == "ray" else run_local)(args, pending, gen, con, finished)
        missing = len(rows) - len(done)
        if missing:
            raise OmniError(f"the {args.engine} engine returned no record for {missing} line(s)")
        journal.finish(output)
    except BaseException as exc:
        if not done:
            journal.path.unlink(missing_ok=True)  # nothing to resume (removed while still locked: no other run's)
        elif isinstance(exc, (OmniError, KeyboardInterrupt, Terminated)):
            con.info(f"{len(done)} of {len(rows)} lines are kept in {journal.path}: rerun with --resume to continue")
        raise
    finally:
        journal.close()
        bar.close()
    seconds = time.perf_counter() - t0
    errors = sum("error" in rec for rec in done.values())
    tokens = sum(rec.get("generated_tokens", 0) for rec in new_records)
    con.info(f"batch: {len(rows)} lines ({resumed} from the journal), {errors} error{'s' if errors != 1 else ''}; "
             f"{len(new_records)} done in {seconds:.1f} s: {len(new_records) / seconds:.2f} lines/s"
             + (f", {tokens / seconds:.1f} tokens/s" if args.task == "chat" else "")
             + f" ({engine}); wrote {output}")
    return 1 if errors else 0


def main(argv: Sequence[str] | None, prog: str, description: str) -> int:
    return run_command(lambda: build_parser(prog, description), check_args, run, argv)
