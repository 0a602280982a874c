"""Fixtures shared by the plugin's tests."""

from __future__ import annotations

import pytest
from qkdagent.testing.pytest_plugin import install_logging_guard


def pytest_configure(config: pytest.Config) -> None:
    """Each test leaves the logging tree as it found it (the test kit's guard)."""
    install_logging_guard(config)
