"""The allocator set up for big, short-lived arrays: video frames, crops, activations.

Ray's workers start with jemalloc (Debian's libjemalloc2) when it is installed, else with glibc's
allocator tuned by GLIBC_TUNABLES; a process that is already running can still tune glibc's
(reuse_freed_memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP_BYTES = 1 << 30
# The same settings for a process about to start (glibc reads them before any thread exists): Ray runs
# map_batches calls and training loops on threads whose arenas mallopt can no longer change.
TUNABLES = f"glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold={KEEP_BYTES}:glibc.malloc.trim_threshold={KEEP_BYTES}"
# jemalloc keeping every freed page (no decay back to the kernel): like TUNABLES, no page faults for the
# next batch's arrays. Its default decay faulted 14 M pages in 1500 generator frames (27 s of kernel time).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# LIPSYNC_ALLOCATOR=glibc keeps glibc's allocator (with TUNABLES) in Ray's workers even with jemalloc there.
CHOICE_VARIABLE = "LIPSYNC_ALLOCATOR"
# Every variable that chooses or configures the allocator of a process about to start.
VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", CHOICE_VARIABLE)


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


@functools.cache
def jemalloc_library() -> str | None:
    """jemalloc's shared library name when the system has it (Debian: libjemalloc2), else None.

    Looked up once per process: find_library runs `ldconfig -p`.
    """
    return ctypes.util.find_library("jemalloc")


def allocator_env() -> dict[str, str]:
    """Environment for processes to start with the workers' allocator; variables the user set are kept.

    jemalloc (LD_PRELOAD, MALLOC_CONF) when installed and not declined with LIPSYNC_ALLOCATOR=glibc or a
    LD_PRELOAD of the user's. For the generator's model actor it peaked at 962-967 MB on a 3-minute input
    against 1323 MB under glibc's tuned allocator, whose single heap fragments between the activations
    and Ray's own allocations (36 MiB steps up to ~60 % through a run); end-to-end fps 33.3-33.8 vs 33.0.
    GLIBC_TUNABLES always: reuse_freed_memory's settings for processes without jemalloc. A Ray Data actor
    runs its calls on a worker thread with its own arena, which mallopt in __init__ does not reach: for
    the generator that was ~450 k page faults and 1 s of kernel time per 5 s call (50 frames).
    """
    env = {} if "GLIBC_TUNABLES" in os.environ else {"GLIBC_TUNABLES": TUNABLES}
    if os.environ.get(CHOICE_VARIABLE, "jemalloc") == "glibc" or "LD_PRELOAD" in os.environ:
        return env
    library = jemalloc_library()
    if library is not None:
        env["LD_PRELOAD"] = library
        env["MALLOC_CONF"] = os.environ.get("MALLOC_CONF", JEMALLOC_CONF)  # also for a remote cluster
    return env


def jemalloc_loaded() -> bool:
    """Whether this process allocates with jemalloc (it is mapped in)."""
    try:
        return "/libjemalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def allocate_as_workers_do() -> None:
    """Give this program the allocator that allocator_env gives Ray's workers.

    For benchmarks whose in-process reference (the model alone, FaceMesh alone) must allocate as the
    workers do. Call first thing in main, before any thread: under jemalloc the program is started again
    (arguments and environment kept); without it glibc is tuned in place (reuse_freed_memory).
    """
    env = allocator_env()
    if "LD_PRELOAD" in env and not jemalloc_loaded():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})
    reuse_freed_memory()
