"""Pick the backend for an interface: kernel netlink when this network namespace has a kernel
WireGuard interface of that name, else the userspace control socket.

The kernel is asked first because `/run/wireguard` is shared by every network namespace: a
socket named after the interface may belong to a wireguard-go in another namespace, or be left
behind by a dead one, while netlink only sees this namespace's devices. The socket is used only
when the kernel has no such WireGuard device here.
"""

from __future__ import annotations

import enum
import errno
import socket
from collections.abc import Sequence
from pathlib import Path

from .backend import Backend, BackendError, Op, Outcome
from .drive import Exchange, drive_blocking
from .genl import GenlWireGuard
from .netlink import NetlinkBackend
from .uapi import UapiBackend


class Kernel(enum.Enum):
    DEVICE = "device"
    """The interface exists here and answered WG_CMD_GET_DEVICE."""
    ABSENT = "absent"
    """No such interface here, not a WireGuard device, or no `wireguard` netlink family."""
    UNKNOWN = "unknown"
    """The kernel could not be asked (no CAP_NET_ADMIN, netlink refused, ...)."""


ABSENT = {
    errno.ENODEV: "ENODEV, no such device",
    errno.EOPNOTSUPP: "EOPNOTSUPP, not a WireGuard device",
    errno.ENOENT: "ENOENT, no WireGuard in this kernel",
}
"""GET_DEVICE errors that mean "no kernel WireGuard device here" (the family lookup gives
ENOENT), with the words the error messages use."""


def classify(code: int | None) -> Kernel:
    """What the errno of a GET_DEVICE attempt says (None: it answered)."""
    if code is None:
        return Kernel.DEVICE
    return Kernel.ABSENT if code in ABSENT else Kernel.UNKNOWN


def explain(code: int | None) -> str:
    if code in ABSENT:
        return f"netlink: {ABSENT[code]}"
    return f"netlink: {errno.errorcode.get(code, code) if code else 'failed'}"


def choose(interface: str, kernel: Kernel, reason: str, socket_path: Path, has_socket: bool) -> str:
    """ "netlink" or "uapi" for `interface`, or BackendError saying why neither (pure)."""
    if kernel is Kernel.DEVICE:
        return "netlink"
    if kernel is Kernel.UNKNOWN:
        raise BackendError(
            f"interface {interface!r}: cannot tell whether it is a kernel WireGuard interface "
            f'({reason}); set backend = "netlink" or "uapi" explicitly'
        )
    if has_socket:
        return "uapi"
    raise BackendError(
        f"interface {interface!r}: no kernel WireGuard interface in this network namespace "
        f"({reason}) and no userspace control socket at {socket_path}"
    )


def probe_kernel(interface: str) -> Exchange[tuple[Kernel, str]]:
    """Ask this namespace's kernel about `interface`: (verdict, reason for the messages)."""
    try:
        socket.if_nametoindex(interface)  # this namespace only; no privilege needed
    except OSError:
        return Kernel.ABSENT, "no such interface"
    client: GenlWireGuard | None = None
    try:
        client = GenlWireGuard()
        yield from client.open()
        yield from client.set_and_get(interface, [], ())
    except OSError as exc:
        return classify(exc.errno or -1), explain(exc.errno)
    finally:
        if client is not None:
            client.close()
    return Kernel.DEVICE, "kernel WireGuard"


def detect(interface: str, uapi_dir: Path, timeout: float = 5.0) -> str:
    """Return "netlink" or "uapi" for `interface`, or raise BackendError saying why (blocking)."""
    kernel, reason = drive_blocking(probe_kernel(interface), timeout, "netlink")
    uapi = UapiBackend(uapi_dir)
    return choose(interface, kernel, reason, uapi.socket_path(interface), uapi.exists(interface))


class AutoBackend:
    """Dispatch per interface (for the broker, which serves several interfaces).

    The choice is made on an interface's first batch and kept; a failed batch forgets it, so a
    device replaced by one of the other kind is picked up on the next request.
    """

    name = "auto"

    def __init__(self, uapi_dir: Path = Path("/run/wireguard"), timeout: float = 5.0) -> None:
        self.uapi = UapiBackend(uapi_dir, timeout)
        self.netlink = NetlinkBackend(timeout=timeout)
        self.timeout = timeout
        self._chosen: dict[str, Backend] = {}

    def exchange(self, interface: str, ops: Sequence[Op]) -> Exchange[list[Outcome]]:
        backend = self._chosen.get(interface)
        if backend is None:
            kernel, reason = yield from probe_kernel(interface)
            path = self.uapi.socket_path(interface)
            kind = choose(interface, kernel, reason, path, self.uapi.exists(interface))
            backend = self.netlink if kind == "netlink" else self.uapi
            self._chosen[interface] = backend
        try:
            return (yield from backend.exchange(interface, ops))
        except BackendError:
            self._chosen.pop(interface, None)
            raise

    def close(self) -> None:
        self.uapi.close()
        self.netlink.close()
