"""Make freed tensor memory go back to the OS (glibc), so streaming one block at a time bounds RSS.

glibc serves allocations below its mmap threshold from heap arenas, and raises that threshold (up to
32 MiB) every time a large mmapped chunk is freed. Streaming frees and reallocates block-sized tensors
(1-30 MiB) over and over, so after a few blocks they all come from the arenas, whose freed space is kept
and fragmented: measured on SmolLM2-135M, the statistics pass's peak RSS was 1192 MiB with the defaults
and 769 MiB with a fixed 4 MiB threshold and two arenas (benchmarks/memory_bound.py). A fixed threshold
turns the adjustment off; tensors of 4 MiB and more are then mmapped and unmapped on free.

Called by `pipeline.preflight`, which every run (CLI, flow, benchmark) goes through first. No-op where glibc's mallopt is not available.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 4 << 20
ARENA_MAX = 2


@functools.lru_cache(maxsize=1)
def release_freed_memory() -> bool:
    """Returns whether glibc accepted the settings (once per process)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_ARENA_MAX, ARENA_MAX))
