"""The initiator's side of the transport against a hostile server (real TLS on loopback):
replies are read with the bound while streaming, never expanded, and bounded in time; the
server's certificate is reported for the link to check (issue 11, defects 3, 5 and 7)."""

from __future__ import annotations

import collections
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from qkdagent.config import TlsFiles
from qkdagent.peering import PeerClient, ReplyTooLarge, TransportError
from qkdagent.peerserver import server_ssl_context
from qkdagent.pki import write_test_pki
from qkdagent.protocol import MAX_BODY

CHUNK = b"0" * 65536


def _tls(tmp_path: Path, name: str) -> TlsFiles:
    """One deployment CA per test, written on first use."""
    directory = tmp_path / "pki"
    if not (directory / "ca.pem").exists():
        write_test_pki(directory, ["alice", "bob", "mallory"])
    return TlsFiles(directory / f"{name}.pem", directory / f"{name}.key", directory / "ca.pem")


async def _serve(tmp_path: Path, nursery: trio.Nursery, name: str, answer) -> tuple[str, dict]:
    """A TLS server presenting `name`'s certificate; `answer(stream, sent)` writes the reply."""
    context = server_ssl_context(_tls(tmp_path, name))
    sent = {"bytes": 0}

    async def handle(stream: trio.SSLStream) -> None:
        try:
            await stream.do_handshake()
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            await answer(stream, sent)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, handle, 0, context, host="127.0.0.1")
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    return f"https://127.0.0.1:{port}", sent


async def _endless(stream: trio.SSLStream, sent: dict, head: bytes) -> None:
    await stream.send_all(head)
    while True:
        await stream.send_all(CHUNK)
        sent["bytes"] += len(CHUNK)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 536870912\r\n\r\n",  # declared: refused at once
        b"HTTP/1.1 409 Conflict\r\ntransfer-encoding: chunked\r\n\r\n",  # streamed: cut
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n",  # until EOF: cut
    ],
)
async def test_an_oversized_reply_is_cut_while_streaming(tmp_path: Path, head: bytes) -> None:
    async def answer(stream: trio.SSLStream, sent: dict) -> None:
        if b"chunked" in head:
            await stream.send_all(head)
            while True:
                await stream.send_all(b"10000\r\n" + CHUNK + b"\r\n")
                sent["bytes"] += len(CHUNK)
        await _endless(stream, sent, head)

    async with trio.open_nursery() as nursery:
        url, sent = await _serve(tmp_path, nursery, "bob", answer)
        client = PeerClient(_tls(tmp_path, "alice"), timeout=30)
        with pytest.raises(ReplyTooLarge):
            await client.post(url, "alice-bob", "rotate", b"{}")
        await client.aclose()
        nursery.cancel_scope.cancel()
    # What the client read is bounded by MAX_BODY plus what sat in socket buffers, not 512 MB.
    assert sent["bytes"] < 64 * MAX_BODY


async def test_a_compressed_reply_is_refused_not_expanded(tmp_path: Path) -> None:
    import gzip

    bomb = gzip.compress(b"\0" * (50 * 1024 * 1024))

    async def answer(stream: trio.SSLStream, sent: dict) -> None:
        head = f"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: {len(bomb)}\r\n\r\n"
        await stream.send_all(head.encode() + bomb)

    async with trio.open_nursery() as nursery:
        url, _ = await _serve(tmp_path, nursery, "bob", answer)
        client = PeerClient(_tls(tmp_path, "alice"), timeout=30)
        with pytest.raises(ReplyTooLarge, match="content encoding"):
            await client.post(url, "alice-bob", "rotate", b"{}")
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_trickling_reply_ends_at_the_total_deadline(tmp_path: Path) -> None:
    """httpx's timeout is per read: one byte a second would hold it forever. The client's
    deadline covers the whole request (checked by the exception type, not by timing)."""

    async def answer(stream: trio.SSLStream, sent: dict) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        while True:
            await stream.send_all(b"x")
            sent["bytes"] += 1
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        url, sent = await _serve(tmp_path, nursery, "bob", answer)
        client = PeerClient(_tls(tmp_path, "alice"), timeout=1)
        with pytest.raises(trio.TooSlowError):
            await client.post(url, "alice-bob", "rotate", b"{}")
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert 0 < sent["bytes"] < 1000


