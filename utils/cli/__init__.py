"""App: the command line of infer_chat.py and infer_safetensors.py (parser, console, REPL, transcription)."""
