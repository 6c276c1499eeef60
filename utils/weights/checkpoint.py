"""Reading μOmni checkpoint files safely: weights-file lookup, unwrapping, `_orig_mod.` stripping, strict loads."""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.base.errors import OmniError, one_line

StateDict = dict[str, torch.Tensor]

# Wrapper keys the trainers use for each component, in the order they are tried.
WRAPPER_KEYS = {
    "thinker": ("model", "thinker"),
    "audio_encoder": ("enc",),
    "ctc_head": ("head",),
    "vision_encoder": ("vit",),
    "talker": ("talker",),
    "rvq": ("rvq",),
    "proj_a": ("proj_a",),
    "proj_v": ("proj_v",),
    "vocoder": ("generator",),
    "ocr": ("model",),
}


# What pathlib's is_file()/is_dir() take for "not there" (a dangling link or a loop included); any other failure
# to stat a path (EACCES: a directory on the way that may not be searched) is an error naming it.
ABSENT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP}


def path_mode(path: Path, what: str = "") -> int | None:
    """st_mode of `path` after symlinks, None when nothing is there. A path that exists but cannot be inspected is
    an OmniError naming it (after `what`, e.g. "--ckpt_dir"): taking it for absent would make a checkpoint or its
    config silently missing."""
    try:
        return os.stat(path).st_mode
    except OSError as exc:
        if exc.errno in ABSENT_ERRNOS:
            return None
        raise OmniError(f"{what + ' ' if what else ''}{one_line(path)}: cannot read ({exc.strerror or exc})") from exc


def is_regular(path: Path) -> bool:
    mode = path_mode(path)
    return mode is not None and stat.S_ISREG(mode)


def is_directory(path: Path) -> bool:
    mode = path_mode(path)
    return mode is not None and stat.S_ISDIR(mode)


def listing(directory: Path, what: str = "directory") -> list[Path]:
    """The entries of `directory`, sorted. One that cannot be listed is an OmniError naming it after `what`
    (pathlib's glob skips such a directory without a word)."""
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:  # removed since it was seen (a process's /proc entry): nothing there
        return []
    except OSError as exc:
        raise OmniError(f"{what} {one_line(directory)}: cannot read ({exc.strerror or exc})") from exc


def find_weights_file(directory: Path, name: str) -> Path | None:
    """`<name>.pt`, then `model.pt`, then the highest-numbered `<name>_step_<N>.pt`."""
    for candidate in (directory / f"{name}.pt", directory / "model.pt"):
        if is_regular(candidate):
            return candidate
    pattern = re.compile(rf"^{re.escape(name)}_step_(\d+)\.pt$")
    steps = [(int(m.group(1)), p) for p in listing(directory) if (m := pattern.match(p.name))]
    return max(steps)[1] if steps else None


