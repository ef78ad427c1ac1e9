"""System tools the tests need."""

from __future__ import annotations

import shutil


def require_tool(name: str) -> None:
    """Fail loudly (not skip) when a system tool the project installs is missing."""
    assert shutil.which(name), f"{name} is not installed; run `make venv` (installs system packages)"
