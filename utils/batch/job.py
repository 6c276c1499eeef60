"""Batch jobs as data: requests in (JSON Lines, or audio files to transcribe), one record per request out, in input
order, and an append-only journal so that a job killed halfway continues where it stopped (`--resume`) without
redoing or repeating a line.

The model is passed in (anything with omni.OmniModel's `answer_batch` / `transcribe`), so this module stays below
omni.py; the engines that drive it (in-process, or Ray Data actors) are in utils/batch/main.py, and
infer_chat.py's --batch_file reads and answers its lines through the same functions. Torch-free, so the CLIs'
usage errors stay fast.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, TextIO

from utils.base.errors import OmniError
from utils.cli.console import Out

BATCH_PATH_KEYS = ("image", "audio_in", "audio", "video")  # request keys holding a file path ("audio": an alias)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")  # what `--task transcribe` picks from a directory
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # ... and `--task ocr`
TASKS = ("chat", "ocr")  # a request's "task": answer it, or read its image's text (with "text": answer on it)
JOURNAL_FORMAT = "muomni-batch-journal/1"
MAX_BATCH_FILE_BYTES = 64 << 20  # a batch file is read whole: bounded
MAX_JOURNAL_BYTES = 1 << 30  # and so is a journal (its records hold token ids: larger than the requests)


@dataclass
class Row:
    """One request of a batch job."""
    line: int                       # 1-based: the line in the JSON Lines file, or the place in the file list
    id: Any                         # the request's "id", else `line`
    request: dict[str, Any] | None  # the request as given (paths made absolute); None when the line is unusable
    error: str | None = None        # why the line is unusable

    def to_json(self) -> str:
        """ASCII JSON (Ray's datasets hold valid UTF-8 only: an id with a lone surrogate travels escaped)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Row":
        return cls(**json.loads(text))


# ---------------------------------------------------------------- reading requests

def parse_request(number: int, line: str, base: Path) -> Row:
    """One JSON Lines request. Relative media paths resolve against the current directory, else against `base`
    (the batch file's directory), and are made absolute so that any process can open them."""
    try:
        obj = json.loads(line)
    except RecursionError:
        return Row(number, number, None, "not valid JSON (nested too deeply)")
    except ValueError as exc:  # JSONDecodeError, or an integer beyond Python's digit limit
        return Row(number, number, None, f"not valid JSON ({exc})")
    if not isinstance(obj, dict):
        return Row(number, number, None, f"expected a JSON object, found {type(obj).__name__}")
    rid = obj.get("id", number)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return Row(number, number, None, "id must be a string or an integer")
    bad = [k for k in ("text", "prompt", "task", *BATCH_PATH_KEYS) if k in obj and not isinstance(obj[k], str)]
    if bad:
        return Row(number, rid, None, f"{bad[0]} must be a string")
    if obj.get("task", "chat") not in TASKS:
        return Row(number, rid, None, f"task {obj['task']!r}: use {' or '.join(TASKS)}")
    if obj.get("task") == "ocr" and "image" not in obj:
        return Row(number, rid, None, "task ocr needs an \"image\"")
    for key in BATCH_PATH_KEYS:
        if key in obj:
            path = Path(obj[key])
            if not path.is_absolute():
                path = path if path.exists() or not (base / path).exists() else base / path
            obj[key] = os.path.abspath(path)
    return Row(number, rid, obj)


def read_batch_file(path: str | os.PathLike, flag: str = "--batch_file") -> list[Row]:
    """A Row for each non-blank line of a JSON Lines file (blank lines keep their numbers but yield nothing): a
    regular file of at most MAX_BATCH_FILE_BYTES (a FIFO or /dev/zero is refused unread)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise OmniError(f"{flag} {path}: not a regular file")
        if st.st_size > MAX_BATCH_FILE_BYTES:
            raise OmniError(f"{flag} {path}: {st.st_size:,} bytes, over the limit of {MAX_BATCH_FILE_BYTES:,}")
        with open(path, "rb") as f:
            text = f.read(MAX_BATCH_FILE_BYTES).decode("utf-8", errors="replace")
    except OSError as exc:
        raise OmniError(f"{flag} {path}: cannot read ({exc.strerror or exc})") from exc
    base = Path(path).resolve().parent
    return [parse_request(n, line, base) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def file_rows(paths: Iterable[str | os.PathLike], task: str) -> list[Row]:
    """`--task transcribe` / `--task ocr` inputs: each file as given, each directory's audio (AUDIO_SUFFIXES) or
    image files (IMAGE_SUFFIXES), recursively, in sorted order. The id is the path as the user wrote it (or the
    directory joined with the file's place)."""
    suffixes, kind = (AUDIO_SUFFIXES, "audio") if task == "transcribe" else (IMAGE_SUFFIXES, "image")
    rows: list[Row] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
            if not found:
                raise OmniError(f"{given}: no {kind} files ({', '.join(suffixes)}) in this directory")
        elif path.exists():
            found = [path]
        else:
            raise OmniError(f"{given}: not found")
        request = (lambda p: {"audio_in": os.path.abspath(p)}) if task == "transcribe" else \
            (lambda p: {"task": "ocr", "image": os.path.abspath(p)})
        rows += [Row(len(rows) + k + 1, str(p), request(p)) for k, p in enumerate(found)]
    return rows


def job_key(rows: list[Row], settings: dict[str, Any]) -> str:
    """What makes two runs the same job: the requests and everything that changes an answer (not the engine, the
    worker count or the batch size: greedy answers do not depend on them). A journal of another job is refused."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for row in rows:
        digest.update(json.dumps(asdict(row), ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
        if row.request is not None and "audio_in" in row.request and len(row.request) == 1:
            try:  # transcription inputs: a changed file is another job (size and time, not the bytes)
                st = os.stat(row.request["audio_in"])
                digest.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
            except OSError:
                pass
    return digest.hexdigest()


# ---------------------------------------------------------------- media shipped in the dataset (--inline_media)

def inline_media(row: Row) -> dict[str, list[str]]:
    """{key: [path, base64 bytes]} for each media file of `row` the driver can read; a file it cannot read is
    left as a path, so the worker reports it exactly as the local engine would."""
    media = {}
    for key in BATCH_PATH_KEYS:
        path = (row.request or {}).get(key)
        if path is None:
            continue
        try:
            media[key] = [path, base64.b64encode(Path(path).read_bytes()).decode("ascii")]
        except OSError:
            continue
    return media


class MaterializedMedia:
    """Inline media written to temporary files for the duration of a batch (the loaders read paths); error
    messages name the original paths."""

    def __init__(self, rows: list[Row], media: list[dict[str, list[str]]]) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="muomni-batch-") if any(media) else None
        self.names: dict[str, str] = {}
        for k, (row, files) in enumerate(zip(rows, media)):
            for key, (original, data) in files.items():
                tmp = os.path.join(self.dir.name, f"{k}-{key}{Path(original).suffix}")
                Path(tmp).write_bytes(base64.b64decode(data))
                row.request = {**row.request, key: tmp}
                self.names[tmp] = original

    def restore(self, record: dict[str, Any]) -> dict[str, Any]:
        if "error" in record:
            for tmp, original in self.names.items():
                record["error"] = record["error"].replace(tmp, original)
        return record

    def close(self) -> None:
        if self.dir is not None:
            self.dir.cleanup()


# ---------------------------------------------------------------- answering

def answer_rows(model: Any, rows: list[Row], gen: dict[str, Any]) -> list[dict[str, Any] | OmniError]:
    """For each row, its answer's JSON (omni.Answer.to_json, plus "warnings" when there are any) or the OmniError
    that stopped it. The usable requests are decoded together in one batch (model.answer_batch). A "task": "ocr"
    row gets its image's OCR fields (omni.ocr_fields); with a "text", also the answer to it with the image's text
    joined into the prompt (omni.ocr_prompt), as infer_chat.py --ocr --text does."""
    from omni import ocr_fields, ocr_prompt  # the model's own module: loaded already
    results: list[dict[str, Any] | OmniError] = [OmniError(row.error) for row in rows]  # for unusable rows
    ocr: dict[int, dict[str, Any]] = {}
    chat: dict[int, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        if row.request is None:
            continue
        request = {k: v for k, v in row.request.items() if k not in ("id", "task")}
        if row.request.get("task") == "ocr":
            try:
                found = model.ocr(request["image"])
            except OmniError as exc:
                results[i] = exc
                continue
            ocr[i] = ocr_fields([found])
            if request.get("text") is None:
                results[i] = ocr[i]
                continue
            request["text"] = ocr_prompt(request["text"], [found.text])
        chat[i] = request
    failed: dict[int, OmniError] = {}
    answers = model.answer_batch(list(chat.values()), batch_size=max(1, len(chat)), on_error=failed.__setitem__,
                                 **gen) if chat else []
    for k, (i, ans) in enumerate(zip(chat, answers)):
        results[i] = failed[k] if ans is None else \
            {**ans.to_json(), **ocr.get(i, {}), **({"warnings": ans.warnings} if ans.warnings else {})}
    return results


def transcribe_rows(model: Any, rows: list[Row]) -> list[dict[str, Any] | OmniError]:
    """For each row, {"text", "segments", "timing"} of its greedy CTC transcript (the text a string, as in chat
    records; the segments with their timestamps beside it, as in transcription's JSON), or the OmniError that
    stopped it."""
    results: list[dict[str, Any] | OmniError] = []
    for row in rows:
        if row.request is None:
            results.append(OmniError(row.error))
            continue
        t0 = time.perf_counter()
        try:
            result = model.transcribe(row.request["audio_in"])
        except OmniError as exc:
            results.append(exc)
            continue
        results.append({"text": result["text"], "segments": result["segments"],
                        "timing": {"transcribe_s": round(time.perf_counter() - t0, 6)}})
    return results


def record(row: Row, result: dict[str, Any] | OmniError) -> dict[str, Any]:
    """The output line of one request: {"line", "id", answer keys} or {"line", "id", "error"}."""
    if isinstance(result, OmniError):
        return {"line": row.line, "id": row.id, "error": str(result)}
    return {"line": row.line, "id": row.id, **result}


def process_rows(model: Any, rows: list[Row], task: str, gen: dict[str, Any]) -> list[dict[str, Any]]:
    """The output records of a batch of rows, in order: what each engine runs per batch."""
    results = transcribe_rows(model, rows) if task == "transcribe" else answer_rows(model, rows, gen)  # ocr: as chat
    return [record(row, result) for row, result in zip(rows, results)]


# ---------------------------------------------------------------- journal and output

def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_records(stream: TextIO, records: Iterable[dict[str, Any]]) -> None:
    """One JSON line per record; text that is not valid UTF-8 (a lone surrogate in an id, a file name's undecodable
    bytes) is written as JSON escapes, as on the CLI's stdout."""
    out = Out(stream)
    for rec in records:
        out.json(rec)


class Journal:
    """`OUTPUT.journal`: a header naming the job, then each finished record, appended and flushed (fsync) once
    per batch. It is also the job's lock (flock, held until the job ends): one run per output at a time. Reopened
    by --resume, it is checked, never trusted: every complete line must be a record of one of this job's input
    lines (its line number and id), else it is refused unchanged. Records are keyed by line, so a record written
    twice counts once; a last line torn by a kill mid-write is dropped."""

    def __init__(self, output: Path, key: str, rows: list[Row]) -> None:
        self.path = output.with_name(output.name + ".journal")
        self.output = output
        self.key = key
        self.ids = {row.line: row.id for row in rows}
        self.done: dict[int, dict[str, Any]] = {}
        self.file: TextIO | None = None

    def open(self, resume: bool) -> dict[int, dict[str, Any]]:
        """Lock the journal, start it (or, with `resume`, reload it) and return the records already finished."""
        fd = self._lock()
        try:
            size = os.fstat(fd).st_size
            if size and not resume:
                raise OmniError(f"{self.path}: left by an interrupted run; rerun it with --resume to continue it, "
                                f"or delete this file to start over")
            good = self._load(fd, size) if size else 0
            os.ftruncate(fd, good)  # the torn last line, if any
            self.file = open(fd, "a", encoding="utf-8", closefd=True)
            fd = -1
            if not good:
                self.file.write(json.dumps({"journal": JOURNAL_FORMAT, "job": self.key}) + "\n")
                self._sync()
        except OSError as exc:
            self.close()
            raise OmniError(f"{self.path}: cannot write the journal ({exc.strerror or exc})") from exc
        except BaseException:
            self.close()
            raise
        finally:
            if fd >= 0:
                os.close(fd)
        return self.done

    def _lock(self) -> int:
        """The journal's descriptor, locked for this run: a regular file (a FIFO or a device is refused unread)
        that no other run holds."""
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OmniError(f"{self.path}: cannot open the journal ({exc.strerror or exc})") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OmniError(f"{self.path}: not a regular file, so not a batch journal; remove it to start over")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except (BlockingIOError, FileNotFoundError):
                same = False
            if not same:  # locked by a running job, or removed by one that just finished
                raise OmniError(f"--output {self.output}: this job is already running (another batch.py holds its "
                                f"journal {self.path}); wait for it to end")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _load(self, fd: int, size: int) -> int:
        """Check the journal and take its records; returns the length of its complete lines."""
        if size > MAX_JOURNAL_BYTES:
            raise OmniError(f"{self.path}: {size:,} bytes, over the limit of {MAX_JOURNAL_BYTES:,} for a journal; "
                            f"delete it to start over")
        data = os.pread(fd, size, 0)
        good = data.rfind(b"\n") + 1  # a kill mid-write leaves at most one unterminated line
        lines = data[:good].split(b"\n")[:-1]
        try:
            header = json.loads(lines[0].decode("utf-8")) if lines else None
        except (ValueError, RecursionError):
            header = None
        if not isinstance(header, dict) or header.get("journal") != JOURNAL_FORMAT:
            raise OmniError(f"{self.path}: not a μOmni batch journal (delete it to start over)")
        if header.get("job") != self.key:
            raise OmniError(f"{self.path}: written for a different job (the input, the model or the generation "
                            f"options changed); delete it to start over")
        for number, raw in enumerate(lines[1:], 2):
            rec = self._record(raw)
            if isinstance(rec, str):
                raise OmniError(f"{self.path}, line {number}: {rec}: not a record of this job (delete the journal to "
                                f"start over)")
            self.done.setdefault(rec["line"], rec)
        return good

    def _record(self, raw: bytes) -> dict[str, Any] | str:
        """The record on one journal line, or what is wrong with it."""
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return "not valid UTF-8"
        except RecursionError:
            return "not valid JSON (nested too deeply)"
        except ValueError as exc:
            return f"not valid JSON ({exc})"
        if not isinstance(rec, dict):
            return f"expected a JSON object, found {type(rec).__name__}"
        line = rec.get("line")
        if type(line) is not int:
            return 'no input line number ("line")'
        if line not in self.ids:
            return f"input line {line} is not one of this job's requests"
        want, got = self.ids[line], rec.get("id")
        if type(got) is not type(want) or got != want:
            shown = json.dumps(got)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."  # a forged id may be any size
            return f"the record of input line {line} has id {shown}, that line's id is {json.dumps(want)}"
        if not isinstance(rec.get("error", rec.get("text")), str):
            return 'neither an answer ("text") nor an "error"'
        return rec

    def _sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def append(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Journal the records not seen before; returns them."""
        new = [r for r in records if r["line"] not in self.done]
        for rec in new:
            self.done[rec["line"]] = rec
        write_records(self.file, new)
        self._sync()
        return new

    def finish(self, output: Path) -> None:
        """Write every record, in line order, to `output` atomically (temp file, then rename); then drop the
        journal (and with it the lock). Killed before the rename, the journal is still there for --resume."""
        tmp = temp_name(output)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                write_records(f, (self.done[line] for line in sorted(self.done)))
                os.fsync(f.fileno())
            os.replace(tmp, output)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OmniError(f"{output}: cannot write ({exc.strerror or exc})") from exc
        self.path.unlink()
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
