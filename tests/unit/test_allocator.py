"""mtrec.allocator: glibc keeps freed memory for the next batch, once asked, and only then."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest


def _has_mallinfo2() -> bool:
    """glibc >= 2.33 (mallinfo2 reads the heap's size without overflowing an int)."""
    if not (hasattr(os, "confstr") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")):
        return False
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_mallinfo2(), reason="glibc >= 2.33 (mallinfo2) only")

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
    # A clean allocator: no opt-out, no malloc tunables, no preloaded allocator from the caller.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    clean.pop("MTREC_KEEP_MALLOC", None)
    run = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env={**clean, **env})
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_freed_batch_memory_stays_in_the_heap_once_retained():
    assert _probe("default") == "False False"  # glibc's defaults: a 16 MB block is unmapped on free
    assert _probe("retain") == "True True"


def test_mtrec_keep_malloc_leaves_the_allocator_alone():
    assert _probe("retain", MTREC_KEEP_MALLOC="1") == "False False"
