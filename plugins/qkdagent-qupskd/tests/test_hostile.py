"""A hostile or broken quPSKd side: every bad answer fails that exchange through
`link.report_failure` and changes nothing (epoch, chain state, sinks); the agent's quPSKd
endpoint answers only GET /new, /rotate, /ack and refuses what would desynchronise it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from qkdagent_qupskd import http
from qkdagent_qupskd.net import network

from .memnet import MemoryNetwork
from .test_interop import ALICE, agent_psk, alice_pair, bob_peer, protocol, start_alice, until

Answer = Callable[[str], tuple[int, bytes] | None]


def on_rotate(status: int, body: bytes) -> Answer:
    def answer(target: str) -> tuple[int, bytes] | None:
        return (status, body) if target in ("/new", "/rotate") else None

    return answer


HOSTILE = [
    pytest.param(on_rotate(200, b"x" * 100_000), "larger than", id="oversized"),
    pytest.param(on_rotate(200, b"<html>"), "not JSON", id="not-json"),
    pytest.param(on_rotate(200, b'{"status": "ok", "key_ID": 7}'), "key_ID", id="wrong-type"),
    pytest.param(
        on_rotate(200, json.dumps({"status": "ok", "key_ID": "k" * 300}).encode()),
        "longer than",
        id="long-key-id",
    ),
    pytest.param(on_rotate(200, b'{"status": "busy", "key_ID": "a"}'), "status", id="status"),
    pytest.param(on_rotate(500, b"{}"), "answered 500", id="http-500"),
    pytest.param(
        lambda t: (200, b'{"status": "nope"}') if t == "/ack" else None, "status", id="bad-ack"
    ),
]


@pytest.mark.parametrize(("answer", "problem"), HOSTILE)
async def test_a_bad_answer_fails_the_exchange_without_touching_state(
    tmp_path: Path,
    memnet: MemoryNetwork,
    clock: trio.testing.MockClock,
    answer: Answer,
    problem: str,
) -> None:
    peer = bob_peer(tmp_path, memnet, client_enabled=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        async with alice_pair(tmp_path) as pair:
            await start_alice(pair)
            await until(lambda: pair.epoch("alice") >= 2)
            link = pair.alice.link("alice-bob")
            epoch, state, psk = pair.epoch("alice"), link.record.source_state, agent_psk(pair)
            peer.override = answer
            await until(lambda: protocol(pair)["qupskd_failed"] >= 3, within=2000)
            assert pair.epoch("alice") == epoch and link.record.source_state == state
            assert agent_psk(pair) == psk
            status = protocol(pair)
            assert problem in (status["last_error"] or "") and status["qupskd_synced"] is True
            # the peer recovers: the chain continues where it was
            peer.override = None
            await until(lambda: pair.epoch("alice") > epoch)
            await until(lambda: peer.psk_file.read_bytes() == agent_psk(pair))  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_a_reused_key_id_is_refused(
    tmp_path: Path, memnet: MemoryNetwork, clock: trio.testing.MockClock
) -> None:
    peer = bob_peer(tmp_path, memnet, client_enabled=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        async with alice_pair(tmp_path) as pair:
            await start_alice(pair)
            await until(lambda: pair.epoch("alice") >= 1)
            used = peer.key_id
            epoch = pair.epoch("alice")
            peer.override = on_rotate(200, json.dumps({"status": "ok", "key_ID": used}).encode())
            await until(lambda: protocol(pair)["qupskd_failed"] >= 2, within=2000)
            assert pair.epoch("alice") == epoch
            assert "already used" in protocol(pair)["last_error"]
        nursery.cancel_scope.cancel()


async def _ask(target: str, method: str = "GET", raw: bytes | None = None) -> tuple[int, bytes]:
    stream = await network().connect(*ALICE)
    request = raw or f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    await stream.send_all(request)
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_the_endpoint_serves_only_the_three_gets_and_refuses_desynchronising_calls(
    tmp_path: Path, memnet: MemoryNetwork, clock: trio.testing.MockClock
) -> None:
    memnet.down.add(("127.0.0.1", 5556))  # no peer: the agent stays unsynchronised
    async with alice_pair(tmp_path) as pair:
        await start_alice(pair)
        for target, method in (("/", "GET"), ("/new", "POST"), ("/api/v1/keys/x/status", "GET")):
            assert (await _ask(target, method))[0] == 404
        assert (await _ask("", raw=b"GET /new HTTP/1.1\r\n" + b"X: y\r\n" * 4000))[0] == 400
        assert (await _ask("", raw=b"\x16\x03\x01 not http\r\n\r\n"))[0] == 400
        # /rotate on a chain that is not synchronised would silently disagree: refused
        assert (await _ask("/rotate"))[0] == 409
        # /ack without an offered key changes nothing
        assert (await _ask("/ack"))[0] == 409
        assert pair.epoch("alice") == 0
        # /new is the way in (anyone on the path can do this: the protocol is unauthenticated)
        status, body = await _ask("/new")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert (await _ask("/ack"))[0] == 200 and pair.epoch("alice") == 1
        assert protocol(pair)["qupskd_last_role"] == "receiver"


async def test_the_client_bounds_what_it_reads(
    memnet: MemoryNetwork, clock: trio.testing.MockClock
) -> None:
    async def trickle(stream: trio.abc.Stream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(memnet.serve, "peer", 1, trickle)
        began = trio.current_time()
        with pytest.raises(http.HttpError, match="within 10 s"):  # a trickle never completes
            await http.get(memnet, "peer", 1, "/new", within=10, max_body=1000)
        assert trio.current_time() - began == pytest.approx(10)
        with pytest.raises(http.HttpError, match="larger than 16"):  # refused from the header
            await http.get(memnet, "peer", 1, "/new", within=10, max_body=16)
        with pytest.raises(http.HttpError, match="cannot connect"):
            await http.get(memnet, "nobody", 1, "/new", within=10, max_body=16)
        nursery.cancel_scope.cancel()

    async def tiny_pieces(stream: trio.abc.Stream) -> None:  # 5 us a piece to parse
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        await stream.send_all(head + b"1\r\nx\r\n" * (http.MAX_BODY_PIECES + 1))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(memnet.serve, "chunky", 1, tiny_pieces)
        with pytest.raises(http.HttpError, match="more than 4096 pieces"):
            await http.get(memnet, "chunky", 1, "/new", within=10, max_body=1 << 20)
        nursery.cancel_scope.cancel()


async def test_the_tcp_endpoint_binds_the_configured_address_only() -> None:
    """quPSKd's qupskd_bind: a listener on 127.0.0.1 is not reachable as 127.0.0.2 (a wildcard
    bind would be, on Linux loopback)."""
    from qkdagent_qupskd.net import TcpNetwork

    from qkdagent.testing import free_port

    async def ok(method: str, target: str) -> tuple[int, bytes]:
        return 200, b"{}"

    async def answer(stream: trio.abc.Stream) -> None:
        await http.serve_one(stream, ok, within=5)

    port = free_port()
    tcp = TcpNetwork()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: tcp.serve("127.0.0.1", port, answer, task_status=task_status)
        )
        assert (await http.get(tcp, "127.0.0.1", port, "/new", within=5, max_body=100))[0] == 200
        with pytest.raises(http.HttpError, match="cannot connect"):
            await http.get(tcp, "127.0.0.2", port, "/new", within=5, max_body=100)
        nursery.cancel_scope.cancel()
