"""Fixed malloc thresholds for the serving processes that move megabytes per request (the gate, the
Python-backend models). Standard library only.

glibc's malloc maps a chunk over its mmap threshold afresh and unmaps it when freed, and gives freed
memory at the top of its heap back to the kernel once more than its trim threshold is free. Both
thresholds start at 128 KiB and rise with the first large chunks freed (to that chunk's size and
twice it), so a process that allocates and frees a few MiB per request keeps returning memory and
page-faulting it in again (the kernel zeroes every page): the gate spent 10 ms of CPU on each 1024^2
image response it passed on, 4 ms with these thresholds, and the BLS's uint8 postprocessing of one
1024^2 image took 15-18 ms instead of 6-9 ms. Fixed thresholds keep up to TRIM_THRESHOLD_BYTES of
freed heap per malloc arena for the next request; a chunk over MMAP_THRESHOLD_BYTES (a request near
the gate's body limit) is still mapped and returned on its own.
"""

from __future__ import annotations

import ctypes

MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 64 * 2**20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def keep_freed_memory() -> bool:
    """Set this process's thresholds (glibc's mallopt). False where there is no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD,
                                                                          TRIM_THRESHOLD_BYTES) == 1
