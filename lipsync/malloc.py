"""glibc's allocator set up for big, short-lived arrays: video frames, crops, activations."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP_BYTES = 1 << 30
# The same settings for a process about to start (glibc reads them before any thread exists): Ray runs
# map_batches calls and training loops on threads whose arenas mallopt can no longer change.
TUNABLES = f"glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold={KEEP_BYTES}:glibc.malloc.trim_threshold={KEEP_BYTES}"


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process for the next allocation instead of handing it back to the kernel.

    By default glibc maps every block over 128 KiB to 32 MiB afresh and unmaps it on free, and every
    thread may get its own arena, so each batch's arrays are page-faulted and zeroed again. For the
    Wav2Lip generator on CPU that was 3.7 M page faults and 8.5 s of kernel time in 27 s (192 frames, one
    thread): the same work took 18 s after this call. One arena, nothing mapped or trimmed below 1 GiB.
    Returns False where it cannot apply (no glibc): allocation is then as before.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, KEEP_BYTES), (M_ARENA_MAX, 1))
    applied = all(mallopt(option, value) == 1 for option, value in settings)
    if not applied:
        log.debug("mallopt refused a setting: freed memory goes back to the kernel as before")
    return applied


def allocator_env() -> dict[str, str]:
    """GLIBC_TUNABLES for processes to start with reuse_freed_memory's settings; {} when the user set it.

    A Ray Data actor runs its calls on a worker thread with its own arena: for the generator that was
    ~450 k page faults and 1 s of kernel time per 5 s call (50 frames) after mallopt in __init__.
    """
    return {} if "GLIBC_TUNABLES" in os.environ else {"GLIBC_TUNABLES": TUNABLES}
