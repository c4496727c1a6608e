"""Keep freed memory for reuse instead of faulting it in again on every call (Linux with glibc).

XLA:CPU allocates a compiled program's temporaries afresh for every call (1.2 GiB for the `mid` preset's
training step). glibc serves allocations that large with a fresh mmap and unmaps them on free, so every
call faults the memory in and the kernel zeroes it 4 KiB at a time: ~290,000 page faults and most of a
CPU-second per training step on a 2-core machine (a fifth of the step). With three glibc tunables the
process takes large blocks from its main heap (`mmap_max=0`; `arena_max=1`, as other threads' arenas would
still mmap them) and keeps what it frees (`trim_threshold`), so the next call reuses the same pages: no
faults. The cost: freed memory is not handed back to the system until the process exits, and fragments, so
peak memory grows; for the 3B model on a CPU, from 8.9 to 11.7 GB (inference) and from 9.6 to 12.3 GB (a
LoRA step), with no gain in speed. So it is opt-in: set `PALISEG_TUNE_MALLOC=1` for small and mid-size
models on a CPU (the `mid` LoRA step: 2.8 -> 2.3 s on 2 cores). (`glibc.malloc.hugetlb=1` cuts the faults
too, but then the kernel compacts memory on faults, which stalled steps for seconds on a busy machine.)

glibc reads tunables once, when the process starts, so `ensure()` re-executes the running command with them
(once: the new process finds them set). The `paliseg` command and the benchmark scripts call it before
anything else; it does nothing unless `PALISEG_TUNE_MALLOC=1`, or if any glibc.malloc tunable is set already.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={1 << 46}")
SWITCH_VARIABLE = "PALISEG_TUNE_MALLOC"


def ensure() -> None:
    """With PALISEG_TUNE_MALLOC=1, re-execute this process with `TUNABLES` unless malloc tunables are set."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables or os.environ.get(SWITCH_VARIABLE) != "1":
        return
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, *TUNABLES]))
    try:  # sys.orig_argv keeps the interpreter's own options (-m module, -X ...) as well as the arguments
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:
        os.environ[SWITCH_VARIABLE] = "0"  # could not restart: run on as we are
