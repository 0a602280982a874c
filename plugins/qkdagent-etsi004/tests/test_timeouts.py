"""Server timeouts under trio's virtual clock (a module served over in-memory streams, TLS
included), and the rate-limit statuses: a wait within the QoS timeout is served, one beyond it
is status 6 (in virtual time: the module's clock is trio's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from qkdagent_etsi004 import codec
from qkdagent_etsi004.codec import Dialect, QoS
from qkdagent_etsi004.network import ModuleNetwork
from qkdagent_etsi004.server import FRAME_TIMEOUT, IDLE_TIMEOUT, ModuleServer, server_ssl_context
from qkdagent_etsi004.sim import Simulator
from qkdagent_etsi004.transport import read_frame

from qkdagent import SourceUnavailable

from .conftest import ALICE, BOB
from .test_hostile import client_context


async def served(
    pki: Path, events: list[str], **network_options: Any
) -> tuple[ModuleServer, trio.SSLStream[Any], Any]:
    """A module server handling one in-memory connection, and alice's TLS end of it."""
    network = ModuleNetwork(
        {"QKDM_A": ["alice"], "QKDM_B": ["bob"]}, [("QKDM_A", "QKDM_B")], **network_options
    )
    context = server_ssl_context(pki / "QKDM_A.pem", pki / "QKDM_A.key", pki / "ca.pem")
    server = ModuleServer(network, "QKDM_A", context, on_event=events.append)
    client_end, server_end = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_end, client_context(pki, "alice"), server_hostname="QKDM_A")
    return server, client, server_end


async def test_a_slow_sender_is_cut_off_at_the_frame_timeout(
    pki: Path, autojump_clock: trio.abc.Clock
) -> None:
    events: list[str] = []
    server, client, server_end = await served(pki, events)
    frame = codec.encode(Dialect.V2, codec.CloseRequest(bytes(range(16))))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._handle, server_end)
        await client.do_handshake()
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):
            for byte in frame:  # one byte a second: the frame would take 24 s
                await client.send_all(bytes([byte]))
                await trio.sleep(1)
        elapsed = trio.current_time() - start
    assert FRAME_TIMEOUT <= elapsed <= FRAME_TIMEOUT + 2
    assert server.refused_frames == 1
    assert any("frame not received within the timeout" in e for e in events), events


async def test_an_idle_connection_is_closed_without_a_refusal(
    pki: Path, autojump_clock: trio.abc.Clock
) -> None:
    events: list[str] = []
    server, client, server_end = await served(pki, events)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._handle, server_end)
        await client.do_handshake()
        await client.send_all(codec.encode(Dialect.V1, codec.CloseRequest(bytes(range(16)))))
        header, _ = await read_frame(client, max_length=codec.MAX_RESPONSE_PAYLOAD)
        assert header.service == codec.Service.CLOSE_RESPONSE  # served, then nothing more
        start = trio.current_time()
        with pytest.raises((EOFError, trio.BrokenResourceError)):
            await read_frame(client, max_length=codec.MAX_RESPONSE_PAYLOAD)
        assert trio.current_time() - start == pytest.approx(IDLE_TIMEOUT, abs=1)
    assert server.refused_frames == 0
    assert events[-1] == "connection from 'alice' closed"


async def test_a_rate_limit_beyond_the_qos_timeout_is_status_6(
    sim: Simulator, sources: Callable[..., Any]
) -> None:
    # 256 bits per key at 16 bit/s: the second key is 16 s away, the QoS timeout 100 ms
    slow = await sources("alice", max_bps=16, qos_timeout=100)
    first = await slow.new_key(ALICE)
    with pytest.raises(SourceUnavailable, match="status 6"):
        await slow.new_key(ALICE)
    bob = await sources("bob")
    assert (await bob.key_by_id(BOB, first.key_id)).value == first.value


@pytest.mark.parametrize(("qos_timeout", "status"), [(5000, 0), (500, 6)])
async def test_a_rate_limit_is_waited_for_within_the_qos_timeout(
    pki: Path, autojump_clock: trio.abc.Clock, qos_timeout: int, status: int
) -> None:
    """256-bit keys at 256 bit/s: the second is 1 s away; the module holds the answer that long
    if the QoS timeout allows it (virtual seconds), else answers status 6 at once."""
    events: list[str] = []
    server, client, server_end = await served(pki, events, clock=trio.current_time)

    async def call(message: codec.Message) -> tuple[codec.Message, float]:
        start = trio.current_time()
        await client.send_all(codec.encode(Dialect.V2, message))
        header, payload = await read_frame(client, max_length=codec.MAX_RESPONSE_PAYLOAD)
        answer = codec.decode_response(Dialect.V2, header.service, payload)
        return answer, trio.current_time() - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._handle, server_end)
        await client.do_handshake()
        qos = QoS(32, max_bps=256, timeout=qos_timeout)
        opened, _ = await call(codec.OpenConnectRequest("qkd://alice", "qkd://bob", qos))
        assert isinstance(opened, codec.OpenConnectResponse) and opened.status == 1
        first, waited = await call(codec.GetKeyRequest(opened.ksid, 0, 256, bytes(256)))
        assert isinstance(first, codec.GetKeyResponse) and first.status == 0 and waited < 0.01
        second, waited = await call(codec.GetKeyRequest(opened.ksid, 1, 256, bytes(256)))
        assert isinstance(second, codec.GetKeyResponse) and second.status == status
        if status == 0:
            assert waited == pytest.approx(1.0, abs=0.01) and second.key != first.key
        else:
            assert waited < 0.01 and second.key == b""
        nursery.cancel_scope.cancel()


def test_qos_grants_what_was_asked_within_the_link() -> None:
    """QoS answers state what was granted: asking beyond the link gets the link's rate."""
    network = ModuleNetwork(
        {"QKDM_A": ["alice"], "QKDM_B": ["bob"]}, [("QKDM_A", "QKDM_B")], rate_bps=1000
    )
    asked = QoS(32, max_bps=5000, timeout=1000, ttl=60)
    answer = network.open_connect(
        "QKDM_A", "alice", codec.OpenConnectRequest("qkd://alice", "qkd://bob", asked)
    )
    assert answer.status == codec.Status.QOS_NOT_SATISFIABLE
    assert answer.qos is not None and answer.qos.max_bps == 1000 and answer.qos.ttl == 60