def read_torch_file(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary objects. A pickle
    naming any other global (a class, or a function such as os.system) is refused before anything in it runs."""
    path = Path(path)
    size = regular_file_size(path, "checkpoint")
    if size == 0:
        raise OmniError(f"checkpoint {one_line(path)}: is empty (0 bytes)")
    check_zip_records(path, size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are not the user's concern
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (KeyError, IndexError, RuntimeError, ...) on bad data
        raise OmniError(f"checkpoint {path}: {torch_load_failure(exc)}") from exc
    if not isinstance(obj, dict):
        raise OmniError(f"checkpoint {path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def regular_file_size(path: Path, what: str) -> int:
    """The size of `path`, which must be a regular file (after symlinks): a FIFO would block the read forever and
    a device such as /dev/zero never ends, so neither is ever opened."""
    try:
        st = path.stat()
    except OSError as exc:
        raise OmniError(f"{what} {one_line(path)}: cannot read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a device or special file"
        raise OmniError(f"{what} {one_line(path)}: is {kind}, not a regular file")
    return st.st_size


def check_zip_records(path: Path, size: int) -> None:
    """torch.save stores its records uncompressed, so the records a zip checkpoint declares (its central
    directory, read without inflating anything) cannot add up to more than the file: a small file declaring
    more is a decompression bomb and is refused before torch.load allocates for it."""
    try:
        with zipfile.ZipFile(path) as zf:
            declared = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return  # not a zip (a legacy or raw pickle, or corrupt): torch.load judges it
    if declared > size:
        raise OmniError(f"checkpoint {one_line(path)}: its zip records declare {declared:,} bytes in a {size:,}-byte "
                        f"file (compressed records; torch.save never writes them): refused before decompressing")


_TORCH_BOILERPLATE = ("weights only load failed", "re-running", "please file an issue", "check the documentation",
                      "in pytorch 2.6")


def torch_load_failure(exc: BaseException) -> str:
    """One readable clause for why torch.load rejected a file."""
    text = str(exc)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if blocked:
        return (f"refused to load: unpickling it would call {blocked.group(1)}, and only tensors and plain data "
                f"are accepted (nothing in the file was run)")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if not ln.lower().startswith(_TORCH_BOILERPLATE)), "")
    detail = detail.replace("WeightsUnpickler error: ", "")
    detail = (detail[:160] + "...") if len(detail) > 160 else detail
    if isinstance(exc, pickle.UnpicklingError):
        return (f"refused to load: not a PyTorch checkpoint of tensors and plain data, or corrupt "
                f"({detail or 'rejected by the weights-only unpickler'})")
    return f"unreadable, truncated or not a PyTorch checkpoint ({type(exc).__name__}{': ' + detail if detail else ''})"


def strip_compile_prefix(sd: StateDict) -> StateDict:
    """Drop every `_orig_mod.` segment that torch.compile leaves in parameter names."""
    return {k.replace("_orig_mod.", ""): v for k, v in sd.items()}


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(obj: dict[str, Any], component: str, path: Path) -> StateDict:
    """The component's state dict from a trainer checkpoint: under its wrapper key, or the bare dict itself."""
    for key in WRAPPER_KEYS[component]:
        if key in obj:
            if not is_state_dict(obj[key]):
                raise OmniError(f"checkpoint {path}: key '{key}' is not a state dict of tensors")
            return strip_compile_prefix(obj[key])
    if is_state_dict(obj):
        return strip_compile_prefix(obj)
    wanted = " or ".join(f"'{k}'" for k in WRAPPER_KEYS[component])
    raise OmniError(f"checkpoint {path}: no {component} weights (looked for key {wanted}; "
                    f"found keys {sorted(obj)[:8]})")


def split_prefixed(sd: StateDict, prefix: str) -> StateDict:
    """Keys under `prefix.` with the prefix removed (merged safetensors exports)."""
    p = prefix + "."
    return strip_compile_prefix({k[len(p):]: v for k, v in sd.items() if k.startswith(p)})


def require(sd: StateDict, keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise OmniError(f"{source}: missing key(s) {', '.join(missing)}")


def load_strict(module: nn.Module, sd: StateDict, source: str) -> None:
    """load_state_dict(strict=True), with every mismatch reported as one readable line."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} (expected {tuple(own[k].shape)}, found {tuple(sd[k].shape)})"
              for k in own if k in sd and own[k].shape != sd[k].shape]
    problems = []
    if missing:
        problems.append(f"missing key(s) {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
    if unexpected:
        problems.append(f"unexpected key(s) {', '.join(unexpected[:6])}" + (" ..." if len(unexpected) > 6 else ""))
    if shapes:
        problems.append(f"wrong shape for {'; '.join(shapes[:4])}")
    ints = [f"{k} ({str(sd[k].dtype).removeprefix('torch.')})" for k in own
            if k in sd and own[k].is_floating_point() and not sd[k].is_floating_point()]
    if ints:  # casting integer or boolean data to float would load silently wrong weights
        problems.append(f"integer or boolean tensor(s) where float weights belong: {', '.join(ints[:4])}"
                        + (" ..." if len(ints) > 4 else ""))
    if problems:
        raise OmniError(f"{source}: {'; '.join(problems)}")
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise OmniError(f"{source}: tensor {k} contains NaN or infinite values")
    module.load_state_dict(sd, strict=True)


MAX_JSON_BYTES = 16 << 20  # configs and metadata are a few kB; refuse to read more than this


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a regular file of at most MAX_JSON_BYTES (FIFOs and devices are refused unopened).
    Nesting too deep to parse and integers beyond Python's digit limit are errors like any invalid JSON."""
    path = Path(path)
    size = regular_file_size(path, "config")
    if size > MAX_JSON_BYTES:
        raise OmniError(f"config {one_line(path)}: {size:,} bytes, over the limit of {MAX_JSON_BYTES:,} for a JSON "
                        f"config")
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_JSON_BYTES + 1).decode("utf-8"))
    except RecursionError as exc:
        raise OmniError(f"config {one_line(path)}: not valid JSON (nested too deeply)") from exc
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError, int digit limit
        raise OmniError(f"config {one_line(path)}: not valid JSON ({one_line(exc)})") from exc
    if not isinstance(data, dict):
        raise OmniError(f"config {one_line(path)}: expected a JSON object, found {type(data).__name__}")
    return data


