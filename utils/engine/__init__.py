"""Layer 4, the engine: generation (prefill, decode steps, sampling, scheduling), the C step (native/),
speech out and transcription."""
