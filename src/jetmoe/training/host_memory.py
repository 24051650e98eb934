"""Host (CPU) memory policy for training: keep freed memory in the process instead of handing it back.

A training step frees and re-allocates the same large tensors every step: activations, and every parameter's
gradient, since gradients are set to None between steps. glibc serves each block over 32 MiB with fresh pages from
`mmap` and unmaps it on `free`, so every step page-faults and zeroes all that memory again. With many experts
that is most of the step's extra cost: at 64 experts of the benchmark's CPU preset about 2 GiB a step (see
bench/RESULTS.md). With mmap and heap trimming turned off, freed blocks are reused with no fault once the heap
has grown to hold a step's blocks (within the first steps), as PyTorch's CUDA caching allocator does for device
memory. The price is that the process keeps its peak footprint until it exits, which a training process
reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse: no mmap'd blocks (`M_MMAP_MAX` 0) and no trimming of
    the heap (`M_TRIM_THRESHOLD` -1). Process-wide; returns False, changing nothing, where malloc is not glibc's."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
