"""GET_DEVICE dumps that split one peer across messages, built the way the kernel builds them.

Kernel `netlink.c` `get_peer()` puts the public key, the PSK, timers, counters, the endpoint and
as many allowed IPs as fit; when the message is full it ends it and continues the same peer in
the next message with only the public key and the remaining allowed IPs. Both parsers must keep
the PSK of the first part.
"""

from __future__ import annotations

import os
import socket
import struct

from qkdagent_wireguard import genl
from qkdagent_wireguard.netlink import _pyroute2_read

WGDEVICE_A_IFINDEX, WGDEVICE_A_PRIVATE_KEY, WGDEVICE_A_PUBLIC_KEY = 1, 3, 4
WGDEVICE_A_LISTEN_PORT, WGDEVICE_A_FWMARK = 6, 7
WGPEER_A_ENDPOINT, WGPEER_A_KEEPALIVE, WGPEER_A_LAST_HANDSHAKE = 4, 5, 6
WGPEER_A_RX_BYTES, WGPEER_A_TX_BYTES, WGPEER_A_ALLOWEDIPS, WGPEER_A_PROTOCOL = 7, 8, 9, 10
WGALLOWEDIP_A_FAMILY, WGALLOWEDIP_A_IPADDR, WGALLOWEDIP_A_CIDR_MASK = 1, 2, 3
FAMILY_ID = 0x1A
NESTED = genl.NLA_F_NESTED


def allowed_ips(addresses: list[int]) -> bytes:
    """An ALLOWEDIPS nest of IPv4 /32s, each entry as kernel `get_allowedips()` writes it."""
    entries = b"".join(
        genl.nla(
            NESTED,
            genl.nla(WGALLOWEDIP_A_CIDR_MASK, b"\x20")
            + genl.nla(WGALLOWEDIP_A_FAMILY, struct.pack("=H", socket.AF_INET))
            + genl.nla(WGALLOWEDIP_A_IPADDR, struct.pack(">I", address)),
        )
        for address in addresses
    )
    return genl.nla(WGPEER_A_ALLOWEDIPS | NESTED, entries)


def first_part(public: bytes, psk: bytes, addresses: list[int]) -> bytes:
    """A peer's first (or only) part: everything, then the allowed IPs that fit."""
    endpoint = struct.pack("=HH4s8x", socket.AF_INET, socket.htons(51820), bytes([10, 0, 0, 2]))
    body = (
        genl.nla(genl.WGPEER_A_PUBLIC_KEY, public)
        + genl.nla(genl.WGPEER_A_PRESHARED_KEY, psk)
        + genl.nla(WGPEER_A_LAST_HANDSHAKE, struct.pack("=qq", 0, 0))
        + genl.nla(WGPEER_A_KEEPALIVE, struct.pack("=H", 0))
        + genl.nla(WGPEER_A_TX_BYTES, struct.pack("=Q", 0))
        + genl.nla(WGPEER_A_RX_BYTES, struct.pack("=Q", 0))
        + genl.nla(WGPEER_A_PROTOCOL, struct.pack("=I", 1))
        + genl.nla(WGPEER_A_ENDPOINT, endpoint)
        + allowed_ips(addresses)
    )
    return genl.nla(NESTED, body)


def continuation(public: bytes, addresses: list[int]) -> bytes:
    """The same peer continued in the next message: public key and more allowed IPs only."""
    return genl.nla(NESTED, genl.nla(genl.WGPEER_A_PUBLIC_KEY, public) + allowed_ips(addresses))


def device_attrs() -> bytes:
    """What the first message of a dump starts with (device private key included)."""
    return (
        genl.nla(WGDEVICE_A_LISTEN_PORT, struct.pack("=H", 51820))
        + genl.nla(WGDEVICE_A_FWMARK, struct.pack("=I", 0))
        + genl.nla(WGDEVICE_A_IFINDEX, struct.pack("=I", 7))
        + genl.nla(genl.WGDEVICE_A_IFNAME, b"wg0\x00")
        + genl.nla(WGDEVICE_A_PRIVATE_KEY, os.urandom(32))
        + genl.nla(WGDEVICE_A_PUBLIC_KEY, os.urandom(32))
    )


def split_dump(
    split: bytes, psk: bytes, before: bytes, before_psk: bytes, after: bytes
) -> list[bytes]:
    """Two dump payloads (after the genl header): peer `before` whole and peer `split`'s first
    part; then `split`'s continuation and peer `after` whole, with no PSK."""
    ips = list(range(0x0A000001, 0x0A000001 + 300))
    one = device_attrs() + genl.nla(
        genl.WGDEVICE_A_PEERS | NESTED,
        first_part(before, before_psk, ips[:1]) + first_part(split, psk, ips[1:150]),
    )
    two = genl.nla(
        genl.WGDEVICE_A_PEERS | NESTED,
        continuation(split, ips[150:299]) + first_part(after, bytes(32), ips[299:]),
    )
    return [one, two]


def test_genl_keeps_the_psk_of_a_peer_continued_in_the_next_message() -> None:
    split, before, after = os.urandom(32), os.urandom(32), os.urandom(32)
    psk, before_psk = os.urandom(32), os.urandom(32)
    found: dict[bytes, bytes | None] = {}
    for payload in split_dump(split, psk, before, before_psk, after):
        genl.parse_device(memoryview(payload), found)
    assert found == {before: before_psk, split: psk, after: None}
    wanted: dict[bytes, bytes | None] = {}
    for payload in split_dump(split, psk, before, before_psk, after):
        genl.parse_device(memoryview(payload), wanted, {split})
    assert wanted == {split: psk}


def test_record_peer_rules() -> None:
    public, psk = os.urandom(32), os.urandom(32)
    held: dict[bytes, bytes | None] = {}
    genl.record_peer(held, public, None)  # a part without PSK first: known peer, no key yet
    assert held == {public: None}
    genl.record_peer(held, public, psk)
    genl.record_peer(held, public, None)  # continuation
    assert held == {public: psk}
    genl.record_peer(held, public, bytes(32))  # an all-zero PSK is no PSK
    assert held == {public: None}


class _Dump:
    """Stands in for pyroute2's socket only: `info()` returns real `wgmsg` objects that
    pyroute2 decoded from the kernel-format bytes above."""

    def __init__(self, payloads: list[bytes]) -> None:
        from pyroute2.netlink.generic.wireguard import wgmsg

        self.messages = []
        for seq, payload in enumerate(payloads):
            body = struct.pack("=BBH", genl.WG_CMD_GET_DEVICE, genl.WG_GENL_VERSION, 0) + payload
            header = struct.pack("=IHHII", 16 + len(body), FAMILY_ID, genl.NLM_F_MULTI, seq, 0)
            message = wgmsg(header + body)
            message.decode()
            self.messages.append(message)

    def info(self, interface: str) -> list[object]:
        return self.messages


def test_pyroute2_keeps_the_psk_of_a_peer_continued_in_the_next_message() -> None:
    split, before, after = os.urandom(32), os.urandom(32), os.urandom(32)
    psk, before_psk = os.urandom(32), os.urandom(32)
    dump = _Dump(split_dump(split, psk, before, before_psk, after))
    assert len(dump.messages[1].get_attr("WGDEVICE_A_PEERS")) == 2  # decoded as two parts
    assert _pyroute2_read(dump, "wg0") == {before: before_psk, split: psk, after: None}
