"""Writing a file so that readers never see half of it: a temp file beside the target, then a rename. A failed
write (a full disk, the file-size limit, a signal) leaves no partial file and the previous file untouched."""
from __future__ import annotations

import os
from pathlib import Path

from utils.base.errors import OmniError


def temp_path(path: Path) -> Path:
    """The temp name `write_atomic` uses beside `path` (hidden, per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | os.PathLike, data: bytes, label: str | None = None) -> None:
    """Write `data` to `path` through a temp file and a rename; errors are OmniError naming `label` (default:
    the path)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise OmniError(f"{label or path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        try:
            tmp.unlink()
        except OSError:  # already renamed, never created, or its name is unusable
            pass