async def test_the_server_certificate_names_reach_the_caller(tmp_path: Path) -> None:
    async def answer(stream: trio.SSLStream, sent: dict) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    async with trio.open_nursery() as nursery:
        url, _ = await _serve(tmp_path, nursery, "mallory", answer)
        client = PeerClient(_tls(tmp_path, "alice"), timeout=5)
        reply = await client.post(url, "alice-bob", "rotate", b"{}")
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert reply.status == 200 and reply.body == b"{}"
    assert reply.identity.matches("mallory") and not reply.identity.matches("bob")


async def _next_head(stream: trio.SSLStream, data: bytes) -> tuple[bytes, bytes] | None:
    """The next request head on `stream` (`data`: read already) and the bytes after it; None
    at the end of the stream."""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def _keepalive_server(
    tmp_path: Path, nursery: trio.Nursery, close_after: int | None
) -> tuple[str, dict]:
    """Answers `{}` to each request on a connection; after `close_after` replies on one
    connection, the next request on it is read and the connection closed without a reply."""
    context = server_ssl_context(_tls(tmp_path, "bob"))
    seen = {"connections": 0, "requests": 0, "dropped": 0}

    async def handle(stream: trio.SSLStream) -> None:
        seen["connections"] += 1
        answered, data = 0, b""
        try:
            await stream.do_handshake()
            while True:
                request = await _next_head(stream, data)
                if request is None:
                    return
                head, data = request
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(data) < length:
                    data += await stream.receive_some(65536)
                data = data[length:]
                seen["requests"] += 1
                if close_after is not None and answered >= close_after:
                    seen["dropped"] += 1
                    await stream.aclose()
                    return
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                answered += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, handle, 0, context, host="127.0.0.1")
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    return f"https://127.0.0.1:{port}", seen