def config_dirs(ckpt_dir: Path) -> list[Path]:
    """Where a checkpoint directory's trainer configs may live, in the order they are searched."""
    ckpt_dir = Path(os.path.normpath(Path(ckpt_dir).absolute()))  # parents of '.' or a relative name are real
    return [ckpt_dir / "configs", ckpt_dir.parent / "configs", ckpt_dir.parent.parent / "configs",
            Path.cwd() / "configs"]


def find_config(ckpt_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """The trainer config tied to `ckpt_dir`: its own config.json, else the config whose `save_dir` ends
    in the directory's name. Returns ({}, None) when none exists (spec defaults then apply)."""
    own = ckpt_dir / "config.json"
    if os.path.lexists(own):  # present but not a regular file (a FIFO, /dev/zero) is an error, not skipped
        return read_json(own), own
    name = ckpt_dir.resolve().name
    for d in config_dirs(ckpt_dir):
        if not is_directory(d):
            continue
        for path in (p for p in listing(d) if p.suffix == ".json"):
            try:
                cfg = read_json(path)
            except OmniError:  # an unrelated or broken file in a shared configs/ folder is not ours to judge
                continue
            save_dir = str(cfg.get("save_dir", "")).replace("\\", "/").rstrip("/")
            if save_dir and save_dir.rsplit("/", 1)[-1] == name:
                return cfg, path
    return {}, None


# Resource guard: a config may not ask for more positions than this (RoPE tables and the KV cache are sized by it).
MAX_CTX_LEN = 1 << 17
CONFIG_INT_LIMITS = {"ctx_len": MAX_CTX_LEN}
# (low, high] for config floats: a RoPE base at or below 1 makes every position look alike (1e-300 would load
# and answer nonsense), above 1e12 beyond any published model.
CONFIG_FLOAT_RANGES = {"rope_theta": (1.0, 1e12)}


def config_int(cfg: dict[str, Any], key: str, default: int, source: str) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)) or int(value) != value or value < 1:
        raise OmniError(f"config {source}: '{key}' must be a positive integer, found {short_repr(value)}")
    limit = CONFIG_INT_LIMITS.get(key)
    if limit is not None and value > limit:
        raise OmniError(f"config {source}: '{key}' is {int(value)}, over the limit of {limit}")
    return int(value)


def config_float(cfg: dict[str, Any], key: str, default: float, source: str) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
            or (isinstance(value, float) and not math.isfinite(value)) or value > 1e300:
        raise OmniError(f"config {source}: '{key}' must be a positive number, found {short_repr(value)}")
    low, high = CONFIG_FLOAT_RANGES.get(key, (0.0, 1e300))
    if not low < value <= high:
        raise OmniError(f"config {source}: '{key}' is {float(value):g}, outside the usable range ({low:g}, {high:g}]")
    return float(value)


def short_repr(value: Any, limit: int = 60) -> str:
    """repr of a config value, cut short (a 5000-digit integer or a deep list must not fill the error line)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return one_line(text if len(text) <= limit else text[:limit] + "...")


def check_config_agrees(cfg: dict[str, Any], actual: dict[str, int], source: str, weights: str) -> None:
    """A config that contradicts the tensor shapes is an error, not a silent override."""
    for key, value in actual.items():
        if key in cfg and cfg[key] != value:
            raise OmniError(f"config {source}: '{key}' is {short_repr(cfg[key])} but the weights in {weights} have "
                            f"{value}")
