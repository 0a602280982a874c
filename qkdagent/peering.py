"""Transport between agents: HTTPS with mutual TLS; the server is `peerserver.py`, the client
`h1client.py` with kept-alive connections.

This module moves bytes and maps errors to HTTP statuses; what a message means is decided in
`link.py` and `protocol.py`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .config import TlsFiles
from .h1client import H1Client, OnData, Reply, ReplyTooLarge, TransportError
from .identity import PeerIdentity
from .peerbatch import Coalescer
from .tlsclient import load_tls_identity

log = logging.getLogger(__name__)

ReplyNow = Callable[[bytes], Awaitable[bool]]
"""Sends a handler's 200 reply before the handler returns, so the peer need not wait for work
that follows (the responder's install after its durable commit); it returns True once the
reply was sent (or failed, which closes the connection, as a lost reply would). It never
raises. A server may decline (too many handlers of that client going on), and returns False:
the reply then goes when the handler returns. Either way the handler returns the same body,
which is not sent twice."""

Handler = Callable[[str, str, bytes, PeerIdentity, ReplyNow | None], Awaitable[bytes]]
"""(link name, action, body, the client certificate's names, how to reply early) -> reply
body; raises ProtocolError for a refused request (only before replying early). Only the
actions that may reply early (`peerserver.EARLY_REPLY`) are given a `ReplyNow`."""


def client_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_tls_identity(ctx, tls.cert, tls.key, what="agent.tls")
    return ctx


@dataclass(frozen=True)
class PeerReply:
    status: int
    body: bytes
    identity: PeerIdentity
    """The names in the certificate the answering server presented."""


class PeerClient:
    """Kept-alive connections to peers (`h1client.H1Client`); requests carry already MAC'd
    bodies, and those waiting for the same peer go as one batch (`peerbatch`). A reply is read
    at most `MAX_BODY` bytes (a batch's, `batchwire.reply_limit`: each answer at most that),
    undecoded, and each request has a total deadline, not only a per-read timeout: a trickling
    peer cannot hold a rotation."""

    def __init__(self, tls: TlsFiles, *, timeout: float = 10.0, connections: int = 16) -> None:
        self.timeout = timeout
        self._client = H1Client(
            client_ssl_context(tls),
            headers=(("content-type", "application/json"), ("user-agent", "qkdagent")),
            # keep every connection alive: a TLS handshake costs more than a rotation
            idle_expiry=100,
            max_idle_per_origin=max(4, connections),
            timeout=None,  # every request is bounded here (`post`) or by its batch's deadline
        )

        self.batches = Coalescer(self._post, timeout=timeout)
        """Requests that wait for the same peer go together (`peerbatch`)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send batches from tasks of the client's own until cancelled (`peerbatch`)."""
        await self.batches.run(task_status=task_status)

    async def _post(
        self, peer_url: str, path: str, body: bytes, limit: int, on_data: OnData | None
    ) -> Reply:
        return await self._client.post(peer_url, path, body, limit=limit, on_data=on_data)

    async def post(self, peer_url: str, link: str, action: str, body: bytes) -> PeerReply:
        with trio.fail_after(self.timeout):
            reply = await self.batches.post(peer_url, link, action, body)
        return PeerReply(reply.status, reply.body, reply.identity)

    def needs_warm(self, peer_url: str) -> bool:
        return self._client.needs_warm(peer_url)

    async def warm(self, peer_url: str) -> None:
        """Open a connection to the peer now if none is kept for the next request (see
        `H1Client.warm`); `TransportError` if it cannot be made."""
        with trio.fail_after(self.timeout):
            await self._client.warm(peer_url)

    async def aclose(self) -> None:
        await self._client.aclose()


__all__ = ["Handler", "PeerClient", "PeerReply", "ReplyNow", "ReplyTooLarge", "TransportError"]
