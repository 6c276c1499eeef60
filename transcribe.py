#!/usr/bin/env python3
"""Transcribe audio files with a μOmni audio encoder's CTC head, as whisper's command line does: audio files as
arguments, --model the checkpoint, every format (txt, vtt, srt, tsv, json) written as INPUT.FORMAT into
--output_dir (default: the current directory) unless --output_format names one."""
if __name__ == "__main__":  # first, so the signal policy covers every line below (utils.base.errors.run_script)
    from utils.base.errors import run_script
    run_script("transcribe")

from utils.cli.transcribe_script import main as transcribe_main


def main() -> int:
    """whisper's habits over infer_chat.py --transcribe (signals as in infer_chat.py)."""
    return transcribe_main(None, "transcribe.py", __doc__)
