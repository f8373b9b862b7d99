"""mtrec.allocator: glibc keeps freed memory for the next batch, once asked, and only then."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_glibc = hasattr(os, "confstr") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")

# Frees a 16 MB block and reports whether the heap still holds it (mallinfo2's arena: the
# bytes of the main heap; an mmapped block is unmapped on free instead).
_PROBE = """
import ctypes, sys
from mtrec.allocator import retain_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
before = libc.mallinfo2().arena
p = libc.malloc(16 * 2**20)
ctypes.memset(p, 1, 16 * 2**20)
libc.free(p)
print(applied, libc.mallinfo2().arena - before >= 16 * 2**20)
"""


def _probe(mode: str, **env: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    return run.stdout.strip()


@pytest.mark.skipif(not _glibc, reason="glibc's malloc only")
def test_freed_batch_memory_stays_in_the_heap_once_retained():
    assert _probe("default") == "False False"  # glibc's defaults: a 16 MB block is unmapped on free
    assert _probe("retain") == "True True"


@pytest.mark.skipif(not _glibc, reason="glibc's malloc only")
def test_mtrec_keep_malloc_leaves_the_allocator_alone():
    assert _probe("retain", MTREC_KEEP_MALLOC="1") == "False False"


def test_it_is_applied_once_and_answers_the_same_after():
    from mtrec.allocator import retain_freed_memory

    first = retain_freed_memory()
    assert retain_freed_memory() is first
