#!/usr/bin/env python3
"""Chat with a μOmni model from its trainers' checkpoint directories (or a merged export)."""
import sys

from utils.cli import main

if __name__ == "__main__":
    sys.exit(main(None, "infer_chat.py", __doc__))
