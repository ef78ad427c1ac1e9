"""Unit tests run without Ray: any test that starts it fails here (it belongs in tests/integration)."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def no_ray():  # noqa: ANN201
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        pytest.fail("a unit test started Ray: move it to tests/integration")
