"""Console output of the command-line apps: stdout for answers (`Out`), stderr for messages (`Console`: status,
warnings, errors, tqdm progress on a terminal), Python warnings routed there, UTF-8 streams, and the formatting of
timing summaries and the model card; `guarded` turns an app's outcome into its exit status."""
from __future__ import annotations

import json
import sys
import traceback
import warnings
from typing import TYPE_CHECKING, Any, Callable, TextIO

from utils.base.errors import OmniError, Terminated, interrupt_status, one_line, quiet_stdout

if TYPE_CHECKING:
    from omni import Answer


def print_timings(con: "Console", ans: Answer) -> None:
    """llama.cpp's end-of-answer summary, on stderr: load, prompt eval and eval (decode steps)."""
    t = ans.timing
    prefill_ms, decode_ms, steps = t["prefill_s"] * 1000, t["decode_s"] * 1000, t.get("decode_steps", 0)

    def rate(ms: float, n: int, unit: str) -> str:
        per = f"{ms / n:8.2f} ms per token, {n * 1000 / ms:9.2f} tokens per second" if n and ms > 0 else \
            "no tokens timed"
        return f"{ms:10.2f} ms / {n:5d} {unit} ({per})"
    con.always(f"timings:        load time = {t['load_s'] * 1000:10.2f} ms")
    con.always(f"timings: prompt eval time = {rate(prefill_ms, ans.prompt_tokens, 'tokens')}")
    con.always(f"timings:        eval time = {rate(decode_ms, steps, 'runs  ')}")
    con.always(f"timings:       total time = {prefill_ms + decode_ms:10.2f} ms / "
               f"{ans.prompt_tokens + ans.generated_tokens:5d} tokens")
    if "decode_kernel" in t:
        con.always(f"timings:    decode kernel = {t['decode_kernel']}")


# ---------------------------------------------------------------- stderr

class Console:
    """stderr messages: info and warnings unless --quiet; errors always. Loading chatter (`status`) only on a
    terminal or with --verbose, so a script's stderr holds just warnings and the one `error:` line."""

    def __init__(self, quiet: bool, err: TextIO | None = None, verbose: bool = False) -> None:
        self.quiet = quiet
        self.verbose = verbose
        self.err = err or sys.stderr

    def status(self, msg: str) -> None:
        if self.verbose or (not self.quiet and self.err.isatty()):
            print(msg, file=self.err, flush=True)

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.err, flush=True)

    def warn(self, msg: str) -> None:
        self.info(f"warning: {one_line(msg)}")

    def error(self, msg: str) -> None:
        print(f"error: {one_line(msg)}", file=self.err, flush=True)

    def always(self, msg: str) -> None:
        """Output the user asked for on stderr (--timings): shown even with --quiet."""
        print(msg, file=self.err, flush=True)

    @property
    def progress_enabled(self) -> bool:
        return not self.quiet and self.err.isatty()

    def progress(self, total: int, desc: str):
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="step", file=self.err, leave=False,
                    disable=not self.progress_enabled)


def route_warnings(con: Console) -> None:
    """Python warnings become one `warning:` line on stderr (none with --quiet)."""
    if con.quiet:
        warnings.simplefilter("ignore")
        return

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        con.warn(str(message))
    warnings.showwarning = show


# ---------------------------------------------------------------- output

class Out:
    """stdout, flushed after every write (answers stream as they are generated)."""

    def __init__(self, stream: TextIO | None = None, one_line: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.one_line = one_line  # pipe mode: an answer never spans lines

    def write(self, text: str) -> None:
        if self.one_line:
            text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
        self.stream.write(text)
        self.stream.flush()

    def line(self, text: str = "") -> None:
        self.write(text)
        self.stream.write("\n")
        self.stream.flush()

    def json(self, obj: dict[str, Any]) -> None:
        text = json.dumps(obj, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (a non-UTF-8 file name, "\ud800" in a request): JSON escapes
            text = json.dumps(obj)
        self.stream.write(text + "\n")
        self.stream.flush()


def format_card(card: dict[str, Any]) -> str:
    """The human-readable model card (`--info` without --json)."""
    rows = [("path", card["path"]), ("format", card["format"])]
    for name, comp in card["components"].items():
        rows.append((name, f"{comp['parameters']:,} parameters"))
        rows.append(("  weights", comp["weights"]))
        rows.append(("  config", comp["config"]))
    rows.append(("parameters", f"{card['parameters']:,} in all"))
    if "thinker" in card:
        t = card["thinker"]
        rows.append(("architecture", f"{t['layers']} layers, d_model {t['d_model']}, {t['heads']} heads "
                                     f"({t['kv_heads']} KV), {t['ffn']} FFN d_ff {t['d_ff']}"
                                     + (f", {t['experts']} experts" if t["experts"] else "")
                                     + f", rope_theta {t['rope_theta']:g}"))
    if "ocr" in card:
        o = card["ocr"]
        rows.append(("OCR", f"{o['img_size']} px images (patch {o['patch']}), ViT {o['vision_layers']} layers d_model "
                            f"{o['vision_d_model']}; decoder {o['decoder_layers']} layers d_model "
                            f"{o['decoder_d_model']}, {o['decoder_heads']} heads ({o['decoder_kv_heads']} KV), "
                            f"{o['ffn']} FFN; {o['vocabulary']} characters"))
    rows += [("dtype", card["dtype"]), ("device", card["device"]), ("context length", card["context_length"])]
    if "vocabulary" in card:
        v = card["vocabulary"]
        rows.append(("vocabulary", f"{v['tokenizer_pieces']} tokenizer pieces, {v['embedding_rows']} embedding rows "
                                   f"({v['tokenizer']})"))
    rows.append(("decode mode", card["decode_attention"]))
    rows.append(("defaults", ", ".join(f"{k} {v}" for k, v in card["generation_defaults"].items())))
    for name, where in card["missing"].items():
        rows.append((f"no {name}", f"searched {where}"))
    return "\n".join(f"{k:<16}{v}" for k, v in rows)


def utf8_streams() -> None:
    """Answers are Unicode whatever the locale says: read and write UTF-8."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        utf8 = (getattr(stream, "encoding", "") or "").lower().replace("-", "") == "utf8"
        if stream is not None and (stream is sys.stdin or not utf8):
            try:  # stdin: undecodable bytes become U+FFFD instead of a crash
                stream.reconfigure(encoding="utf-8", errors="replace")
            except (AttributeError, ValueError):
                pass


def guarded(run: Callable[[], int], con: Console, verbose: bool) -> int:
    """An app's exit status around `run`: bad input is one `error:` line and 1; Ctrl-C 130 and SIGTERM 143 (with
    utils.base.errors.handle_signals); a reader that went away (`| head -1`) a quiet 0; anything else, a bug or an
    environment problem, one line too, with the traceback only with --verbose."""
    try:
        return run()
    except OmniError as exc:
        if verbose:
            traceback.print_exc()
        con.error(str(exc))
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        con.info("interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc))
        return interrupt_status(exc)
    except BrokenPipeError:  # stop quietly, without a second error at interpreter exit
        quiet_stdout()
        return 0
    except Exception as exc:  # noqa: BLE001 - the last resort of a command line: never a bare traceback
        if verbose:
            traceback.print_exc()
        con.error(f"unexpected {type(exc).__name__}: {exc}" + ("" if verbose else
                                                              " (run with --verbose for the traceback)"))
        return 1