async def test_connections_are_kept_alive_and_reused(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        url, seen = await _keepalive_server(tmp_path, nursery, None)
        client = PeerClient(_tls(tmp_path, "alice"), timeout=10)
        for _ in range(5):
            reply = await client.post(url, "alice-bob", "rotate", b"{}")
            assert reply.status == 200 and reply.identity.matches("bob")
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert seen == {"connections": 1, "requests": 5, "dropped": 0}


async def test_a_kept_connection_the_server_dropped_is_replaced_once(tmp_path: Path) -> None:
    """The server takes the second request on a kept connection and closes it unanswered:
    the client sends it once more on a new connection (the protocol answers a repeat
    idempotently) and gets the reply there; a new connection closed unanswered is an error."""
    async with trio.open_nursery() as nursery:
        url, seen = await _keepalive_server(tmp_path, nursery, 1)
        client = PeerClient(_tls(tmp_path, "alice"), timeout=10)
        assert (await client.post(url, "alice-bob", "rotate", b"{}")).status == 200
        assert (await client.post(url, "alice-bob", "rotate", b"{}")).status == 200
        assert seen == {"connections": 2, "requests": 3, "dropped": 1}
        await client.aclose()
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        url, seen = await _keepalive_server(tmp_path, nursery, 0)
        client = PeerClient(_tls(tmp_path, "alice"), timeout=10)
        with pytest.raises(TransportError, match="closed the connection"):
            await client.post(url, "alice-bob", "rotate", b"{}")
        assert seen == {"connections": 1, "requests": 1, "dropped": 1}  # no retry loop
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_connection_made_ahead_serves_the_next_request(tmp_path: Path) -> None:
    """`warm` opens a connection only when none is kept fresh, closes the expired ones, and
    the next request goes on the one it made: the TLS handshake is off that request's path.
    Cycles of (expiry, warm, request), as at the default interval, keep one connection.
    `needs_warm` says beforehand, without waiting, whether `warm` has anything to do."""
    async with trio.open_nursery() as nursery:
        url, seen = await _keepalive_server(tmp_path, nursery, None)
        client = PeerClient(_tls(tmp_path, "alice"), timeout=10)
        http = client._client
        assert client.needs_warm(url)
        assert await http.warm(url)
        assert seen == {"connections": 1, "requests": 0, "dropped": 0}
        assert not client.needs_warm(url)
        assert (await client.post(url, "alice-bob", "rotate", b"{}")).status == 200
        assert not client.needs_warm(url)
        assert not await http.warm(url)  # one is kept, fresh: nothing to do
        assert seen == {"connections": 1, "requests": 1, "dropped": 0}
        for cycle in range(2, 6):
            http.idle_expiry = 0.0  # every kept connection is now too old
            await trio.sleep(0.01)
            assert client.needs_warm(url)
            assert await http.warm(url)
            http.idle_expiry = 100.0
            assert [len(kept) for kept in http._idle.values()] == [1]  # expired: closed
            assert (await client.post(url, "alice-bob", "rotate", b"{}")).status == 200
            assert seen == {"connections": cycle, "requests": cycle, "dropped": 0}
        async with trio.open_nursery() as two:  # side by side: a second connection
            for _ in range(2):
                two.start_soon(partial(client.post, url, "alice-bob", "rotate", b"{}"))
        (kept,) = http._idle.values()
        assert len(kept) == 2
        kept[0].idle_since -= 1000  # the one below has expired, the one on top has not
        assert client.needs_warm(url)  # (to close it)
        assert (await client.post(url, "alice-bob", "rotate", b"{}")).status == 200
        assert len(kept) == 1  # closed, not left below the fresh one for good
        kept.clear()  # (as `_take` leaves the list once it took the last one)
        assert client.needs_warm(url)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_no_connection_is_made_ahead_while_a_request_is_under_way(tmp_path: Path) -> None:
    """A request under way gives its connection back when it ends (at many links some
    always are): `warm` then opens nothing, nor does a second `warm` beside a first."""
    async with trio.open_nursery() as nursery:
        url, seen = await _keepalive_server(tmp_path, nursery, None)
        client = PeerClient(_tls(tmp_path, "alice"), timeout=10)
        http = client._client
        warmed: list[bool] = []

        async def warm() -> None:
            warmed.append(await http.warm(url))

        async with trio.open_nursery() as inner:
            inner.start_soon(warm)
            inner.start_soon(warm)
        assert sorted(warmed) == [False, True] and seen["connections"] == 1
        await client.aclose()
        arrived, release = trio.Event(), trio.Event()

        async def answer_when_released(stream: trio.SSLStream, sent: dict) -> None:
            arrived.set()
            await release.wait()
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

        url, _ = await _serve(tmp_path, nursery, "bob", answer_when_released)
        client = PeerClient(_tls(tmp_path, "alice"), timeout=10)
        async with trio.open_nursery() as inner:
            inner.start_soon(partial(client.post, url, "alice-bob", "rotate", b"{}"))
            await arrived.wait()  # the request is under way
            assert not client.needs_warm(url)
            assert not await client._client.warm(url)
            release.set()
        assert [len(kept) for kept in client._client._idle.values()] == [1]
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_connection_that_cannot_be_made_ahead_is_an_error_of_the_caller(
    tmp_path: Path,
) -> None:
    with trio.socket.socket() as sock:  # a port nothing listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = PeerClient(_tls(tmp_path, "alice"), timeout=10)
    assert client.needs_warm(f"https://127.0.0.1:{port}")
    with pytest.raises(TransportError, match="cannot connect"):
        await client.warm(f"https://127.0.0.1:{port}")
    with pytest.raises(TransportError, match="not a https"):
        client.needs_warm("http://127.0.0.1:1")
    await client.aclose()


async def test_a_client_for_consuming_requests_never_sends_one_twice(tmp_path: Path) -> None:
    """With `resend_unanswered=False` (a KME's key requests), a request a kept connection took
    and never answered is an error, not sent again: it may have been executed."""
    from qkdagent import HttpClient
    from qkdagent.peering import client_ssl_context

    async with trio.open_nursery() as nursery:
        url, seen = await _keepalive_server(tmp_path, nursery, 1)
        context = client_ssl_context(_tls(tmp_path, "alice"))
        client = HttpClient(context, resend_unanswered=False)
        assert (await client.request("POST", url, "/keys", b"{}", limit=100)).status == 200
        with pytest.raises(TransportError, match="may have been executed"):
            await client.request("POST", url, "/keys", b"{}", limit=100)
        assert seen == {"connections": 1, "requests": 2, "dropped": 1}  # sent once only
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_bytes_after_a_reply_are_not_taken_as_the_next_reply(tmp_path: Path) -> None:
    """A server that sends two replies to one request: the second never answers the next
    request (the connection is not reused)."""

    async def answer(stream: trio.SSLStream, sent: dict) -> None:
        await stream.send_all(
            b'HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{"a":1}'
            b'HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{"b":2}'
        )
        sent["bytes"] += 1
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        url, sent = await _serve(tmp_path, nursery, "bob", answer)
        client = PeerClient(_tls(tmp_path, "alice"), timeout=5)
        first = await client.post(url, "alice-bob", "rotate", b"{}")
        second = await client.post(url, "alice-bob", "commit", b"{}")
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert first.body == b'{"a":1}' and second.body == b'{"a":1}'  # a new connection answered
    assert sent["bytes"] == 2


async def test_the_http_client_bounds_a_request_by_itself(tmp_path: Path) -> None:
    """A plugin that forgets its own deadline still gets one: the client's `timeout`."""
    from qkdagent import HttpClient
    from qkdagent.peering import client_ssl_context

    async def answer(stream: trio.SSLStream, sent: dict) -> None:
        await trio.sleep_forever()  # took the request, never answers

    async with trio.open_nursery() as nursery:
        url, _ = await _serve(tmp_path, nursery, "bob", answer)
        client = HttpClient(client_ssl_context(_tls(tmp_path, "alice")), timeout=0.5)
        with pytest.raises(trio.TooSlowError):
            await client.request("GET", url, "/", limit=100)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_reply_followed_by_another_in_the_tls_buffer_is_not_reused(
    tmp_path: Path,
) -> None:
    """A server sends an unasked second reply in its own TLS record, in the same TCP segment:
    the stream holds it (not the socket), so the connection is not kept, and the next request
    gets its own answer on a new connection, not the early bytes (second review, issue 18)."""
    import socket

    from qkdagent import HttpClient
    from qkdagent.peering import client_ssl_context

    connections = 0

    async def answer(stream: trio.SSLStream, sent: dict) -> None:
        nonlocal connections
        connections += 1
        if connections > 1:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlate")
            return
        tcp = stream.transport_stream.socket
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        await trio.sleep_forever()  # (held open: a close would keep it from reuse anyway)

    async with trio.open_nursery() as nursery:
        url, _ = await _serve(tmp_path, nursery, "bob", answer)
        client = HttpClient(client_ssl_context(_tls(tmp_path, "alice")), timeout=10)
        assert (await client.request("GET", url, "/one", limit=100)).body == b"first"
        assert (await client.request("GET", url, "/two", limit=100)).body == b"late"
        assert connections == 2
        await client.aclose()
        nursery.cancel_scope.cancel()


async def _held_server(
    tmp_path: Path, nursery: trio.Nursery, handshake: trio.Event | None = None
) -> tuple[str, dict, trio.Event]:
    """Keeps connections alive; answers each request only once `release` is set (and starts
    TLS only once `handshake` is, if given); counts the connections made and the most open at
    once; `seen["reached"][n]` is set once n requests wait for their answer, `seen["accepted"]`
    at the first connection."""
    context = server_ssl_context(_tls(tmp_path, "bob"))
    reached: collections.defaultdict[int, trio.Event] = collections.defaultdict(trio.Event)
    seen = {"connections": 0, "open": 0, "most_open": 0, "waiting": 0, "requests": 0}
    seen["reached"] = reached
    seen["accepted"] = trio.Event()
    release = trio.Event()

    async def handle(stream: trio.SSLStream) -> None:
        seen["connections"] += 1
        seen["open"] += 1
        seen["most_open"] = max(seen["most_open"], seen["open"])
        seen["accepted"].set()
        data = b""
        try:
            if handshake is not None:
                await handshake.wait()
            await stream.do_handshake()
            while True:
                request = await _next_head(stream, data)
                if request is None:
                    return
                _, data = request  # (GETs: no body)
                seen["requests"] += 1
                seen["waiting"] += 1
                reached[seen["waiting"]].set()
                await release.wait()
                seen["waiting"] -= 1
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            seen["open"] -= 1

    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, handle, 0, context, host="127.0.0.1")
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    return f"https://127.0.0.1:{port}", seen, release


