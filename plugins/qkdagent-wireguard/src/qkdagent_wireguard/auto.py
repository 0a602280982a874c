"""Pick the backend for an interface: its userspace control socket if there is one, else netlink."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .backend import Backend, BackendError, Op, Outcome
from .drive import Exchange
from .netlink import NetlinkBackend
from .uapi import UapiBackend


def detect(interface: str, uapi_dir: Path) -> str:
    """Return "uapi" or "netlink" for `interface`, or raise BackendError saying why (blocking)."""
    if UapiBackend(uapi_dir).exists(interface):
        return "uapi"
    probe = NetlinkBackend()
    try:
        probe.read(interface)
    except BackendError as exc:
        raise BackendError(
            f"interface {interface!r}: no userspace control socket at "
            f"{uapi_dir / (interface + '.sock')} and no kernel WireGuard interface ({exc})"
        ) from None
    finally:
        probe.close()
    return "netlink"


class AutoBackend:
    """Dispatch per interface (for the broker, which serves several interfaces)."""

    name = "auto"

    def __init__(self, uapi_dir: Path = Path("/run/wireguard"), timeout: float = 5.0) -> None:
        self.uapi = UapiBackend(uapi_dir, timeout)
        self.netlink = NetlinkBackend(timeout=timeout)
        self.timeout = timeout
        self.spin = self.uapi.spin

    def exchange(self, interface: str, ops: Sequence[Op]) -> Exchange[list[Outcome]]:
        backend: Backend = self.uapi if self.uapi.exists(interface) else self.netlink
        return backend.exchange(interface, ops)

    def close(self) -> None:
        self.uapi.close()
        self.netlink.close()
