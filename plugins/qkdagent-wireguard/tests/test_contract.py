"""The core's SinkContract against real wireguard-go, directly over UAPI and through the broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
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


class TestUapiSinkContract(_ReadBackFromWg, SinkContract):
    @pytest.fixture
    async def sink(self, userspace_pair: Pair, make_sink) -> AsyncIterator[WireGuardSink]:  # type: ignore[no-untyped-def]
        sink = make_sink(userspace_pair.a, userspace_pair.b, backend="uapi")
        await sink.prepare()
        assert sink.resolved == "uapi"
        yield sink
        await sink.aclose()


class TestAutoSinkContract(_ReadBackFromWg, SinkContract):
    """`auto` finds wireguard-go's control socket and uses it."""

    @pytest.fixture
    async def sink(self, userspace_pair: Pair, make_sink) -> AsyncIterator[WireGuardSink]:  # type: ignore[no-untyped-def]
        sink = make_sink(userspace_pair.a, userspace_pair.b)
        await sink.prepare()
        assert sink.resolved == "uapi"
        yield sink
        await sink.aclose()


class TestBrokerSinkContract(_ReadBackFromWg, SinkContract):
    @pytest.fixture
    async def sink(  # type: ignore[no-untyped-def]
        self, userspace_pair: Pair, make_sink, broker_factory
    ) -> AsyncIterator[WireGuardSink]:
        a, b = userspace_pair.a, userspace_pair.b
        socket_path: Path = await trio.to_thread.run_sync(
            broker_factory, "--allow", f"{a.iface}:{b.public_text}", "--backend", "uapi"
        )
        sink = make_sink(a, b, backend="broker", broker_socket=str(socket_path))
        await sink.prepare()
        yield sink
        await sink.aclose()
