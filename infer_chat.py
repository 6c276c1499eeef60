#!/usr/bin/env python3
"""Chat with a μOmni model from its trainers' checkpoint directories (or a merged export)."""
if __name__ == "__main__":  # first, so the signal policy covers every line below (utils.base.errors.run_script)
    from utils.base.errors import run_script
    run_script("infer_chat")

from utils.cli.main import main as cli_main


def main() -> int:
    """The shared CLI as infer_chat.py (SIGINT 130, SIGTERM/SIGHUP 143/129 with cleanup, SIGXFSZ ignored)."""
    return cli_main(None, "infer_chat.py", __doc__)
