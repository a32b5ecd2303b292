"""OS-level names for the service's threads, so `top -H`, `ps -L` and the bench can tell them apart.

Python names its threads for itself only; the kernel sees every thread of
`flowsort serve` as "flowsort", the engine's worker threads included. Each
service thread names itself when it starts (Linux ``prctl(PR_SET_NAME)``,
at most 15 bytes; a no-op elsewhere).
"""

from __future__ import annotations

import ctypes
import sys

LOOP, RESULTS = "fs-loop", "fs-results"
SERVICE_THREADS = (LOOP, RESULTS)
_PR_SET_NAME = 15


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the kernel's view."""
    if not sys.platform.startswith("linux"):
        return
    try:
        # The process's own symbols, libc's among them: no library search (find_library runs ldconfig).
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # a name is a convenience, never a reason to fail
