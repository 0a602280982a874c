"""`tlsstream.TlsStream` over real loopback TCP and OpenSSL: against itself and, both ways,
against trio's SSLStream (the stream it replaces), with trio's error semantics."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from qkdagent.pki import PkiFiles, write_test_pki
from qkdagent.tlsclient import client_ssl_context
from qkdagent.tlsstream import TlsStream
from tests.helpers import ScheduleCount

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


async def test_a_cancelled_receive_leaves_the_stream_usable_a_cancelled_send_breaks_it(
    pki: PkiFiles, autojump_clock: trio.testing.MockClock
) -> None:
    client_ctx, server_ctx = contexts(pki, ssl.TLSVersion.TLSv1_3)
    async with connected(client_ctx, server_ctx) as (ours, theirs):
        with trio.move_on_after(1) as scope:
            await ours.receive_some()
        assert scope.cancelled_caught
        await theirs.send_all(b"after")
        assert await ours.receive_some() == b"after"
        with trio.move_on_after(1) as scope:
            await ours.send_all(os.urandom(32 * 1024 * 1024))  # the peer never reads
        assert scope.cancelled_caught
        with pytest.raises(trio.BrokenResourceError):
            await ours.send_all(b"more")


async def test_a_send_the_socket_takes_at_once_is_a_cancel_point_and_no_schedule_point(
    pki: PkiFiles,
) -> None:
    """Every caller waits for the peer right after a send: a pass of the loop after it as
    well was a second one per message. A send that must wait for the socket still yields."""
    client_ctx, server_ctx = contexts(pki, ssl.TLSVersion.TLSv1_3)
    async with connected(client_ctx, server_ctx) as (ours, theirs):
        with ScheduleCount() as count:
            await ours.send_all(b"hello")
            assert count.points == 0  # the task never left the loop's hands
            await trio.lowlevel.checkpoint()
            assert count.points == 1  # (what a schedule point looks like)
        assert await receive_exactly(theirs, 5) == b"hello"
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await ours.send_all(b"never")  # a cancel point: nothing was sent
        await ours.send_all(b"still usable")
        assert await receive_exactly(theirs, 12) == b"still usable"


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


def _flooding_tls13_server(
    listener: socket.socket, ctx: ssl.SSLContext, keylog: Path, records: int, sent: threading.Event
) -> None:
    """A hostile TLS 1.3 server (blocking, on a thread): after an ordinary handshake it seals
    records of its own with its traffic key (from its key log), each holding some 900 minimal
    NewSessionTicket messages, which OpenSSL processes whatever their number, and one record of
    data at the end. All of it is in the socket before the client reads."""
    sock, _ = listener.accept()
    with sock, contextlib.ExitStack() as done:
        done.callback(sent.set)  # the client stops waiting whatever happens here
        sock.settimeout(10)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_side=True)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())
        line = next(x for x in keylog.read_text().splitlines() if "SERVER_TRAFFIC_SECRET_0" in x)
        secret = bytes.fromhex(line.split()[2])
        cipher = tls.cipher()
        assert cipher is not None
        suite = cipher[0]
        digest = hashes.SHA384() if suite.endswith("SHA384") else hashes.SHA256()

        def label(name: bytes, size: int) -> bytes:
            full = b"tls13 " + name
            info = struct.pack(">HB", size, len(full)) + full + b"\x00"
            return HKDFExpand(digest, size, info).derive(secret)

        iv = label(b"iv", 12)
        aead: AESGCM | ChaCha20Poly1305
        if "CHACHA20" in suite:
            aead = ChaCha20Poly1305(label(b"key", 32))
        else:
            aead = AESGCM(label(b"key", 32 if "AES_256" in suite else 16))
        body = struct.pack(">IIBH", 0, 0, 0, 1) + b"x" + struct.pack(">H", 0)
        ticket = b"\x04" + len(body).to_bytes(3, "big") + body
        tickets = ticket * (16000 // len(ticket)) + b"\x16"  # inner content type: handshake
        blob = bytearray()
        for seq, inner in enumerate([tickets] * records + [b"end\x17"]):
            nonce = bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))
            header = b"\x17\x03\x03" + struct.pack(">H", len(inner) + 16)
            blob += header + aead.encrypt(nonce, inner, header)
        sock.sendall(blob)
        sent.set()
        sock.recv(1)  # until the client closes


async def test_records_without_data_cannot_hold_the_loop(pki: PkiFiles, tmp_path: Path) -> None:
    """Every socket read is a checkpoint: a peer that keeps the socket full of records that
    carry no data (here session tickets; key updates alike) lets the other tasks, and every
    deadline, run between reads."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server"].cert, pki["server"].key)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0
    ctx.keylog_filename = str(tmp_path / "keylog")
    client_ctx = client_ssl_context(pki["client"].cert, pki["client"].key, pki.ca_cert, what="t")
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    listener = socket.create_server(("127.0.0.1", 0))
    sent = threading.Event()
    records = 16  # 256 KiB: in the socket buffers whole, so no read of the client waits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(
                trio.to_thread.run_sync,
                _flooding_tls13_server,
                listener,
                ctx,
                tmp_path / "keylog",
                records,
                sent,
                abandon_on_cancel=True,
            )
        )
        tcp = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
        stream = TlsStream(tcp, client_ctx, server_hostname="localhost")
        await stream.do_handshake()
        assert await trio.to_thread.run_sync(sent.wait, 30)
        assert tcp.socket.is_readable()
        ticks = 0
        reading = True

        async def ticker() -> None:
            nonlocal ticks
            while reading:
                await trio.lowlevel.checkpoint()
                ticks += 1

        nursery.start_soon(ticker)
        assert await stream.receive_some() == b"end"
        reading = False
        # 16 records of 16 KB in 64 KiB reads: a checkpoint after each (without: 0 or 1)
        assert ticks >= 3
        await stream.aclose()
    listener.close()


async def test_a_tls13_server_sends_its_session_tickets_with_its_first_data(
    pki: PkiFiles,
) -> None:
    """As trio does: sent at the handshake, tickets a client closes without reading turn its
    close into a reset."""
    client_ctx, server_ctx = contexts(pki, ssl.TLSVersion.TLSv1_3)
    async with connected(client_ctx, server_ctx) as (ours, theirs):
        await trio.testing.wait_all_tasks_blocked()
        assert not ours.transport_stream.socket.is_readable()
        await theirs.send_all(b"first")
        assert await receive_exactly(ours, 5) == b"first"


@pytest.mark.parametrize("client", [_ours, _trios], ids=["ours", "trio"])
async def test_a_tls13_server_closing_before_any_data_closes_cleanly(
    pki: PkiFiles, client: Wrap
) -> None:
    """Its close_notify follows the held tickets (they took the first record numbers)."""
    client_ctx, server_ctx = contexts(pki, ssl.TLSVersion.TLSv1_3)
    async with connected(client_ctx, server_ctx, client) as (ours, theirs):
        await theirs.aclose()
        assert await ours.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await theirs.send_all(b"x")  # closed, not broken


async def test_closed_under_a_waiting_send_it_stays_closed(pki: PkiFiles) -> None:
    client_ctx, server_ctx = contexts(pki, ssl.TLSVersion.TLSv1_3)
    async with connected(client_ctx, server_ctx) as (ours, _):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await ours.send_all(os.urandom(32 * 1024 * 1024))  # the peer never reads

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            await ours.aclose()
        for call in (ours.receive_some(), ours.send_all(b"x")):
            with pytest.raises(trio.ClosedResourceError):
                await call
