"""Every test in this folder runs once per Redis topology: single, cluster and sentinel.

The Redis-facing tests of other folders are reused here by import (`test_reused.py`), so the
same assertions hold on every topology without a copy to drift."""

from __future__ import annotations

import pytest


@pytest.fixture
def redis_url(redis_topology: str) -> str:
    """Here `redis_url` is each topology's URL in turn (the root conftest's matrix)."""
    return redis_topology
