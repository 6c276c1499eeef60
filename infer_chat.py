#!/usr/bin/env python3
"""Chat with a μOmni model from its trainers' checkpoint directories (or a merged export)."""
import sys

from utils.cli.main import main
from utils.base.errors import handle_signals

if __name__ == "__main__":
    handle_signals()  # SIGTERM/SIGHUP as exceptions (cleanup runs, exit 143/129), SIGXFSZ ignored
    sys.exit(main(None, "infer_chat.py", __doc__))