async def test_requests_past_the_connection_bound_wait_for_a_kept_connection(
    tmp_path: Path,
) -> None:
    """`max_per_origin`: with two connections allowed, five requests at once open two; the
    other three wait (nothing sent, no connection opened) and then go, in turn, on the two
    kept ones: the server never sees a third connection (a KME counting its clients'), and a
    burst costs no handshakes beyond the bound (issue 18)."""
    from qkdagent import HttpClient
    from qkdagent.peering import client_ssl_context

    async with trio.open_nursery() as nursery:
        url, seen, release = await _held_server(tmp_path, nursery)
        client = HttpClient(
            client_ssl_context(_tls(tmp_path, "alice")), max_per_origin=2, max_idle_per_origin=2
        )
        statuses: list[int] = []

        async def get(path: str) -> None:
            statuses.append((await client.request("GET", url, path, limit=100)).status)

        async with trio.open_nursery() as requests:
            for i in range(5):
                requests.start_soon(get, f"/{i}")
            await seen["reached"][2].wait()
            await trio.testing.wait_all_tasks_blocked()
            assert seen["connections"] == 2 and seen["waiting"] == 2  # three wait in the client
            release.set()
        assert statuses == [200] * 5
        assert seen["connections"] == 2 and seen["most_open"] == 2 and seen["requests"] == 5
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_request_cancelled_while_waiting_for_a_connection_takes_none(
    tmp_path: Path,
) -> None:
    """A request cancelled while it waits for a connection leaves the bound as it was: the
    next one still waits for the one under way, then goes on its kept connection."""
    from qkdagent import HttpClient
    from qkdagent.peering import client_ssl_context

    async with trio.open_nursery() as nursery:
        url, seen, release = await _held_server(tmp_path, nursery)
        client = HttpClient(
            client_ssl_context(_tls(tmp_path, "alice")), max_per_origin=1, max_idle_per_origin=1
        )
        async with trio.open_nursery() as requests:
            requests.start_soon(partial(client.request, "GET", url, "/held", limit=100))
            await seen["reached"][1].wait()
            with trio.move_on_after(0.2) as waited:
                await client.request("GET", url, "/cancelled", limit=100)
            assert waited.cancelled_caught
            # the cancelled one freed no slot: a request now waits, as it did, for /held's
            requests.start_soon(partial(client.request, "GET", url, "/third", limit=100))
            await trio.testing.wait_all_tasks_blocked()
            assert seen["connections"] == 1 and seen["requests"] == 1
            release.set()
        reply = await client.request("GET", url, "/after", limit=100)
        assert reply.status == 200
        assert seen["connections"] == 1 and seen["requests"] == 3  # all but /cancelled
        assert client._slots == {}  # none held or waited for: the semaphore is dropped
        await client.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("bound", [0, -1, 1.5, True])
