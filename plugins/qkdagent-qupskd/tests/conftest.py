"""Fixtures: the in-memory network under the protocol and a virtual clock for it. In-process
tests give the agent the test kit's `memory` source, its keys shared with the quPSKd peer's
fake KME (tests/qupskd_peer.py); the process tests use the real 014 source over plain HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio.testing
from qkdagent_qupskd import net

from qkdagent.testing.pytest_plugin import install_logging_guard

from .memnet import MemoryNetwork


def pytest_configure(config: pytest.Config) -> None:
    install_logging_guard(config)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps as soon as everything waits: the in-process pairs use no threads
    (the test kit's local network keeps the state store inline, the `memory` source shares its
    keys with the quPSKd peer's fake KME), so no timer can fire while a commit is running."""
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def memnet() -> Iterator[MemoryNetwork]:
    network = MemoryNetwork()
    previous = net.use_network(network)
    try:
        yield network
    finally:
        net.use_network(previous)
