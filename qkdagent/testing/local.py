"""An in-process "network" for agents under trio's virtual clock.

Real sockets and worker threads make trio's autojump clock leap ahead while the OS works, so
virtual-time tests connect agents through this object instead: a request is a call of the peer
agent's handler, with the same status mapping the HTTP server applies. As in the server, a
handler that replies early (`peering.ReplyNow`) goes on in the peer's own task (its transport's
nursery) while the requester has its reply.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from ..errors import ProtocolError
from ..identity import PeerIdentity
from ..peering import Handler, PeerReply, TransportError
from ..peerserver import EARLY_REPLY
from ..protocol import MAX_BODY, error_body

Interceptor = Callable[["LocalClient", str, str, str, bytes], Awaitable[PeerReply]]


class LocalNetwork:
    def __init__(self) -> None:
        self.handlers: dict[str, tuple[Handler, PeerIdentity, trio.Nursery]] = {}
        """URL -> its handler, the identity its certificate names, and where each request's
        handler runs (the serving task's nursery: it goes on there after replying early)."""
        self.down: set[str] = set()
        """URLs currently unreachable (a stopped or partitioned agent)."""
        self.interceptors: dict[str, Interceptor] = {}
        """URL -> what stands in the path to it (see `qkdagent.testing.ManInTheMiddle`)."""
        self.warmed: collections.deque[str] = collections.deque(maxlen=1000)
        """URLs clients were asked to have a connection ready for (`LocalClient.warm`), in
        order (the last 1,000)."""

    def attach(
        self,
        url: str,
        handler: Handler,
        identity: PeerIdentity,
        nursery: trio.Nursery,
    ) -> None:
        """Serve `url` with `handler`, as a server whose certificate names `identity`, running
        each request's handler in `nursery` (where it goes on after replying early)."""
        self.handlers[url] = (handler, identity, nursery)
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

    def needs_warm(self, peer_url: str) -> bool:
        return True  # (each `warm` is recorded in `LocalNetwork.warmed`)

    async def warm(self, peer_url: str) -> None:
        """Nothing to open in process; a peer that is down refuses, as a connection would."""
        await trio.lowlevel.checkpoint()
        self.network.warmed.append(peer_url)
        if peer_url not in self.network.handlers or peer_url in self.network.down:
            raise ConnectionRefused(f"{peer_url} is not reachable")

    async def deliver(self, peer_url: str, link: str, action: str, body: bytes) -> PeerReply:
        """The request as it reaches the peer, past any interceptor."""
        served = self.network.handlers.get(peer_url)
        if served is None or peer_url in self.network.down:
            raise ConnectionRefused(f"{peer_url} is not reachable")
        handler, server, nursery = served
        if len(body) > MAX_BODY:
            return PeerReply(413, error_body("refused", "too large"), server)
        serve = partial(self._serve, handler, server, link, action, body)
        reply: PeerReply = await nursery.start(serve)
        return reply

    async def _serve(
        self,
        handler: Handler,
        server: PeerIdentity,
        link: str,
        action: str,
        body: bytes,
        task_status: trio.TaskStatus[PeerReply],
    ) -> None:
        """One request as the server's connection task runs it: the reply goes back when the
        handler gives it, early or at its return. A handler's bug raises (in the caller, or
        in the serving task once it replied): tests see it."""
        replied = False

        async def reply_now(reply: bytes) -> bool:
            nonlocal replied
            if replied:
                await trio.lowlevel.checkpoint()
                return False
            replied = True
            task_status.started(PeerReply(200, reply, server))
            await trio.lowlevel.checkpoint()
            return True

        try:
            early = reply_now if action in EARLY_REPLY else None  # as the peer server does
            answer = await handler(link, action, body, self.identity, early)
            reply = PeerReply(200, answer, server)
        except ProtocolError as exc:
            if replied:
                raise
            reply = PeerReply(exc.status, exc.body or error_body("refused", str(exc)), server)
        if not replied:
            task_status.started(reply)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # requests are direct calls: nothing to batch

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
        serves: object,
        *,
        task_status: trio.TaskStatus[list[str]],
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.network.attach(self.url, handler, self.identity, nursery)
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
