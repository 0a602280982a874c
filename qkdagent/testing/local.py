"""An in-process "network" for agents under trio's virtual clock.

Real sockets and worker threads make trio's autojump clock leap ahead while the OS works, so
virtual-time tests connect agents through this object instead: a request is a direct call of the
peer agent's handler, with the same status mapping the HTTP server applies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from ..errors import ProtocolError
from ..identity import PeerIdentity
from ..peering import Handler, PeerReply, TransportError
from ..protocol import MAX_BODY, error_body

Interceptor = Callable[["LocalClient", str, str, str, bytes], Awaitable[PeerReply]]


class LocalNetwork:
    def __init__(self) -> None:
        self.handlers: dict[str, tuple[Handler, PeerIdentity]] = {}
        self.down: set[str] = set()
        """URLs currently unreachable (a stopped or partitioned agent)."""
        self.interceptors: dict[str, Interceptor] = {}
        """URL -> what stands in the path to it (see `qkdagent.testing.ManInTheMiddle`)."""

    def attach(self, url: str, handler: Handler, identity: PeerIdentity) -> None:
        """Serve `url` with `handler`, as a server whose certificate names `identity`."""
        self.handlers[url] = (handler, identity)
        self.down.discard(url)

    def detach(self, url: str) -> None:
        self.handlers.pop(url, None)

    def transport(self, name: str, url: str) -> LocalTransport:
        """The in-process transport of agent `name`, reachable at `url`."""
        return LocalTransport(self, name, url)

    def client(self, identity: PeerIdentity) -> LocalClient:
        """A client whose requests reach handlers as coming from a certificate naming
        `identity` (what mutual TLS would have shown the server)."""
        return LocalClient(self, identity)


class LocalClient:
    def __init__(self, network: LocalNetwork, identity: PeerIdentity) -> None:
        self.network = network
        self.identity = identity

    async def post(self, peer_url: str, link: str, action: str, body: bytes) -> PeerReply:
        await trio.lowlevel.checkpoint()
        interceptor = self.network.interceptors.get(peer_url)
        if interceptor is not None:
            return await interceptor(self, peer_url, link, action, body)
        return await self.deliver(peer_url, link, action, body)

    async def deliver(self, peer_url: str, link: str, action: str, body: bytes) -> PeerReply:
        """The request as it reaches the peer, past any interceptor."""
        served = self.network.handlers.get(peer_url)
        if served is None or peer_url in self.network.down:
            raise ConnectionRefused(f"{peer_url} is not reachable")
        handler, server = served
        if len(body) > MAX_BODY:
            return PeerReply(413, error_body("refused", "too large"), server)
        try:
            return PeerReply(200, await handler(link, action, body, self.identity), server)
        except ProtocolError as exc:
            return PeerReply(exc.status, exc.body or error_body("refused", str(exc)), server)

    async def aclose(self) -> None:
        pass


class LocalTransport:
    """`qkdagent.transport.Transport` in process: requests are direct calls of the peer's
    handler, state writes run inline (no thread for the autojump clock to leap over), and
    there is no status endpoint (tests call `agent.describe()`)."""

    threaded_state = False

    def __init__(self, network: LocalNetwork, name: str, url: str) -> None:
        self.network = network
        self.identity = PeerIdentity(dns=(name,))
        self.url = url

    async def serve_peers(
        self,
        handler: Handler,
        metrics: object,
        is_peer: object,
        *,
        task_status: trio.TaskStatus[list[str]],
    ) -> None:
        self.network.attach(self.url, handler, self.identity)
        try:
            task_status.started([self.url])
            await trio.sleep_forever()
        finally:
            self.network.detach(self.url)

    async def serve_status(self, app: object, *, task_status: trio.TaskStatus[list[str]]) -> None:
        task_status.started([])

    def client(self) -> LocalClient:
        return self.network.client(self.identity)


class ConnectionRefused(TransportError):
    """Raised as the real client's connection errors are when the peer is not attached."""
