"""Sink type `wireguard`: one peer's pre-shared key on one WireGuard interface."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from qkdagent import (
    KeyMeta,
    Link,
    Misconfigured,
    NotInstalled,
    Options,
    PluginContext,
    Secret,
    Sink,
    SinkError,
)

from .auto import detect
from .backend import Backend, BackendError, Op, Outcome
from .batch import OPEN_BACKENDS, Backends, Shared
from .broker import BrokerBackend
from .keys import check_ifname, check_psk, parse_public_key, public_key_text
from .netlink import LIBRARIES as NETLINK_LIBRARIES
from .netlink import NetlinkBackend
from .uapi import UapiBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "netlink", "uapi", "broker")
DEFAULT_BROKER = "/run/qkdagent-wireguard/broker.sock"


def _check_public_key(text: str) -> str | None:
    try:
        parse_public_key(text)
    except ValueError as exc:
        return str(exc)
    return None


class WireGuardSink(Sink):
    """Writes the derived secret as the PSK of `peer_public_key` on `interface`.

    Only the PSK is touched (`update_only`, no allowed IPs, endpoint or other peers), every write
    is read back, and erase writes a fresh random PSK so the peer's handshakes fail closed.
    """

    type_name = "wireguard"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.interface: str = options.string("interface", check=check_ifname, max_len=15)
        self.peer_text: str = options.string("peer_public_key", check=_check_public_key)
        self.peer = parse_public_key(self.peer_text)
        self.backend_kind: str = options.string("backend", "auto", choices=BACKENDS)
        self.uapi_dir: Path = options.path("uapi_dir", "/run/wireguard")
        self.broker_socket: Path = options.path("broker_socket", DEFAULT_BROKER)
        self.netlink_library: str = options.string(
            "netlink_library", "builtin", choices=NETLINK_LIBRARIES
        )
        self.resolved: str | None = None
        self._spec: tuple[str, ...] | None = None
        self._shared: Shared | None = None
        self._backends: Backends = context.stash.setdefault(OPEN_BACKENDS, Backends)

    def __repr__(self) -> str:
        return (
            f"<WireGuardSink {self.name!r} interface={self.interface!r} "
            f"peer={self.peer_text!r} backend={self.resolved or self.backend_kind!r}>"
        )

    async def prepare(self) -> None:
        if self._shared is not None:  # prepared before: drop that backend reference first
            await self.aclose()
        kind = self.backend_kind
        if kind == "auto":
            try:
                kind = await trio.to_thread.run_sync(detect, self.interface, self.uapi_dir)
            except BackendError as exc:
                raise Misconfigured(f"wireguard sink {self.name!r}: {exc}") from None
        elif kind == "uapi" and not UapiBackend(self.uapi_dir).exists(self.interface):
            raise Misconfigured(
                f"wireguard sink {self.name!r}: no control socket "
                f"{self.uapi_dir / (self.interface + '.sock')} (is wireguard-go running?)"
            )
        elif kind == "broker" and not self.broker_socket.is_socket():
            raise NotInstalled(
                f"wireguard sink {self.name!r}: no broker socket at {self.broker_socket} "
                "(is qkdagent-wireguard broker running?)"
            )
        self._attach(kind)
        try:
            outcome = await self._submit(Op(self.peer, os.urandom(32), write=False))
        except SinkError as exc:
            await self.aclose()
            raise Misconfigured(str(exc)) from None
        if outcome is Outcome.NO_PEER:
            await self.aclose()
            raise Misconfigured(self._no_peer())
        log.info("wireguard sink %s ready: %s via %s", self.name, self.interface, kind)

    def _attach(self, kind: str) -> None:
        factory: Callable[[], Backend]
        if kind == "uapi":
            spec: tuple[str, ...] = ("uapi", os.fspath(self.uapi_dir))
            factory = partial(UapiBackend, self.uapi_dir)
        elif kind == "netlink":
            spec = ("netlink", self.netlink_library)
            factory = partial(NetlinkBackend, self.netlink_library)
        else:
            spec = ("broker", os.fspath(self.broker_socket))
            factory = partial(BrokerBackend, self.broker_socket)
        self._spec, self._shared = spec, self._backends.acquire(spec, factory)
        self.resolved = kind

    async def aclose(self) -> None:
        if self._shared is not None and self._spec is not None:
            self._backends.release(self._spec, self._shared)
        self._shared = self._spec = None

    async def _submit(self, op: Op) -> Outcome:
        if self._shared is None:
            await self.prepare()
        assert self._shared is not None
        try:
            return await self._shared.batcher(self.interface).submit(op)
        except BackendError as exc:
            raise SinkError(f"wireguard sink {self.name!r}: {exc}") from None

    def _no_peer(self) -> str:
        return (
            f"wireguard sink {self.name!r}: interface {self.interface} has no peer "
            f"{self.peer_text} (configure the peer first; the sink only sets its PSK)"
        )

    async def _write(self, psk: bytes, what: str) -> None:
        outcome = await self._submit(Op(self.peer, psk, write=True))
        if outcome is Outcome.NO_PEER:
            raise SinkError(self._no_peer())
        if outcome is not Outcome.MATCH:
            raise SinkError(
                f"wireguard sink {self.name!r}: {what} on {self.interface} did not take effect "
                f"(read back: {outcome.value})"
            )

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        try:
            psk = check_psk(secret.reveal())
        except ValueError as exc:
            raise SinkError(f"wireguard sink {self.name!r}: {exc}") from None
        await self._write(psk, "the PSK")
        log.debug(
            "wireguard sink %s: link %s epoch %d installed for peer %s",
            self.name,
            link.name,
            meta.epoch,
            self.peer_text,
        )

    async def verify(self, link: Link, secret: Secret, meta: KeyMeta) -> bool | None:
        expect = secret.reveal()
        if len(expect) != 32 or not any(expect):
            return False
        outcome = await self._submit(Op(self.peer, expect, write=False))
        if outcome is Outcome.NO_PEER:
            raise SinkError(self._no_peer())
        return outcome is Outcome.MATCH

    async def erase(self, link: Link, reason: str) -> None:
        await self._write(check_psk(os.urandom(32)), "erasing (random PSK)")
        log.info(
            "wireguard sink %s: link %s erased (%s): peer %s now holds a random PSK",
            self.name,
            link.name,
            reason,
            public_key_text(self.peer),
        )
