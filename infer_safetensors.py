#!/usr/bin/env python3
"""Chat with a μOmni model from a merged safetensors export (see export.py)."""
import sys

from utils.cli import main

if __name__ == "__main__":
    sys.exit(main(None, "infer_safetensors.py", __doc__))
