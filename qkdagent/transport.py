"""How an agent reaches its peers and is reached: the seam between the agent and the network.

`HttpsTransport` is the real one: the peer API on mutual TLS (`peerserver.py`), the status
endpoint on plain HTTP for loopback (hypercorn), and the kept-alive peer client
(`peering.py`). The test kit's in-process transport (`qkdagent.testing.LocalNetwork`) has the
same shape, so `Agent.run` never asks which one it has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from .config import AgentSettings
from .identity import PeerIdentity
from .observability import Metrics
from .peering import Handler, PeerClient, PeerReply
from .peerserver import ServerLimits, serve_peers

log = logging.getLogger(__name__)


class PeerPoster(Protocol):
    """Sends one MAC'd request to a peer and returns its reply (bounded, with the server's
    certificate names); `h1client.TransportError` or `trio.TooSlowError` when it cannot."""

    async def post(self, peer_url: str, link: str, action: str, body: bytes) -> PeerReply: ...

    def needs_warm(self, peer_url: str) -> bool:
        """Whether `warm` has anything to do now (a connection to make or to close): False
        lets the caller skip it, and the timeouts it would set up around it."""
        ...

    async def warm(self, peer_url: str) -> None:
        """Make ready now what the next request to the peer needs (a connection), so that it
        is not made on that request's path; the same errors as `post`."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The client's background work (batches to peers), until cancelled; the agent runs
        it while it runs."""

    async def aclose(self) -> None: ...


class Transport(Protocol):
    threaded_state: bool
    """Whether state writes run on a worker thread (real I/O) or inline (virtual-clock tests,
    where a thread would let trio's autojump clock leap ahead while SQLite writes)."""

    async def serve_peers(
        self,
        handler: Handler,
        metrics: Metrics,
        is_peer: Callable[[PeerIdentity], bool],
        serves: Callable[[PeerIdentity, str], bool],
        *,
        task_status: trio.TaskStatus[list[str]],
    ) -> None:
        """Serve the peer API until cancelled; `task_status.started(urls)` once listening.
        `is_peer`: whether a client certificate names a peer of one of the agent's links;
        `serves`: whether it names the peer of a given link."""

    async def serve_status(self, app: Any, *, task_status: trio.TaskStatus[list[str]]) -> None:
        """Serve the status app (ASGI) until cancelled; started with its URLs (maybe none)."""

    def client(self) -> PeerPoster:
        """A client for requests to peers, closed by the agent when it stops."""


class HttpsTransport:
    """HTTPS with mutual TLS to peers; plain HTTP status on `status_listen`."""

    threaded_state = True

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings

    async def serve_peers(
        self,
        handler: Handler,
        metrics: Metrics,
        is_peer: Callable[[PeerIdentity], bool],
        serves: Callable[[PeerIdentity, str], bool],
        *,
        task_status: trio.TaskStatus[list[str]],
    ) -> None:
        s = self.settings
        if s.tls is None:  # no link uses the native protocol (config.py checks it)
            log.info("no peer API: no link uses qkdagent's own protocol")
            task_status.started([])
            return
        limits = ServerLimits(
            max_connections=s.max_connections,
            max_per_address=s.max_connections_per_address,
            handshake_timeout=s.handshake_timeout,
            request_timeout=s.request_timeout,
        )
        await serve_peers(
            handler,
            listen=s.listen,
            tls=s.tls,
            limits=limits,
            metrics=metrics,
            is_peer=is_peer,
            serves=serves,
            task_status=task_status,
        )

    async def serve_status(self, app: Any, *, task_status: trio.TaskStatus[list[str]]) -> None:
        if self.settings.status_listen is None:
            task_status.started([])
            return
        config = HypercornConfig()
        config.bind = [str(self.settings.status_listen)]
        config.errorlog = logging.getLogger("qkdagent.http")
        config.graceful_timeout = 0.5
        await serve(app, config, shutdown_trigger=trio.sleep_forever, task_status=task_status)

    def client(self) -> PeerPoster:
        if self.settings.tls is None:
            return _NoPeers()
        return PeerClient(self.settings.tls, connections=self.settings.max_parallel_rotations)


class _NoPeers:
    """The peer client of an agent without native links (and so without TLS settings)."""

    async def post(self, peer_url: str, link: str, action: str, body: bytes) -> PeerReply:
        raise RuntimeError("this agent has no native links, so no peer client")

    def needs_warm(self, peer_url: str) -> bool:
        return True  # (and `warm` says why not)

    async def warm(self, peer_url: str) -> None:
        raise RuntimeError("this agent has no native links, so no peer client")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def aclose(self) -> None:
        pass
