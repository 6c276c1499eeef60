"""The project's version and `--version` text. Torch-free: `--version` answers without importing torch."""
from __future__ import annotations

import platform
from importlib import metadata

__version__ = "0.2.0"


def package_version(name: str) -> str:
    """An installed distribution's version, read from its metadata (no import), or 'not installed'."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_text(prog: str) -> str:
    """What `PROG --version` prints: this suite's version, torch's and the Python's."""
    return (f"{prog} (μOmni inference suite) {__version__}\n"
            f"torch {package_version('torch')}\n"
            f"Python {platform.python_version()} ({platform.python_implementation()})")
