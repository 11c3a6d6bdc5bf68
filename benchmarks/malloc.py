"""Opt-in allocator tuning for timings (``--malloc-tuning``; see ``benchmarks/README.md``).

glibc's malloc returns freed blocks above its (dynamic) mmap threshold to the kernel, so that the
large temporaries of every repeated call are faulted in again as fresh pages; that cost belongs to
the allocator, not to the route being timed, and it varies. :func:`keep_freed_memory` makes it
keep them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def keep_freed_memory(trim: int = 2**31 - 1, mmap: int = 1 << 25) -> dict[str, int] | None:
    """Make glibc's malloc keep freed memory instead of returning it to the kernel.

    Sets the trim threshold to ``trim`` bytes (the largest ``mallopt`` takes: a C ``int``) and the
    mmap threshold to ``mmap`` (32 MiB), process-wide, so that the temporaries of repeated calls
    reuse pages instead of faulting fresh ones in. Returns the settings, or ``None`` without
    glibc. A value that does not fit a C ``int`` raises ``ValueError`` before anything is set
    (ctypes would truncate it silently: ``2**34`` became 0, a trim on every free).
    """
    settings = {"M_TRIM_THRESHOLD": trim, "M_MMAP_THRESHOLD": mmap}
    for key, value in settings.items():
        if ctypes.c_int(value).value != value:
            raise ValueError(f"keep_freed_memory: {key} must fit a C int (-2**31 to "
                             f"2**31 - 1), got {value}; pass a value in that range")
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or name is None:
        return None
    libc = ctypes.CDLL(name)
    codes = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}  # glibc's malloc.h
    if not all(libc.mallopt(codes[k], ctypes.c_int(v)) == 1 for k, v in settings.items()):
        return None
    return settings
