"""Transport between agents: HTTPS with mutual TLS, an ASGI app served by hypercorn inside the
agent's nursery and an httpx client with kept-alive connections.

This module moves bytes and maps errors to HTTP statuses; what a message means is decided in
`link.py` and `protocol.py`.
"""

from __future__ import annotations

import json
import logging
import ssl
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from .asgi import lifespan, respond
from .config import TlsFiles
from .errors import ProtocolError
from .identity import PeerIdentity
from .protocol import MAX_BODY, error_body

log = logging.getLogger(__name__)

Handler = Callable[[str, str, bytes, PeerIdentity], Awaitable[bytes]]
"""(link name, action, body, the client certificate's names) -> reply body; raises
ProtocolError for a refused request."""

ACTIONS = ("rotate", "commit", "resync")
DISCARD_LIMIT = 1024 * 1024
"""Oversized bodies up to this size are read and dropped before the 413 reply."""


def client_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


@dataclass(frozen=True)
class PeerReply:
    status: int
    body: bytes

    def error_hint(self) -> dict[str, Any]:
        """The unauthenticated error object of a refused request (only ever used as a hint)."""
        try:
            data = json.loads(self.body)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}


class PeerClient:
    """Kept-alive connections to peers; requests carry already MAC'd bodies.

    The connections are spread over several small httpx pools, chosen by link: httpcore checks
    every idle connection of a pool for expiry on each request (a poll() per connection), so
    one big pool would cost more per request than the request itself.
    """

    POOL_SIZE = 4

    def __init__(self, tls: TlsFiles, *, timeout: float = 10.0, connections: int = 16) -> None:
        context = client_ssl_context(tls)
        pools = max(1, -(-connections // self.POOL_SIZE))
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
                headers={"content-type": "application/json", "user-agent": "qkdagent"},
                trust_env=False,
            )
            for _ in range(pools)
        ]

    async def post(self, peer_url: str, link: str, action: str, body: bytes) -> PeerReply:
        client = self._clients[zlib.crc32(link.encode()) % len(self._clients)]
        response = await client.post(f"{peer_url}/v1/links/{link}/{action}", content=body)
        return PeerReply(response.status_code, response.content[: MAX_BODY + 1])

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


class PeerApp:
    """ASGI app for the peer API: `POST /v1/links/<link>/<rotate|commit|resync>`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        status, body = await self._respond(scope, receive)
        await respond(send, status, "application/json", body)

    async def _respond(self, scope: dict[str, Any], receive: Any) -> tuple[int, bytes]:
        parts = scope["path"].split("/")
        if len(parts) != 5 or parts[:3] != ["", "v1", "links"] or parts[4] not in ACTIONS:
            return 404, error_body("not-found", "unknown path")
        if scope["method"] != "POST":
            return 405, error_body("method", "use POST")
        try:
            body = await read_body(scope, receive)
            return 200, await self.handler(parts[3], parts[4], body, PeerIdentity())
        except ProtocolError as exc:
            log.info("refused %s for link %r: %s", parts[4], parts[3][:64], exc)
            return exc.status, exc.body or error_body("refused", str(exc))


async def read_body(scope: dict[str, Any], receive: Any, limit: int = MAX_BODY) -> bytes:
    """Read a request body, refusing (413) anything over `limit` before buffering it."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise ProtocolError("bad content-length") from None
            if declared > limit:
                if declared <= DISCARD_LIMIT:
                    await _discard(receive)  # so the client reads our 413, not a reset
                raise ProtocolError(f"body larger than {limit} bytes", status=413)
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise ProtocolError("client went away")
        chunk = event.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"body larger than {limit} bytes", status=413)
        chunks.append(chunk)
        if not event.get("more_body", False):
            return b"".join(chunks)


async def _discard(receive: Any) -> None:
    while True:
        event = await receive()
        if event["type"] == "http.disconnect" or not event.get("more_body", False):
            return
