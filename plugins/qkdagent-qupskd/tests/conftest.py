"""Fixtures: the in-memory network under the protocol, and `qupskd-fake`, a test source that
hands out keys as quPSKd's fake KME does (key = SHA3-256(key_ID)), for virtual-clock tests
(the real 014 source over plain HTTP is used in the process tests)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator

import pytest
import trio.testing
from qkdagent_qupskd import net

from qkdagent import Key, Link, Secret, Source, hookimpl
from qkdagent.testing.pytest_plugin import install_logging_guard

from .memnet import MemoryNetwork


def pytest_configure(config: pytest.Config) -> None:
    install_logging_guard(config)


class QupskdFakeSource(Source):
    """quPSKd's fake KME as a source: every key is determined by its ID (not secret at all)."""

    type_name = "qupskd-fake"
    taken: list[str] = []

    async def new_key(self, link: Link) -> Key:
        key_id = str(uuid.uuid4())
        return Key(key_id, Secret(hashlib.sha3_256(key_id.encode()).digest()))

    async def key_by_id(self, link: Link, key_id: str) -> Key:
        self.taken.append(key_id)
        return Key(key_id, Secret(hashlib.sha3_256(key_id.encode()).digest()))


class _Plugin:
    @hookimpl
    def qkdagent_register_sources(self, register):  # type: ignore[no-untyped-def]
        register(QupskdFakeSource)


@pytest.fixture(autouse=True)
def _fake_source(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkdagent import plugins

    original = plugins.Plugins.load

    def load(self, names, group="qkdagent.plugins"):  # type: ignore[no-untyped-def]
        original(self, names, group=group)
        if "qupskd-fake" not in self.sources:
            self.add("qupskd-fake", _Plugin(), "test")

    monkeypatch.setattr(plugins.Plugins, "load", load)


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
