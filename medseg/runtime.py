"""Process-wide runtime settings applied by the command line (never on import).

glibc's allocator returns large blocks (network activations) to the kernel after every forward pass and maps
them again on the next, and the page faults cost 18-30% of CPU inference time on the project's machines.
:func:`tune_allocator` keeps freed memory in the process instead — the runtime equivalent of
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``. It is a no-op where the C
library is not glibc. Library users can call it themselves.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Keep freed memory for reuse instead of unmapping it (glibc only). Returns whether it was applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok_mmap = mallopt(_M_MMAP_MAX, 0) == 1
    ok_trim = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return ok_mmap and ok_trim
