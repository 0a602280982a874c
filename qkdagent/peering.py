"""Transport between agents: HTTPS with mutual TLS; the server is `peerserver.py`, the client
an httpx client with kept-alive connections.

This module moves bytes and maps errors to HTTP statuses; what a message means is decided in
`link.py` and `protocol.py`.
"""

from __future__ import annotations

import logging
import ssl
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import trio

from .config import TlsFiles
from .identity import PeerIdentity
from .protocol import MAX_BODY

log = logging.getLogger(__name__)

Handler = Callable[[str, str, bytes, PeerIdentity], Awaitable[bytes]]
"""(link name, action, body, the client certificate's names) -> reply body; raises
ProtocolError for a refused request."""


def client_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


@dataclass(frozen=True)
class PeerReply:
    status: int
    body: bytes
    identity: PeerIdentity
    """The names in the certificate the answering server presented."""


class ReplyTooLarge(httpx.HTTPError):
    """The peer's reply is over `MAX_BODY`: the rest is not read (counts as a failed attempt)."""


class PeerClient:
    """Kept-alive connections to peers; requests carry already MAC'd bodies.

    The connections are spread over several small httpx pools, chosen by link: httpcore checks
    every idle connection of a pool for expiry on each request (a poll() per connection), so
    one big pool would cost more per request than the request itself.

    A reply is read while streaming, at most `MAX_BODY` bytes and undecoded (no content
    encoding is asked for or accepted, so nothing can expand), and each request has a total
    deadline, not only httpx's per-read timeout: a trickling peer cannot hold a rotation.
    """

    POOL_SIZE = 4

    def __init__(self, tls: TlsFiles, *, timeout: float = 10.0, connections: int = 16) -> None:
        context = client_ssl_context(tls)
        pools = max(1, -(-connections // self.POOL_SIZE))
        self.timeout = timeout
        self._clients = [
            httpx.AsyncClient(
                verify=context,
                timeout=httpx.Timeout(timeout),
                # keep every connection alive: a TLS handshake costs more than a rotation
                limits=httpx.Limits(
                    max_connections=self.POOL_SIZE,
                    max_keepalive_connections=self.POOL_SIZE,
                    keepalive_expiry=100,
                ),
                headers={
                    "content-type": "application/json",
                    "user-agent": "qkdagent",
                    "accept-encoding": "identity",
                },
                trust_env=False,
            )
            for _ in range(pools)
        ]

    async def post(self, peer_url: str, link: str, action: str, body: bytes) -> PeerReply:
        client = self._clients[zlib.crc32(link.encode()) % len(self._clients)]
        url = f"{peer_url}/v1/links/{link}/{action}"
        with trio.fail_after(self.timeout):
            async with client.stream("POST", url, content=body) as response:
                identity = _server_identity(response)
                data = await read_bounded(response, MAX_BODY)
        return PeerReply(response.status_code, data, identity)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


async def read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The raw body of a streamed response, refusing (without reading on) more than `limit`."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ReplyTooLarge("reply has a content encoding, which was not asked for")
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ReplyTooLarge(f"reply declares {int(declared)} bytes, over {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise ReplyTooLarge(f"reply larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _server_identity(response: httpx.Response) -> PeerIdentity:
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    if ssl_object is None:
        return PeerIdentity()
    return PeerIdentity.from_peercert(ssl_object.getpeercert())
