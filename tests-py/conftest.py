"""Shared fixtures for the chart, deploy and GitOps tests (run with `make test-py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helm_render  # noqa: E402


@pytest.fixture(scope="session")
def default_render() -> helm_render.Rendered:
    """The chart installed with its default values."""
    return helm_render.render()
