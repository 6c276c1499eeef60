"""App: the OpenAI-compatible HTTP server of serve.py."""
