"""A minimal generic-netlink client for WireGuard PSKs: batched writes, lean read-back.

pyroute2's synchronous API costs about a millisecond per call (it spins an event loop per
request) and parses every attribute of a device dump, which makes it as slow as spawning
`wg set` and too slow for a gateway's 1,000 peers. This client sends one SET_DEVICE message per
up to `CHUNK` peers, each peer carrying exactly three attributes (public key, PSK, flags =
UPDATE_ONLY), followed at once by the GET_DEVICE dump, and reads back only public keys and PSKs
of the peers asked about. It runs on the trio thread without a worker-thread hop. It never logs;
error messages carry the errno only. Constants: the kernel uapi `wireguard.h`, `genetlink.h`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Collection, Iterator, Sequence

from .drive import Exchange

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
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
RECV_SIZE = 65536
"""Dump messages are at most 32 KiB; error ACKs carry no request copy (NETLINK_CAP_ACK)."""
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


def record_peer(into: dict[bytes, bytes | None], public: bytes, psk: bytes | None) -> None:
    """Note one peer part of a GET_DEVICE dump; `psk` None when the part has no PSK attribute.

    A peer whose allowed IPs overflow one dump message continues in the next one with only its
    public key and more allowed IPs (kernel `get_peer()` sends the PSK in the first part only):
    such a part must not erase the PSK read from the first. An all-zero PSK means none.
    """
    if psk is None:
        into.setdefault(public, None)
    else:
        into[public] = psk if any(psk) else None


def parse_device(
    payload: memoryview, into: dict[bytes, bytes | None], wanted: Collection[bytes] | None = None
) -> None:
    """Add the peers of one GET_DEVICE message (public key -> PSK or None) to `into`; only
    those in `wanted` when given. A peer's other attributes are skipped, not decoded (the
    kernel puts the public key and PSK first)."""
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
                if public is not None and psk is not None:
                    break
            if public is not None and (wanted is None or public in wanted):
                record_peer(into, public, psk)


Request = tuple[int, int, bytes | bytearray, int]
"""(message type, genl command, attributes, flags)."""


class GenlWireGuard:
    """One non-blocking netlink socket in the caller's network namespace, bound to the
    `wireguard` family. Methods are exchanges (see `drive`): the kernel answers synchronously,
    so they rarely wait, and several requests go out before the first answer is read."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            try:  # error ACKs without a copy of the request (which holds PSKs)
                self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            except OSError:
                pass
            self.sock.bind((0, 0))
        except BaseException:
            self.sock.close()
            raise
        self.seq = int.from_bytes(os.urandom(3), "little")
        self.family: int | None = None

    def close(self) -> None:
        self.sock.close()

    def open(self) -> Exchange[None]:
        """Resolve the `wireguard` family id (once)."""
        if self.family is not None:
            return
        request = (
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            nla(CTRL_ATTR_FAMILY_NAME, b"wireguard\x00"),
            0,
        )
        try:
            (replies,) = yield from self.transact([request])
        except NetlinkError as exc:
            raise NetlinkError(exc.errno, "the kernel has no WireGuard netlink family") from None
        for payload in replies:
            for kind, value in iter_nlas(payload):
                if kind == CTRL_ATTR_FAMILY_ID:
                    self.family = int(struct.unpack_from("=H", value)[0])
                    return
        raise NetlinkError(errno.ENOENT, "the kernel has no WireGuard netlink family")

    def transact(self, requests: Sequence[Request]) -> Exchange[list[list[memoryview]]]:
        """Send every request, then collect each one's payloads (after the genl header) until
        its ACK, DONE or single reply. The first error answer raises NetlinkError (answers
        left in the socket are skipped by sequence number next time)."""
        pending: dict[int, int] = {}
        results: dict[int, list[memoryview]] = {}
        for msg_type, cmd, attrs, flags in requests:
            self.seq = (self.seq + 1) & 0xFFFFFFFF
            body = _GENLHDR.pack(cmd, WG_GENL_VERSION, 0) + attrs
            header = _NLMSGHDR.pack(
                _NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | flags, self.seq, 0
            )
            message = bytearray(header) + body
            try:
                while True:
                    try:
                        self.sock.send(message)
                        break
                    except BlockingIOError:
                        yield self.sock, True
            finally:
                message[:] = bytes(len(message))
                if isinstance(body, bytearray):
                    body[:] = bytes(len(body))
            pending[self.seq] = flags
            results[self.seq] = []
        order = list(results)
        # The kernel has answered already; still pass through the scheduler once (a ready
        # socket costs one epoll pass) so rotations started together can join the next batch.
        yield self.sock, False
        while pending:
            while True:
                try:
                    data = memoryview(self.sock.recv(RECV_SIZE))
                    break
                except BlockingIOError:
                    yield self.sock, False
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, mflags, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or offset + length > len(data):
                    raise NetlinkError(errno.EBADMSG, "malformed netlink message")
                body_view = data[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                request_flags = pending.get(seq)
                if request_flags is None:
                    continue
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", body_view)
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    del pending[seq]  # the ACK of a request
                elif kind == NLMSG_DONE:
                    del pending[seq]
                else:
                    results[seq].append(body_view[_GENLHDR.size :])
                    if not mflags & NLM_F_MULTI and not request_flags & NLM_F_ACK:
                        del pending[seq]
        return [results[seq] for seq in order]

    def set_and_get(
        self,
        ifname: str,
        items: Sequence[tuple[bytes, bytes]],
        wanted: Collection[bytes] | None,
    ) -> Exchange[dict[bytes, bytes | None]]:
        """Write PSKs with UPDATE_ONLY (the kernel skips missing peers without an error), then
        read back the PSKs of the `wanted` peers present: one send per message, one pass over
        the answers."""
        assert self.family is not None, "open() first"
        requests: list[Request] = []
        try:
            for start in range(0, len(items), CHUNK):
                attrs = set_psk_attrs(ifname, items[start : start + CHUNK])
                requests.append((self.family, WG_CMD_SET_DEVICE, attrs, NLM_F_ACK))
            get = nla(WGDEVICE_A_IFNAME, ifname.encode() + b"\x00")
            requests.append((self.family, WG_CMD_GET_DEVICE, get, NLM_F_DUMP))
            answers = yield from self.transact(requests)
        finally:
            for _, _, sent_attrs, _ in requests:
                if isinstance(sent_attrs, bytearray):
                    sent_attrs[:] = bytes(len(sent_attrs))
        peers: dict[bytes, bytes | None] = {}
        for payload in answers[-1]:
            parse_device(payload, peers, wanted)
        return peers
