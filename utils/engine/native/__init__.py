"""The C decode step: step.c and the ctypes loader beside it (step.py)."""
