"""`paliseg.allocator`: asked to (PALISEG_TUNE_MALLOC=1), the command restarts itself once with glibc's malloc
tunables, and with them a large buffer freed and allocated again costs no new page faults (as XLA's
per-call temporaries)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from paliseg import allocator

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc tunables only"
)

# Prints the tunables after ensure(), then the page faults of the third malloc-fill-free of 256 MiB.
PROBE = """
import ctypes, os, resource
from paliseg import allocator
allocator.ensure()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
print(os.environ.get("GLIBC_TUNABLES", "-"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.SWITCH_VARIABLE)}
    tunables, faults = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    return tunables, int(faults)


ON = {allocator.SWITCH_VARIABLE: "1"}


def test_restarts_once_with_the_tunables_only_when_asked():
    assert _probe()[0] == "-"
    assert _probe(**ON)[0] == ":".join(allocator.TUNABLES)
    assert _probe(**ON, GLIBC_TUNABLES="glibc.rtld.nns=4")[0] == ":".join(("glibc.rtld.nns=4", *allocator.TUNABLES))
    assert _probe(**ON, GLIBC_TUNABLES="glibc.malloc.check=0")[0] == "glibc.malloc.check=0"  # the user's own


def test_a_large_buffer_allocated_again_reuses_its_pages():
    _, faults_default = _probe()
    _, faults_tuned = _probe(**ON)
    assert faults_default > 50_000  # 256 MiB faulted in again, 4 KiB at a time
    assert faults_tuned < 1_000
