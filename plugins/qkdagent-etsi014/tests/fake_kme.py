"""A hostile KME over real mutual TLS: answers every request with a trickled or oversized body,
and records how far it got before the client hung up."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio
from qkdagent_etsi014.server import server_ssl_context

MiB = 1024 * 1024


class FakeKme:
    """Counts what it sent; `ended` is set when the connection handler is done."""

    def __init__(self, answer: Callable[[FakeKme, trio.SSLStream], Awaitable[None]]) -> None:
        self.answer = answer
        self.url = ""
        self.requests: list[bytes] = []
        """Request heads received (lower-cased)."""
        self.sent = 0
        """Body bytes handed to the socket."""
        self.completed = False
        """The whole answer was sent."""
        self.aborted = False
        """The client hung up before the answer was complete."""
        self.ended = trio.Event()

    async def send(self, stream: trio.SSLStream, data: bytes) -> None:
        await stream.send_all(data)
        self.sent += len(data)

    async def handle(self, stream: trio.SSLStream) -> None:
        """One request per connection: Get status is answered at once (and not counted), any
        other request gets `answer`."""
        request = b""
        try:
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    await trio.aclose_forcefully(stream)
                    return
                request += chunk
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(stream)
            return
        if request.split(b" ", 2)[1].split(b"?")[0].endswith(b"/status"):
            with trio.move_on_after(10):
                await stream.send_all(head(len(STATUS), "Connection: close") + STATUS)
            await trio.aclose_forcefully(stream)
            return
        try:
            self.requests.append(request.lower())
            await self.answer(self, stream)
            self.completed = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.aborted = True
        finally:
            await trio.aclose_forcefully(stream)
            self.ended.set()


STATUS = json.dumps(
    {
        "source_KME_ID": "KME_A",
        "target_KME_ID": "KME_B",
        "master_SAE_ID": "alice",
        "slave_SAE_ID": "bob",
        "key_size": 256,
        "stored_key_count": 100,
        "max_key_count": 1000,
        "max_key_per_request": 10,
        "max_key_size": 1024,
        "min_key_size": 64,
        "max_SAE_ID_count": 0,
    }
).encode()
"""A Get status answer that prepare() accepts."""


def head(length: int | None = None, *extra: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", "Content-Type: application/json", *extra]
    lines.append(
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def trickle(total: int, every: float) -> Callable[[FakeKme, trio.SSLStream], Awaitable[None]]:
    """Headers at once, then the body one byte every `every` seconds."""

    async def answer(kme: FakeKme, stream: trio.SSLStream) -> None:
        await stream.send_all(head(total))
        for _ in range(total):
            await trio.sleep(every)
            await kme.send(stream, b" ")

    return answer


def flood(total: int, *, chunked: bool) -> Callable[[FakeKme, trio.SSLStream], Awaitable[None]]:
    """A `total`-byte body as fast as the client reads it (declared length, or chunked)."""

    async def answer(kme: FakeKme, stream: trio.SSLStream) -> None:
        await stream.send_all(head(None if chunked else total))
        block = b" " * 65536
        while kme.sent < total:
            framed = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
            await stream.send_all(framed)
            kme.sent += len(block)
        if chunked:
            await stream.send_all(b"0\r\n\r\n")

    return answer


def gzip_bomb(expanded: int) -> Callable[[FakeKme, trio.SSLStream], Awaitable[None]]:
    """A small gzip body that expands to `expanded` bytes, sent although identity was asked."""
    body = gzip.compress(b" " * expanded, compresslevel=9)

    async def answer(kme: FakeKme, stream: trio.SSLStream) -> None:
        await stream.send_all(head(len(body), "Content-Encoding: gzip"))
        await kme.send(stream, body)

    return answer


@asynccontextmanager
async def fake_kme(
    pki: Path, answer: Callable[[FakeKme, trio.SSLStream], Awaitable[None]], kme: str = "KME_A"
) -> AsyncIterator[FakeKme]:
    """Serve on a free loopback port with `kme`'s certificate (client certificate required)."""
    fake = FakeKme(answer)
    context = server_ssl_context(pki / f"{kme}.pem", pki / f"{kme}.key", pki / "ca.pem")
    context.set_alpn_protocols(["http/1.1"])

    async def serve(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(tls)
            return
        await fake.handle(tls)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        fake.url = f"https://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()
