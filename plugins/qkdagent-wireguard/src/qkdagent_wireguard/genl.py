"""A minimal generic-netlink client for WireGuard PSKs: batched writes, lean read-back.

pyroute2's synchronous API costs about a millisecond per call (it spins an event loop per
request) and parses every attribute of a device dump, which makes it as slow as spawning
`wg set` and too slow for a gateway's 1,000 peers. This client sends one SET_DEVICE message per
up to `CHUNK` peers, each peer carrying exactly three attributes (public key, PSK, flags =
UPDATE_ONLY), and reads back only public keys and PSKs. It never logs; error messages carry the
errno only. Constants are the kernel's uapi `wireguard.h` and `genetlink.h`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence

NETLINK_GENERIC = 16
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
GENL_ID_CTRL, CTRL_CMD_GETFAMILY = 0x10, 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
WG_GENL_VERSION = 1
WG_CMD_GET_DEVICE, WG_CMD_SET_DEVICE = 0, 1
WGDEVICE_A_IFNAME, WGDEVICE_A_PEERS = 2, 8
WGPEER_A_PUBLIC_KEY, WGPEER_A_PRESHARED_KEY, WGPEER_A_FLAGS = 1, 2, 3
WGPEER_F_UPDATE_ONLY = 4
CHUNK = 256
"""Peers per SET_DEVICE message (~21 KB), well inside the default socket buffers."""

_NLMSGHDR = struct.Struct("=IHHII")
_GENLHDR = struct.Struct("=BBH")
_NLAHDR = struct.Struct("=HH")


class NetlinkError(OSError):
    """The kernel answered with an error (`errno` holds it)."""


def nla(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    data = _NLAHDR.pack(_NLAHDR.size + len(payload), kind) + payload
    return data + b"\x00" * (-len(data) % 4)


def iter_nlas(buf: bytes | memoryview) -> Iterator[tuple[int, memoryview]]:
    """(type without flags, payload) for each attribute in `buf`."""
    view = memoryview(buf)
    offset = 0
    while offset + _NLAHDR.size <= len(view):
        length, kind = _NLAHDR.unpack_from(view, offset)
        if length < _NLAHDR.size or offset + length > len(view):
            raise NetlinkError(errno.EBADMSG, "malformed netlink attribute")
        yield kind & NLA_TYPE_MASK, view[offset + _NLAHDR.size : offset + length]
        offset += (length + 3) & ~3


def set_psk_attrs(ifname: str, items: Sequence[tuple[bytes, bytes]]) -> bytearray:
    """SET_DEVICE attributes: the interface and, per peer, public key, PSK and UPDATE_ONLY."""
    peers = bytearray()
    flags = struct.pack("=I", WGPEER_F_UPDATE_ONLY)
    for index, (public, psk) in enumerate(items):
        body = nla(WGPEER_A_PUBLIC_KEY, public) + nla(WGPEER_A_PRESHARED_KEY, psk)
        peers += nla(index | NLA_F_NESTED, body + nla(WGPEER_A_FLAGS, flags))
    attrs = bytearray(nla(WGDEVICE_A_IFNAME, ifname.encode() + b"\x00"))
    attrs += nla(WGDEVICE_A_PEERS | NLA_F_NESTED, bytes(peers))
    peers[:] = bytes(len(peers))
    return attrs


def parse_device(payload: memoryview, into: dict[bytes, bytes | None]) -> None:
    """Add the peers of one GET_DEVICE message (public key -> PSK or None) to `into`."""
    for kind, value in iter_nlas(payload):
        if kind != WGDEVICE_A_PEERS:
            continue
        for _, peer in iter_nlas(value):
            public = psk = None
            for pkind, pvalue in iter_nlas(peer):
                if pkind == WGPEER_A_PUBLIC_KEY:
                    public = bytes(pvalue)
                elif pkind == WGPEER_A_PRESHARED_KEY:
                    psk = bytes(pvalue)
            if public is not None:
                into[public] = psk if psk is not None and any(psk) else None


class GenlWireGuard:
    """One netlink socket in the caller's network namespace, bound to the `wireguard` family."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            self.sock.settimeout(timeout)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.sock.bind((0, 0))
            self.seq = int.from_bytes(os.urandom(3), "little")
            self.family = self._resolve_family(b"wireguard")
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def _resolve_family(self, name: bytes) -> int:
        try:
            replies = self._request(
                GENL_ID_CTRL, CTRL_CMD_GETFAMILY, nla(CTRL_ATTR_FAMILY_NAME, name + b"\x00"), 0
            )
        except NetlinkError as exc:
            raise NetlinkError(exc.errno, "the kernel has no WireGuard netlink family") from None
        for payload in replies:
            for kind, value in iter_nlas(payload):
                if kind == CTRL_ATTR_FAMILY_ID:
                    return int(struct.unpack_from("=H", value)[0])
        raise NetlinkError(errno.ENOENT, "the kernel has no WireGuard netlink family")

    def _request(
        self, msg_type: int, cmd: int, attrs: bytes | bytearray, flags: int
    ) -> list[memoryview]:
        """Send one request; return the payloads after the genl header (all parts of a dump)."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        body = _GENLHDR.pack(cmd, WG_GENL_VERSION, 0) + attrs
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | flags, self.seq, 0
        )
        message = bytearray(header) + body
        try:
            self.sock.send(message)
        finally:
            message[:] = bytes(len(message))
        payloads: list[memoryview] = []
        while True:
            data = memoryview(self.sock.recv(1 << 20))
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, mflags, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or offset + length > len(data):
                    raise NetlinkError(errno.EBADMSG, "malformed netlink message")
                body_view = data[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                if seq != self.seq:
                    continue
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", body_view)
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return payloads  # the ACK of a request
                if kind == NLMSG_DONE:
                    return payloads
                payloads.append(body_view[_GENLHDR.size :])
                if not mflags & NLM_F_MULTI and not flags & NLM_F_ACK:
                    return payloads

    def set_psks(self, ifname: str, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Write PSKs with UPDATE_ONLY (missing peers are skipped by the kernel, not created)."""
        for start in range(0, len(items), CHUNK):
            attrs = set_psk_attrs(ifname, items[start : start + CHUNK])
            try:
                self._request(self.family, WG_CMD_SET_DEVICE, attrs, NLM_F_ACK)
            finally:
                attrs[:] = bytes(len(attrs))

    def get_psks(self, ifname: str) -> dict[bytes, bytes | None]:
        """Every peer's PSK on `ifname` (None when it has none)."""
        attrs = nla(WGDEVICE_A_IFNAME, ifname.encode() + b"\x00")
        peers: dict[bytes, bytes | None] = {}
        for payload in self._request(self.family, WG_CMD_GET_DEVICE, attrs, NLM_F_DUMP):
            parse_device(payload, peers)
        return peers
