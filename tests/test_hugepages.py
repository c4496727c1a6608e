"""`paliseg.hugepages`: the command restarts itself once with glibc's huge-page tunable, keeping the rest."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc tunables only"
)

# Prints the tunables after ensure(), then the page faults of filling a fresh 256 MiB malloc buffer (as
# XLA's temporaries are; NumPy would not do, it asks for huge pages itself).
PROBE = """
import ctypes, os, resource
from paliseg import hugepages
hugepages.ensure()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 1, size)
print(os.environ.get("GLIBC_TUNABLES", ""), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PALISEG_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, "PYTHONPATH": str(REPO), **env},
                         capture_output=True, text=True, check=True, timeout=120).stdout.split()
    return (out[0], int(out[1])) if len(out) == 2 else ("", int(out[0]))


def test_restarts_once_with_the_tunable_and_keeps_other_tunables():
    assert _probe()[0] == "glibc.malloc.hugetlb=1"
    assert _probe(GLIBC_TUNABLES="glibc.malloc.check=0")[0] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"
    assert _probe(PALISEG_HUGE_PAGES="0")[0] == ""


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_huge_pages_cut_the_page_faults_of_large_buffers():
    _, faults_plain = _probe(PALISEG_HUGE_PAGES="0")
    _, faults_huge = _probe()
    assert faults_plain > 50_000  # 256 MiB in 4 KiB pages
    assert faults_huge < faults_plain / 10
