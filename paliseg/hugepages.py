"""Large temporary buffers on transparent huge pages (Linux with glibc).

XLA:CPU allocates a compiled program's temporaries afresh for every call (1.2 GiB for the `mid` preset's
training step). glibc serves allocations that large with a new mmap, so the kernel faults them in and zeroes
them 4 KiB at a time: ~300,000 page faults and most of a CPU-second per step, about a sixth of the step's
wall time on a 2-core machine. The glibc tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35; older versions
ignore it) makes malloc ask for transparent huge pages on those mappings: 512x fewer faults.

glibc reads tunables once, when the process starts, so `ensure()` re-executes the running command with the
tunable set (once: the new process finds it set). The `paliseg` command and the benchmark scripts call it
before anything else; `PALISEG_HUGE_PAGES=0` turns it off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
DISABLE_VARIABLE = "PALISEG_HUGE_PAGES"


def ensure() -> None:
    """Re-execute this process with `glibc.malloc.hugetlb=1` unless it is set, off, or not applicable."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables or os.environ.get(DISABLE_VARIABLE) == "0":
        return
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))
    try:  # sys.orig_argv keeps the interpreter's own options (-m module, -X ...) as well as the arguments
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:
        os.environ[DISABLE_VARIABLE] = "0"  # could not restart: run on as we are
