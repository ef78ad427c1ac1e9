"""Unit tests run without Ray: a test that starts it fails here (it belongs in tests/integration). In a full
run the integration tests' session Ray may already be up; only a test that starts Ray itself is failed."""

from __future__ import annotations

import sys

import pytest


def ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def no_ray():  # noqa: ANN201
    already_up = ray_is_up()
    yield
    if not already_up and ray_is_up():
        pytest.fail("a unit test started Ray: move it to tests/integration")