def test_the_connection_bound_is_an_integer_of_at_least_one(bound: object) -> None:
    from qkdagent import HttpClient

    with pytest.raises(ValueError, match="integer of at least 1"):
        HttpClient(None, plain_http=True, max_per_origin=bound)  # type: ignore[arg-type]


async def test_a_request_while_a_connection_is_made_ahead_waits_for_it(tmp_path: Path) -> None:
    """`warm` counts against the bound while it connects: with one connection allowed, a
    request that comes meanwhile waits for it and goes on it, and opens none of its own."""
    from qkdagent import HttpClient
    from qkdagent.peering import client_ssl_context

    handshake = trio.Event()
    async with trio.open_nursery() as nursery:
        url, seen, release = await _held_server(tmp_path, nursery, handshake)
        release.set()
        client = HttpClient(
            client_ssl_context(_tls(tmp_path, "alice")), max_per_origin=1, max_idle_per_origin=1
        )
        warmed: list[bool] = []

        async def warm() -> None:
            warmed.append(await client.warm(url))

        async with trio.open_nursery() as inner:
            inner.start_soon(warm)
            await seen["accepted"].wait()  # the warm-up's connection, held before TLS
            inner.start_soon(partial(client.request, "GET", url, "/meanwhile", limit=100))
            await trio.testing.wait_all_tasks_blocked()
            assert seen["connections"] == 1  # the request waits: it opened none
            handshake.set()
        assert warmed == [True]
        assert seen["connections"] == 1 and seen["requests"] == 1
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_failed_requests_give_their_connection_slot_back() -> None:
    """Requests that fail (here: nothing listens) free their slot: with one allowed, the
    next request fails at once as well instead of waiting for good."""
    from qkdagent import ConnectFailed, HttpClient

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    client = HttpClient(None, plain_http=True, max_per_origin=1, connect_timeout=5)
    for _ in range(3):
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await client.request("GET", f"http://127.0.0.1:{port}", "/", limit=10)
    with trio.fail_after(5):  # a leaked slot: this one would wait for ever
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await client.request("GET", f"http://127.0.0.1:{port}", "/", limit=10)
    assert client.connections_made == 0  # (attempts that made none are not counted)


