"""Worker-side process settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import python_env

MIB = 2**20
# Bytes glibc holds in mmap'd blocks (mallinfo2's hblkhd) while a 64 MiB tensor is alive.
HELD_IN_MMAP = """
import ctypes, sys, torch
from asrlaunch.engine.runtime import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
tensor = torch.ones(16 * 2**20)
print(libc.mallinfo2().hblkhd)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_cpu_tensors_come_from_the_heap_once_freed_memory_is_kept() -> None:
    def held_in_mmap(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", HELD_IN_MMAP, mode],
            env=python_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        return int(done.stdout.split()[-1])

    assert held_in_mmap("default") >= 64 * MIB  # glibc's default: mmap, unmapped again when freed
    assert held_in_mmap("keep") < 64 * MIB  # from the heap, which keeps it for the next step
