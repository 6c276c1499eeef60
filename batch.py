#!/usr/bin/env python3
"""Run a batch job: answer every request of a JSON Lines file (or transcribe audio files) with a μOmni model, on
this machine (--engine local) or on a Ray cluster (--engine ray), resumable after a kill (--resume)."""
if __name__ == "__main__":  # first, so the signal policy covers every line below (utils.base.errors.run_script)
    from utils.base.errors import run_script
    run_script("batch")

from utils.batch.main import main as batch_main


def main() -> int:
    """The batch job (SIGINT 130, SIGTERM/SIGHUP 143/129 with the journal kept for --resume)."""
    return batch_main(None, "batch.py", __doc__)
