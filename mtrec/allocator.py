"""Keeping freed memory for the next batch: glibc's malloc tuned for a loop of same-sized tensors.

A CPU forward pass over a 4096-row batch of the benchmark MMoE allocates several 4-16 MB
activations and frees them before the next batch. With glibc's defaults each of them is a
fresh ``mmap`` (or heap memory that ``free`` hands back to the system), so every batch
page-faults its activations in again: 10-20 ms of a 60-70 ms forward pass on one core.
:func:`retain_freed_memory` raises the mmap threshold to 32 MB (glibc's maximum; blocks
above it are still mapped and unmapped) and turns off trimming, so the heap keeps what a
batch freed and the next batch reuses it. Memory stays flat: the heap grows to one batch's
working set and no further.

It changes the whole process's allocator, so the library never calls it on its own:
``mtrec train``, ``evaluate``, ``score`` and ``tune`` do at start (as ``LD_PRELOAD`` of
jemalloc or the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment
variables would), and a program of its own may call it before its loop. Elsewhere than
glibc (musl, macOS, Windows) it does nothing. ``MTREC_KEEP_MALLOC=1`` leaves the
allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # an int: never trim the top of the heap while the process runs

_applied: bool | None = None


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or not glibc
        return False


def retain_freed_memory() -> bool:
    """Tunes glibc's malloc as above (once per process); True if it did (or had already)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MTREC_KEEP_MALLOC") == "1" or not _glibc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
