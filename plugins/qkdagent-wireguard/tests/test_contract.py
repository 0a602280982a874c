"""The core's SinkContract against real wireguard-go, directly over UAPI and through the broker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from qkdagent_wireguard.sink import WireGuardSink
from wg_testbed import Pair

from qkdagent import Link
from qkdagent.testing import SinkContract


class _ReadBackFromWg:
    @pytest.fixture
    def read_back(self, userspace_pair: Pair) -> Callable[[Link], object]:
        a, b = userspace_pair.a, userspace_pair.b
        assert a is not None and b is not None

        async def read(link: Link) -> bytes | None:
            return await trio.to_thread.run_sync(a.psk_of, b)

        return read


class _ResolvesToUapi:
    @pytest.fixture(autouse=True)
    def resolved_to_uapi(self, sink: WireGuardSink) -> None:
        """Checked once the suite has prepared the sink, before each test."""
        assert sink.resolved == "uapi"


class TestUapiSinkContract(_ReadBackFromWg, _ResolvesToUapi, SinkContract):
    @pytest.fixture
    def unprepared_sink(self, userspace_pair: Pair, make_sink, link: Link) -> WireGuardSink:  # type: ignore[no-untyped-def]
        return make_sink(userspace_pair.a, userspace_pair.b, links=(link,), backend="uapi")


class TestAutoSinkContract(_ReadBackFromWg, _ResolvesToUapi, SinkContract):
    """`auto` finds wireguard-go's control socket and uses it."""

    @pytest.fixture
    def unprepared_sink(self, userspace_pair: Pair, make_sink, link: Link) -> WireGuardSink:  # type: ignore[no-untyped-def]
        return make_sink(userspace_pair.a, userspace_pair.b, links=(link,))


class TestBrokerSinkContract(_ReadBackFromWg, SinkContract):
    @pytest.fixture
    def broker_socket(self, userspace_pair: Pair, broker_factory) -> Path:  # type: ignore[no-untyped-def]
        a, b = userspace_pair.a, userspace_pair.b
        return broker_factory("--allow", f"{a.iface}:{b.public_text}", "--backend", "uapi")

    @pytest.fixture
    def unprepared_sink(  # type: ignore[no-untyped-def]
        self, userspace_pair: Pair, make_sink, broker_socket: Path, link: Link
    ) -> WireGuardSink:
        a, b = userspace_pair.a, userspace_pair.b
        return make_sink(a, b, links=(link,), backend="broker", broker_socket=str(broker_socket))
