#!/usr/bin/env python3
"""Run a batch job: answer every request of a JSON Lines file (or transcribe audio files) with a μOmni model, on
this machine (--engine local) or on a Ray cluster (--engine ray), resumable after a kill (--resume)."""
import sys

from utils.base.errors import Terminated, handle_signals, interrupt_status

if __name__ == "__main__":
    handle_signals()  # before the app's imports: SIGTERM/SIGHUP end it as 143/129 with the journal kept
    try:
        from utils.batch.main import main

        sys.exit(main(None, "batch.py", __doc__))
    except (KeyboardInterrupt, Terminated) as exc:  # while importing or parsing, before main's own handling
        sys.exit(interrupt_status(exc))
