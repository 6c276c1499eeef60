"""The CPU cores this process may use, for the thread count a server or batch job runs on by default (as llama.cpp
defaults to the physical cores: a second hardware thread of a core shares its vector units and caches, and
the decode step is bound by them). Torch-free, so the parsers can use it."""
from __future__ import annotations

import os
from pathlib import Path

SYS_CPUS = Path("/sys/devices/system/cpu")


def physical_cores(cpus: set[int] | None = None, root: Path = SYS_CPUS) -> int:
    """How many physical cores hold the CPUs this process may run on (its affinity mask, or `cpus`): distinct
    (physical_package_id, core_id) pairs of Linux's topology files under `root`; a CPU whose files cannot be
    read counts as a core of its own. Without an affinity mask (not Linux): os.cpu_count()."""
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):
            return os.cpu_count() or 1
        cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topology = root / f"cpu{cpu}" / "topology"
        try:
            cores.add((int((topology / "physical_package_id").read_text()), int((topology / "core_id").read_text())))
        except (OSError, ValueError):
            cores.add(("cpu", cpu))
    return max(1, len(cores))


def service_threads(threads: int | None) -> int | None:
    """The --threads a server or batch job runs on: `threads` when given; else None (torch's setting stands) when
    OMP_NUM_THREADS or MKL_NUM_THREADS names a count; else the physical cores."""
    if threads is not None or os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return threads
    return physical_cores()


def passive_openmp() -> None:
    """Let torch's OpenMP workers sleep as soon as a parallel region ends (OMP_WAIT_POLICY=PASSIVE), unless the
    environment sets a policy. By default they spin for milliseconds after every region (a cache's zero fill,
    an embedding), and where threads match cores that spinning takes the cores the C step's own workers run on:
    on 2 cores, 2-thread decoding of the demo ran 25-35% slower and its prefill 35-45% slower. OpenMP reads the
    variable when torch is first imported, so omni.py calls this before it imports torch; a process that
    imported torch earlier keeps the default."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
