"""Fixtures: the in-memory network under the protocol and a virtual clock for it. In-process
tests give the agent the test kit's `keydir` source, shared with the quPSKd peer's fake KME
(tests/qupskd_peer.py); the process tests use the real 014 source over plain HTTP."""

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
    """Virtual time that jumps only after 5 ms of real idleness: the agent commits in a worker
    thread, and with a zero threshold time would leap to the next timer (a peer's expiry) while
    a commit is running. Tests then poll in whole seconds to stay fast."""
    return trio.testing.MockClock(autojump_threshold=0.005)


@pytest.fixture
def memnet() -> Iterator[MemoryNetwork]:
    network = MemoryNetwork()
    previous = net.use_network(network)
    try:
        yield network
    finally:
        net.use_network(previous)
