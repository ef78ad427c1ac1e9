"""reuse_freed_memory: big arrays freed and allocated again must not page-fault each time."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# 20 rounds of a 64 MiB array filled, freed and allocated again, in a fresh process each time.
ROUNDS = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from lipsync.malloc import reuse_freed_memory

    applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
    np.ones(8 << 20).sum()  # the first round may fault: memory the process never had
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        np.ones(8 << 20).sum()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode], cwd=REPO, capture_output=True, text=True, check=True
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
