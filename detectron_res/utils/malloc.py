"""glibc malloc settings for the tools: keep freed memory for reuse instead of returning it to the OS.

glibc serves each allocation above a threshold (128 KB, rising with use to at most 32 MB) with a fresh `mmap` and
unmaps it on free, so the next buffer of that size is mapped again and the kernel zero-fills every page on its first
touch. A C4 detector's per-RoI buffers are tens to hundreds of MB (R50-C4 training: 1024 RoIs x 1024 x 14 x 14
floats is 800 MB), and on 2 cores a training step of R50-C4 spent more than half of its time in the kernel on those
page faults (docs/benchmarks.md). `keep_freed_memory` makes every block come from the heap (M_MMAP_MAX = 0) and
never trims the heap (M_TRIM_THRESHOLD = the largest size): freed memory is reused by the next buffers. This is
`GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736` set in the running process, so a
tool needs no special environment.

The cost: the process keeps its peak memory after it falls, and fragmentation adds to that peak (measured in
docs/benchmarks.md). The tools call it at start (`engine.runner.run_tool`); a library user may call it too. It does
nothing where the C library is not glibc, where GLIBC_TUNABLES already sets malloc options (the user's choice), or
where the environment variable DETECTRON_RES_MALLOC is "system" (glibc's defaults, e.g. to save memory or to
measure without it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, glibc's malloc.h
M_MMAP_MAX = -4
NEVER = -1  # mallopt's value is an int that glibc reads as a size_t: -1 is SIZE_MAX


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to reuse freed memory (see the module's doc). Returns whether it did; calling it again
    is harmless."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or os.environ.get("DETECTRON_RES_MALLOC") == "system":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    done = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER) == 1
    if done:
        logger.debug("glibc malloc: no mmap for large blocks, the heap never trimmed")
    return done
