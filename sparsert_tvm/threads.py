"""How many threads TVM's CPU runtime runs parallel loops on.

Unless ``TVM_NUM_THREADS`` says, TVM takes half the logical CPUs on x86, assuming two
hardware threads per core. On machines with one thread per core (most cloud VMs' vCPUs as
the guest sees them, and this project's 2-core test machine) that leaves half the cores idle:
every CPU figure of ours before this ran on one of its two cores while PyTorch and
onnxruntime used both. So at import, where the variable is unset, it is set to the physical
cores this process may run on, counted from Linux's CPU topology: what TVM means to use.
TVM reads it when its thread pool starts (the first parallel loop), so it is too late once a
TVM CPU module has run in the process; an explicit ``TVM_NUM_THREADS`` always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

VARIABLE = "TVM_NUM_THREADS"


def physical_cores(cpus=None, topology: Path = Path("/sys/devices/system/cpu")) -> int | None:
    """Cores among ``cpus`` (default: those this process may run on), hardware threads of one
    core counted once; None where the topology cannot be read."""
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        cpus = os.sched_getaffinity(0)
    siblings = set()
    for cpu in cpus:
        try:
            siblings.add((topology / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            return None
    return len(siblings) or None


def use_physical_cores() -> None:
    """Sets ``TVM_NUM_THREADS`` to the physical cores, unless it is set or they are unknown."""
    if VARIABLE in os.environ:
        return
    cores = physical_cores()
    if cores:
        os.environ[VARIABLE] = str(cores)
