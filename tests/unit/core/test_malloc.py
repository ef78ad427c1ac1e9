"""The workers' allocator: big arrays freed and allocated again must not page-fault each time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core import malloc

REPO = Path(__file__).resolve().parents[3]

# 20 rounds of a 64 MiB array filled, freed and allocated again, in a fresh process each time.
ROUNDS = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from core.malloc import jemalloc_loaded, reuse_freed_memory

    applied = reuse_freed_memory() if sys.argv[1] == "reuse" else jemalloc_loaded()
    np.ones(8 << 20).sum()  # the first round may fault: memory the process never had
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        np.ones(8 << 20).sum()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    applied, faults = done.stdout.split()
    return applied, int(faults)


def test_freed_arrays_are_reused_without_page_faults() -> None:
    huge_pages = (64 << 20) // (2 << 20)  # the fewest faults a round can take (numpy asks for huge pages)
    applied, faults = _faults("reuse")
    _, default_faults = _faults("default")
    assert applied == "True"
    assert default_faults >= 20 * huge_pages  # glibc's default: every round maps and faults it again
    assert faults < huge_pages


@pytest.fixture
def no_allocator_choices(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """None of the variables that choose or configure the allocator is set (a developer's own are kept)."""
    for name in malloc.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_workers_get_jemalloc_keeping_freed_pages(no_allocator_choices: pytest.MonkeyPatch) -> None:
    """`make` installs libjemalloc2; processes started with allocator_env() allocate with it, and its
    settings keep freed pages (jemalloc's own defaults fault every round again)."""
    clean = dict(os.environ)
    env = malloc.allocator_env()
    assert malloc.jemalloc_library() is not None, "libjemalloc2 is not installed (make system)"
    assert env["LD_PRELOAD"] == malloc.jemalloc_library() and env["MALLOC_CONF"] == malloc.JEMALLOC_CONF
    huge_pages = (64 << 20) // (2 << 20)
    loaded, faults = _faults("workers", {**clean, **env})
    assert loaded == "True"
    assert faults < huge_pages
    loaded, default_faults = _faults("workers", {**clean, "LD_PRELOAD": env["LD_PRELOAD"]})
    assert loaded == "True" and default_faults >= 20 * huge_pages


def test_the_users_allocator_choices_are_kept(no_allocator_choices: pytest.MonkeyPatch) -> None:
    """LIPSYNC_ALLOCATOR=glibc, or a LD_PRELOAD / MALLOC_CONF / GLIBC_TUNABLES of the user's, win."""
    env_var = no_allocator_choices
    env_var.setenv(malloc.CHOICE_VARIABLE, "glibc")
    assert malloc.allocator_env() == {"GLIBC_TUNABLES": malloc.TUNABLES}
    env_var.delenv(malloc.CHOICE_VARIABLE)
    env_var.setenv("LD_PRELOAD", "libtcmalloc.so.4")
    assert malloc.allocator_env() == {"GLIBC_TUNABLES": malloc.TUNABLES}
    env_var.delenv("LD_PRELOAD")
    env_var.setenv("MALLOC_CONF", "narenas:2")
    env_var.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    env = malloc.allocator_env()
    assert "GLIBC_TUNABLES" not in env and env["MALLOC_CONF"] == "narenas:2"  # passed on to remote workers
