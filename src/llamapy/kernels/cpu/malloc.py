"""glibc malloc settings for the CPU path: no page faults on every prefill's scratch.

A prefill allocates tens of MB of short-lived tensors per matmul (bf16 weight chunks, float32
outputs, activations). With glibc's defaults, blocks over the dynamic mmap threshold are
fresh `mmap`s returned to the OS on free, and freed heap tops over the trim threshold are
given back too, so the next prefill touches every page again: a 512-token prefill of a 1B
Q4_0 model took ~250,000 minor page faults (~1 GB of zeroed pages; 107-112 t/s with them,
134-143 without, on the 2-core development machine).
Serving blocks up to 32 MB from the heap (glibc's largest mmap threshold), keeping up to
256 MB of freed heap, and growing it 64 MB at a time removes them; the peak resident set is
unchanged (the same buffers, reused instead of re-faulted). benchmarks/RESULTS.md (issue 7,
ninth session) has the figures.

`mallopt` is reached through ctypes (standard library): glibc only; elsewhere, or with
`LLAMAPY_MALLOC_TUNE=0`, nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Iterator

from llamapy.switches import switched_off

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS = (
    (M_MMAP_THRESHOLD, 32 << 20),  # glibc's maximum (HEAP_MAX_SIZE / 2 on 64-bit)
    (M_TRIM_THRESHOLD, 256 << 20),
    (M_TOP_PAD, 64 << 20),
)

# While weights load: glibc's default threshold, fixed. Left dynamic, it rises to the size of
# the largest mapped block freed (up to 32 MB), after which the packing's temporaries come
# from the heap and leave it fragmented: a 1B Q4_0 file's load kept 10-90 MB more resident,
# varying from run to run (benchmarks/RESULTS.md, issue 7, seventeenth session).
LOAD_MMAP_THRESHOLD = 128 << 10

_applied: bool | None = None


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    gnu = getattr(libc, "gnu_get_libc_version", None)  # musl and others: not glibc
    return libc if gnu is not None and hasattr(libc, "mallopt") else None


def tune_malloc() -> bool:
    """Apply SETTINGS once per process; True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if switched_off("LLAMAPY_MALLOC_TUNE"):
        return False
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    ok = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    if not ok:
        log.debug("mallopt refused a setting; glibc malloc defaults kept for the rest")
    _applied = ok
    return ok


@contextlib.contextmanager
def mapped_while_loading() -> Iterator[None]:
    """Blocks over 128 KiB get their own mappings while the body runs (a weight load): a
    freed temporary goes back to the OS at once instead of staying in a fragmented heap.
    After it, `tune_malloc`'s settings apply again where they were in effect. Off with
    LLAMAPY_MALLOC_TUNE=0, and where the C library is not glibc."""
    libc = None if switched_off("LLAMAPY_MALLOC_TUNE") else _libc()
    if libc is not None:
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
        libc.mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None and _applied:
            for param, value in SETTINGS:
                libc.mallopt(param, value)
