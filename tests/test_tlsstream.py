"""`tlsstream.TlsStream` over real loopback TCP and OpenSSL: against itself and, both ways,
against trio's SSLStream (the stream it replaces), with trio's error semantics."""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from qkdagent.pki import PkiFiles, write_test_pki
from qkdagent.tlsclient import client_ssl_context
from qkdagent.tlsstream import TlsStream

Wrap = Callable[..., Any]


def _ours(tcp: trio.SocketStream, ctx: ssl.SSLContext, **kw: Any) -> Any:
    return TlsStream(tcp, ctx, **kw)


def _trios(tcp: trio.SocketStream, ctx: ssl.SSLContext, **kw: Any) -> Any:
    return trio.SSLStream(tcp, ctx, **kw)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    return write_test_pki(tmp_path_factory.mktemp("pki"), ["client", "server", "stranger"])


def contexts(pki: PkiFiles, version: ssl.TLSVersion) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_cert))
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(pki["server"].cert, pki["server"].key)
    server.minimum_version = server.maximum_version = version
    client = client_ssl_context(pki["client"].cert, pki["client"].key, pki.ca_cert, what="test")
    return client, server


@asynccontextmanager
async def connected(
    client_ctx: ssl.SSLContext,
    server_ctx: ssl.SSLContext,
    client: Wrap = _ours,
    server: Wrap = _ours,
    *,
    handshake: bool = True,
) -> AsyncIterator[tuple[Any, Any]]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        client_tcp = await trio.open_tcp_stream("127.0.0.1", port)
        server_tcp = await listeners[0].accept()
    finally:
        await listeners[0].aclose()
    ours = client(client_tcp, client_ctx, server_hostname="localhost")
    theirs = server(server_tcp, server_ctx, server_side=True)
    try:
        if handshake:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ours.do_handshake)
                nursery.start_soon(theirs.do_handshake)
        yield ours, theirs
    finally:
        for stream in (ours, theirs):
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass


