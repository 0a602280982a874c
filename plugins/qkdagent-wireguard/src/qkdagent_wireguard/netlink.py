"""Kernel WireGuard over generic netlink.

Two clients: the built-in `genl` one (default: batched writes, lean read-back) and pyroute2
(>= 0.9.3; `netlink_library = "pyroute2"`). Either way only the public key, the PSK and the
UPDATE_ONLY flag are sent, so allowed IPs, endpoints and other peers stay as the administrator
set them (pyroute2 < 0.9.3 wiped allowed IPs on every set; the dependency pin excludes it). The
kernel skips an unknown peer under UPDATE_ONLY without an error and ignores short keys, which is
why every batch is read back.
"""

from __future__ import annotations

import base64
import errno
import logging
import threading
from collections.abc import Sequence
from typing import Any

from .backend import BackendError, Op, Outcome, compare
from .genl import GenlWireGuard

LIBRARIES = ("builtin", "pyroute2")


def quiet_pyroute2() -> None:
    """pyroute2 logs every netlink message whole at DEBUG, PSKs and private keys included.

    Raise its logger to INFO (unless the operator set it higher) so an agent running with
    debug logging never writes key bytes.
    """
    logger = logging.getLogger("pyroute2")
    if logger.level < logging.INFO:
        logger.setLevel(logging.INFO)


class NetlinkBackend:
    """Backend over the `wireguard` generic netlink family of the caller's network namespace."""

    name = "netlink"

    def __init__(self, library: str = "builtin") -> None:
        if library not in LIBRARIES:
            raise ValueError(f"netlink library must be one of {LIBRARIES}")
        self.library = library
        self._client: Any = None
        self._lock = threading.Lock()
        """One request at a time on the socket (batches of different interfaces may overlap)."""
        if library == "pyroute2":
            quiet_pyroute2()

    def _socket(self) -> Any:
        if self._client is None:
            try:
                if self.library == "builtin":
                    self._client = GenlWireGuard()
                else:
                    from pyroute2 import WireGuard

                    self._client = WireGuard()
            except Exception as exc:
                raise BackendError(_describe(exc, "open the WireGuard netlink family")) from None
        return self._client

    def read(self, interface: str) -> dict[bytes, bytes | None]:
        """Every peer's PSK on `interface` (None when it has none)."""
        client = self._socket()
        try:
            if self.library == "builtin":
                return client.get_psks(interface)
            return _pyroute2_read(client, interface)
        except Exception as exc:
            self.close()
            raise BackendError(_describe(exc, f"read interface {interface!r}")) from None

    def apply(self, interface: str, ops: Sequence[Op]) -> list[Outcome]:
        with self._lock:
            return self._apply(interface, ops)

    def _apply(self, interface: str, ops: Sequence[Op]) -> list[Outcome]:
        client = self._socket()
        writes = [(op.peer, op.expect) for op in ops if op.write]
        if writes:
            try:
                if self.library == "builtin":
                    client.set_psks(interface, writes)
                else:
                    _pyroute2_write(client, interface, writes)
            except Exception as exc:
                self.close()
                raise BackendError(_describe(exc, f"set PSKs on {interface!r}")) from None
        return compare(ops, self.read(interface))

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: S110 - closing a broken socket must not mask the real error
                pass


def _pyroute2_write(wg: Any, interface: str, writes: list[tuple[bytes, bytes]]) -> None:
    for public, psk in writes:
        peer = {
            "public_key": base64.b64encode(public).decode(),
            "preshared_key": base64.b64encode(psk).decode(),
            "update_only": True,
        }
        try:
            wg.set(interface, peer=peer)
        finally:
            peer.clear()


def _pyroute2_read(wg: Any, interface: str) -> dict[bytes, bytes | None]:
    peers: dict[bytes, bytes | None] = {}
    for message in wg.info(interface):
        for peer in message.get_attr("WGDEVICE_A_PEERS") or ():
            pub = peer.get_attr("WGPEER_A_PUBLIC_KEY")
            psk = peer.get_attr("WGPEER_A_PRESHARED_KEY")
            if pub is None:
                continue
            raw = base64.b64decode(psk) if psk is not None else None
            peers[base64.b64decode(pub)] = raw if raw is not None and any(raw) else None
    return peers


def _describe(exc: Exception, doing: str) -> str:
    """A message naming the netlink errno; never includes the request (it holds the key)."""
    code = getattr(exc, "code", None)
    if not isinstance(code, int):
        code = getattr(exc, "errno", None)
    if code == errno.ENODEV:
        return f"cannot {doing}: no such WireGuard interface (ENODEV)"
    if code == errno.ENOENT:
        return f"cannot {doing}: the kernel has no WireGuard netlink family (ENOENT)"
    if code == errno.EPERM:
        return f"cannot {doing}: CAP_NET_ADMIN is required (EPERM)"
    if isinstance(code, int):
        return f"cannot {doing}: netlink error {errno.errorcode.get(code, code)}"
    return f"cannot {doing}: {type(exc).__name__}"
