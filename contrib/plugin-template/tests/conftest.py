"""Fixtures shared by the plugin's tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from qkdagent.testing.pytest_plugin import install_logging_guard


def pytest_configure(config: pytest.Config) -> None:
    """Each test leaves the logging tree as it found it (the test kit's guard)."""
    install_logging_guard(config)


@pytest.fixture
def provision(tmp_path: Path) -> Callable[..., list[Path]]:
    """`provision(count)` -> two directories (alice's and bob's) holding the same key files."""

    def make(
        count: int, *, size: int = 32, names: tuple[str, ...] = ("alice", "bob")
    ) -> list[Path]:
        directories = [tmp_path / f"keys-{name}" for name in names]
        for directory in directories:
            directory.mkdir(mode=0o700, exist_ok=True)
        for n in range(count):
            value = os.urandom(size)
            for directory in directories:
                (directory / f"k{n:06d}").write_bytes(value)
        return directories

    return make