async def receive_exactly(stream: Any, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        piece = await stream.receive_some()
        assert piece, "EOF before the whole message"
        data += piece
    return bytes(data)


VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
SIDES = [(_ours, _ours), (_ours, _trios), (_trios, _ours)]


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("client,server", SIDES, ids=["ours-ours", "ours-trio", "trio-ours"])
async def test_data_both_ways_then_a_clean_close(
    pki: PkiFiles, version: ssl.TLSVersion, client: Wrap, server: Wrap
) -> None:
    client_ctx, server_ctx = contexts(pki, version)
    big = os.urandom(3 * 1024 * 1024)  # more than the socket buffers: sends wait for reads
    async with connected(client_ctx, server_ctx, client, server) as (ours, theirs):
        assert dict(x[0] for x in ours.getpeercert()["subject"])["commonName"] == "server"
        assert dict(x[0] for x in theirs.getpeercert()["subject"])["commonName"] == "client"
        assert isinstance(ours.getpeercert(binary_form=True), bytes)

        async def echo() -> None:
            await theirs.send_all(await receive_exactly(theirs, len(big)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            await ours.send_all(big)
            assert await receive_exactly(ours, len(big)) == big
        await theirs.send_all(b"last")
        await theirs.aclose()  # close_notify
        assert await ours.receive_some(100) == b"last"
        assert await ours.receive_some(100) == b""  # the end, not a break


async def test_an_unknown_ca_fails_both_handshakes_with_the_ssl_reason(
    pki: PkiFiles, tmp_path: Path
) -> None:
    other = write_test_pki(tmp_path / "other", ["client"])
    stranger = client_ssl_context(other["client"].cert, other["client"].key, pki.ca_cert, what="t")
    _, server_ctx = contexts(pki, ssl.TLSVersion.TLSv1_3)
    async with connected(stranger, server_ctx, handshake=False) as (ours, theirs):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours.do_handshake)  # TLS 1.3: the client finishes first
            with pytest.raises(trio.BrokenResourceError) as server_side:
                await theirs.do_handshake()
        assert isinstance(server_side.value.__cause__, ssl.SSLCertVerificationError)
        with pytest.raises(trio.BrokenResourceError) as client_side:
            await ours.receive_some()
        # the server's alert says why (not a bare EOF)
        assert isinstance(client_side.value.__cause__, ssl.SSLError)
        assert "ALERT" in str(client_side.value.__cause__).upper()
        with pytest.raises(trio.BrokenResourceError):
            await theirs.send_all(b"x")  # broken for good


async def test_an_eof_without_close_notify_is_a_break_not_the_end(pki: PkiFiles) -> None:
    client_ctx, server_ctx = contexts(pki, ssl.TLSVersion.TLSv1_3)
    async with connected(client_ctx, server_ctx) as (ours, theirs):
        await theirs.send_all(b"partial")
        await theirs.transport_stream.aclose()  # a truncation: TCP FIN, no TLS close
        assert await ours.receive_some() == b"partial"
        with pytest.raises(trio.BrokenResourceError) as info:
            await ours.receive_some()
        assert isinstance(info.value.__cause__, ssl.SSLError)
        with pytest.raises(trio.BrokenResourceError):
            await ours.receive_some()


async def test_a_socket_closed_under_a_waiting_receive(pki: PkiFiles) -> None:
    """An eviction closes the TCP socket from another task: the waiting receive ends, and no
    later call touches the descriptor (whose number may be reused)."""
    client_ctx, server_ctx = contexts(pki, ssl.TLSVersion.TLSv1_3)
    async with connected(client_ctx, server_ctx) as (_, theirs):
        async with trio.open_nursery() as nursery:

            async def evict() -> None:
                await trio.testing.wait_all_tasks_blocked()
                theirs.transport_stream.socket.close()

            nursery.start_soon(evict)
            with pytest.raises(trio.ClosedResourceError):
                await theirs.receive_some()
        reused = os.open(os.devnull, os.O_WRONLY)  # likely the freed descriptor number
        try:
            for call in (theirs.send_all(b"x"), theirs.receive_some()):
                with pytest.raises((trio.ClosedResourceError, trio.BrokenResourceError)):
                    await call
        finally:
            os.close(reused)


async def test_a_cancelled_send_breaks_the_stream(
    pki: PkiFiles, autojump_clock: trio.testing.MockClock
) -> None:
    client_ctx, server_ctx = contexts(pki, ssl.TLSVersion.TLSv1_3)
    async with connected(client_ctx, server_ctx) as (ours, _):
        with trio.move_on_after(1) as scope:
            await ours.send_all(os.urandom(32 * 1024 * 1024))  # the peer never reads
        assert scope.cancelled_caught
        with pytest.raises(trio.BrokenResourceError):
            await ours.send_all(b"more")


async def test_a_cancelled_receive_leaves_the_stream_usable(
    pki: PkiFiles, autojump_clock: trio.testing.MockClock
) -> None:
    client_ctx, server_ctx = contexts(pki, ssl.TLSVersion.TLSv1_3)
    async with connected(client_ctx, server_ctx) as (ours, theirs):
        with trio.move_on_after(1) as scope:
            await ours.receive_some()
        assert scope.cancelled_caught
        await theirs.send_all(b"after")
        assert await ours.receive_some() == b"after"


async def test_one_sender_and_one_receiver_at_a_time(
    pki: PkiFiles, autojump_clock: trio.testing.MockClock
) -> None:
    client_ctx, server_ctx = contexts(pki, ssl.TLSVersion.TLSv1_3)
    async with connected(client_ctx, server_ctx) as (ours, _):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours.receive_some)
            nursery.start_soon(ours.send_all, os.urandom(32 * 1024 * 1024))
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await ours.receive_some()
            with pytest.raises(trio.BusyResourceError):
                await ours.send_all(b"x")
            nursery.cancel_scope.cancel()


async def test_calls_before_the_handshake_and_after_close(pki: PkiFiles) -> None:
    client_ctx, server_ctx = contexts(pki, ssl.TLSVersion.TLSv1_3)
    async with connected(client_ctx, server_ctx, handshake=False) as (ours, _):
        with pytest.raises(trio.BrokenResourceError):
            await ours.send_all(b"x")  # no handshake yet: nothing is sent in the clear
        with pytest.raises(ValueError):
            await ours.receive_some(0)
        await ours.aclose()
        await ours.aclose()  # twice is fine
        with pytest.raises(trio.ClosedResourceError):
            await ours.receive_some()