async def test_a_request_that_waited_for_its_connection_still_has_its_whole_deadline(
    tmp_path: Path,
) -> None:
    """`exchange_timeout` counts from when the request may have its connection: one that
    waited longer than it behind another still gets its answer. `wait_timeout` bounds the
    wait itself: past it, `ConnectFailed` and nothing sent (a KME's key call can then be
    retried: it took no key)."""
    from qkdagent import ConnectFailed, HttpClient
    from qkdagent.peering import client_ssl_context

    async with trio.open_nursery() as nursery:
        url, seen, release = await _held_server(tmp_path, nursery)
        client = HttpClient(
            client_ssl_context(_tls(tmp_path, "alice")), max_per_origin=1, max_idle_per_origin=1
        )
        statuses: list[int] = []

        async def waiter() -> None:
            reply = await client.request("GET", url, "/waited", limit=100, exchange_timeout=1.0)
            statuses.append(reply.status)

        async with trio.open_nursery() as requests:
            requests.start_soon(partial(client.request, "GET", url, "/held", limit=100))
            await seen["reached"][1].wait()
            requests.start_soon(waiter)
            for patience in (0.1, 0.0):  # (zero: at once, with no slot free)
                with pytest.raises(ConnectFailed, match="all 1 allowed at once were busy"):
                    await client.request("GET", url, "/impatient", limit=100, wait_timeout=patience)
            await trio.sleep(1.5)  # /waited has waited past its exchange_timeout
            assert seen["requests"] == 1  # neither of the others was sent
            release.set()
        assert statuses == [200]
        assert seen["requests"] == 2 and seen["connections"] == 1
        await client.aclose()
        nursery.cancel_scope.cancel()
