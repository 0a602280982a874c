"""Kernel WireGuard over generic netlink.

Two clients: the built-in `genl` one (default: batched writes, lean read-back) and pyroute2
(>= 0.9.3; `netlink_library = "pyroute2"`). Either way only the public key, the PSK and the
UPDATE_ONLY flag are sent, so allowed IPs, endpoints and other peers stay as the administrator
set them (pyroute2 < 0.9.3 wiped allowed IPs on every set; the dependency pin excludes it). The
kernel skips an unknown peer under UPDATE_ONLY without an error and ignores short keys, which is
why every batch is read back: the built-in client sends the writes and the GET_DEVICE dump
together (the kernel answers both before the first recv) and decodes only the named peers.
"""

from __future__ import annotations

import base64
import errno
import logging
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

from .backend import BackendError, Op, Outcome, compare
from .drive import Exchange, drive_blocking
from .genl import GenlWireGuard, record_peer

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
    """Backend over the `wireguard` generic netlink family of the caller's network namespace.

    The built-in client keeps one socket per interface (so batches of different interfaces
    never share one) and runs on the trio thread; pyroute2 blocks, so its calls go to a worker
    thread, one at a time.
    """

    name = "netlink"

    def __init__(self, library: str = "builtin", timeout: float = 5.0) -> None:
        if library not in LIBRARIES:
            raise ValueError(f"netlink library must be one of {LIBRARIES}")
        self.library = library
        self.timeout = timeout
        self._clients: dict[str, GenlWireGuard] = {}
        self._pyroute2: Any = None
        self._lock = threading.Lock()
        if library == "pyroute2":
            quiet_pyroute2()

    def read(self, interface: str) -> dict[bytes, bytes | None]:
        """Every peer's PSK on `interface` (None when it has none); blocking (detection)."""
        if self.library == "pyroute2":
            return self._pyroute2_apply(interface, [])
        return drive_blocking(self._exchange_builtin(interface, [], None), self.timeout, "netlink")

    def exchange(self, interface: str, ops: Sequence[Op]) -> Exchange[list[Outcome]]:
        """Write the batch, then read back the peers it names and compare."""
        wanted = {op.peer for op in ops}
        if self.library == "pyroute2":
            held = yield partial(self._pyroute2_apply, interface, ops)
        else:
            held = yield from self._exchange_builtin(interface, ops, wanted)
        return compare(ops, held)

    def _exchange_builtin(
        self, interface: str, ops: Sequence[Op], wanted: set[bytes] | None
    ) -> Exchange[dict[bytes, bytes | None]]:
        client = self._clients.get(interface)
        try:
            if client is None:
                client = self._clients[interface] = GenlWireGuard()
            yield from client.open()
            writes = [(op.peer, op.expect) for op in ops if op.write]
            held = yield from client.set_and_get(interface, writes, wanted)
        except Exception as exc:
            self._drop(interface)
            doing = f"set PSKs on {interface!r}" if ops else f"read interface {interface!r}"
            raise BackendError(_describe(exc, doing)) from None
        except BaseException:
            self._drop(interface)
            raise
        return held

    def _pyroute2_apply(self, interface: str, ops: Sequence[Op]) -> dict[bytes, bytes | None]:
        with self._lock:
            try:
                if self._pyroute2 is None:
                    from pyroute2 import WireGuard

                    self._pyroute2 = WireGuard()
                writes = [(op.peer, op.expect) for op in ops if op.write]
                if writes:
                    _pyroute2_write(self._pyroute2, interface, writes)
                return _pyroute2_read(self._pyroute2, interface)
            except Exception as exc:
                self._close_pyroute2()
                raise BackendError(_describe(exc, f"set PSKs on {interface!r}")) from None

    def _drop(self, interface: str) -> None:
        client = self._clients.pop(interface, None)
        if client is not None:
            client.close()

    def _close_pyroute2(self) -> None:
        client, self._pyroute2 = self._pyroute2, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: S110 - closing a broken socket must not mask the real error
                pass

    def close(self) -> None:
        for interface in list(self._clients):
            self._drop(interface)
        self._close_pyroute2()


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
            record_peer(
                peers, base64.b64decode(pub), base64.b64decode(psk) if psk is not None else None
            )
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
