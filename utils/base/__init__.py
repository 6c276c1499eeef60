"""Layer 1, the torch-free base: errors and the signal policy, shared constants and choice lists, the
generation options table, atomic file writes, transcript formats, the version. Importable without torch."""
