"""System tools the tests need."""

from __future__ import annotations

import shutil
import subprocess


def require_tool(name: str) -> None:
    """Fail loudly (not skip) when a system tool the project installs is missing."""
    assert shutil.which(name), f"{name} is not installed; run `make venv` (installs system packages)"


def ffmpeg_cli(*args: str) -> None:
    """Run the system ffmpeg quietly (test fixtures: cutting, re-encoding, making bad files)."""
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args], check=True)
