"""A man in the middle for agent tests: replay, forge, delay, drop and corrupt peer messages.

It stands in the in-process network (`open_agent_pair(..., local=True)`, virtual clock) on the
path to one agent and sees every request to it and every reply from it. A test gives it a
`tamper` coroutine that decides, per exchange, what the sender gets back:

    async with open_agent_pair(tmp_path, local=True, ...) as pair:
        mitm = ManInTheMiddle.on(pair, "bob")

        async def tamper(exchange: Exchange) -> PeerReply:
            if exchange.action == "rotate":
                return exchange.forged(409, b'{"error":"epoch","epoch":4611686018427387901}')
            return await exchange.forward()

        mitm.tamper = tamper

Every exchange is recorded (`mitm.log`), so a later test step can replay one. The attacker
holds a CA certificate (it passes TLS) but none of the link's keys: what it sends on its own
is never MAC'd under them. `as_identity` lets it impersonate a certificate of another name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..identity import PeerIdentity
from ..peering import PeerReply
from .local import LocalClient, LocalNetwork


@dataclass
class Exchange:
    """One request on its way to the victim, and the means to answer it."""

    mitm: ManInTheMiddle
    client: LocalClient
    url: str
    link: str
    action: str
    body: bytes
    reply: PeerReply | None = None
    """The genuine reply, once forwarded."""

    async def forward(self, body: bytes | None = None) -> PeerReply:
        """Pass the request on (or `body` instead) and return the genuine reply, as the
        attacker's server relays it (with the certificate the attacker presents)."""
        genuine = await self.client.deliver(
            self.url, self.link, self.action, self.body if body is None else body
        )
        self.reply = PeerReply(genuine.status, genuine.body, self.mitm.server_identity)
        return self.reply

    def forged(self, status: int, body: bytes) -> PeerReply:
        """A reply of the attacker's making, from a server presenting the victim's name."""
        return PeerReply(status, body, self.mitm.server_identity)

    async def delayed(self, seconds: float) -> PeerReply:
        """Hold the request for `seconds` (virtual time), then forward it."""
        await trio.sleep(seconds)
        return await self.forward()


Tamper = Callable[[Exchange], Awaitable[PeerReply]]


async def _passthrough(exchange: Exchange) -> PeerReply:
    return await exchange.forward()


@dataclass
class ManInTheMiddle:
    network: LocalNetwork
    url: str
    server_identity: PeerIdentity
    """The certificate names the attacker's server presents (the victim's, by default)."""
    tamper: Tamper = _passthrough
    log: list[Exchange] = field(default_factory=list)

    @classmethod
    def on(cls, pair: Any, victim: str) -> ManInTheMiddle:
        """Stand in the path to `victim` ("alice" or "bob") of an in-process agent pair."""
        network = pair.network
        if network is None:
            raise ValueError("ManInTheMiddle needs open_agent_pair(..., local=True)")
        url = f"https://{pair.configs[victim]['agent']['listen']}"
        mitm = cls(network, url, PeerIdentity(dns=(victim,)))
        network.interceptors[url] = mitm._intercept
        return mitm

    def as_identity(self, name: str) -> None:
        """Present a certificate naming `name` instead of the victim's."""
        self.server_identity = PeerIdentity(dns=(name,))

    def leave(self) -> None:
        """Step out of the path."""
        self.network.interceptors.pop(self.url, None)

    def requests(self, action: str) -> list[Exchange]:
        return [e for e in self.log if e.action == action]

    async def _intercept(
        self, client: LocalClient, url: str, link: str, action: str, body: bytes
    ) -> PeerReply:
        exchange = Exchange(self, client, url, link, action, body)
        self.log.append(exchange)
        return await self.tamper(exchange)


async def send_as(
    network: LocalNetwork, sender: str, url: str, link: str, action: str, body: bytes
) -> PeerReply:
    """Send a request of the attacker's own, over a connection whose certificate names
    `sender` (any agent of the deployment CA)."""
    return await network.client(PeerIdentity(dns=(sender,))).deliver(url, link, action, body)
