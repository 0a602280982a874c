"""Kernel WireGuard through netlink. Runs inside the QEMU guest (see test_kernel.py), where the
Debian kernel has the wireguard module; the file name keeps the host's pytest from collecting it.

Side a of each pair lives in the test's own namespace so the in-process netlink sink reaches it;
side b lives in a namespace of its own and is configured with `wg` as the peer's agent would.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from qkdagent_wireguard.sink import WireGuardSink
from qkdagent_wireguard.testbed import Node, Pair, genkey

from qkdagent import KeyMeta, Link, Misconfigured, Options, PluginContext, Secret, SinkError
from qkdagent.testing import SinkContract, require_binary, require_root

LINK = Link("site", "alice", "bob", True)


def meta(epoch: int) -> KeyMeta:
    return KeyMeta(epoch, (f"k{epoch}",), "wireguard", time.time())


@pytest.fixture
def kernel_pair(tmp_path: Path) -> Iterator[Pair]:
    require_root()
    require_binary("wg", "ip", "ping")
    pair = Pair(tmp_path / "wg", kernel=True, a_in_caller_ns=True)
    try:
        pair.open(os.urandom(32), os.urandom(32))
        yield pair
    finally:
        pair.close()


def dump(node: Node) -> dict[str, list[str]]:
    """`wg show dump` peer lines by public key: psk, endpoint, allowed ips, handshake, ..."""
    lines = node.wg("show", node.iface, "dump").splitlines()[1:]
    return {line.split("\t")[0]: line.split("\t") for line in lines}


def make(pair: Pair, tmp_path: Path, **options: object) -> WireGuardSink:
    assert pair.a is not None and pair.b is not None
    table = {"interface": pair.a.iface, "peer_public_key": pair.b.public_text, **options}
    opts = Options(table, where="sinks.wg")
    sink = WireGuardSink("wg", opts, PluginContext("guest", tmp_path))
    opts.finish()
    return sink


class TestNetlinkSinkContract(SinkContract):
    @pytest.fixture
    def read_back(self, kernel_pair: Pair):  # type: ignore[no-untyped-def]
        a, b = kernel_pair.a, kernel_pair.b

        async def read(link: Link) -> bytes | None:
            return await trio.to_thread.run_sync(a.psk_of, b)

        return read

    library = "builtin"

    @pytest.fixture
    async def sink(self, kernel_pair: Pair, tmp_path: Path) -> AsyncIterator[WireGuardSink]:
        sink = make(kernel_pair, tmp_path, backend="netlink", netlink_library=self.library)
        await sink.prepare()
        yield sink
        await sink.aclose()


class TestPyroute2SinkContract(TestNetlinkSinkContract):
    library = "pyroute2"


async def test_auto_picks_netlink_for_a_kernel_interface(kernel_pair: Pair, tmp_path: Path) -> None:
    sink = make(kernel_pair, tmp_path)
    await sink.prepare()
    assert sink.resolved == "netlink"
    secret = Secret.random()
    await sink.install(LINK, secret, meta(1))
    assert kernel_pair.a.psk_of(kernel_pair.b) == secret.reveal()
    await sink.aclose()


@pytest.mark.parametrize("library", ["builtin", "pyroute2"])
async def test_psk_only_update_keeps_allowed_ips_endpoint_and_other_peers(
    kernel_pair: Pair, tmp_path: Path, library: str
) -> None:
    a, b = kernel_pair.a, kernel_pair.b
    _, third = genkey()
    third_text = base64.b64encode(third).decode()
    a.wg("set", a.iface, "peer", third_text, "allowed-ips", "10.215.0.9/32,10.215.1.0/24")
    a.wg("set", a.iface, "peer", b.public_text, "allowed-ips", f"{b.tunnel}/32,10.217.0.0/16")
    before = dump(a)
    sink = make(kernel_pair, tmp_path, backend="netlink", netlink_library=library)
    await sink.prepare()
    for epoch in (1, 2):
        await sink.install(LINK, Secret.random(), meta(epoch))
    after = dump(a)
    assert set(after) == {b.public_text, third_text}
    assert after[b.public_text][3] == before[b.public_text][3] == f"{b.tunnel}/32,10.217.0.0/16"
    assert after[b.public_text][2] == before[b.public_text][2]  # endpoint
    assert after[third_text] == before[third_text]
    await sink.aclose()


@pytest.mark.parametrize("bad", [bytes(32), os.urandom(16), os.urandom(31)])
async def test_zero_and_short_keys_are_refused(kernel_pair: Pair, tmp_path: Path, bad) -> None:  # type: ignore[no-untyped-def]
    sink = make(kernel_pair, tmp_path, backend="netlink")
    await sink.prepare()
    before = kernel_pair.a.psk_of(kernel_pair.b)
    assert before is not None
    with pytest.raises(SinkError, match=r"exactly 32|all-zero"):
        await sink.install(LINK, Secret(bad), meta(1))
    assert kernel_pair.a.psk_of(kernel_pair.b) == before
    await sink.aclose()


async def test_unknown_peer_and_interface_are_reported(kernel_pair: Pair, tmp_path: Path) -> None:
    a, b = kernel_pair.a, kernel_pair.b
    _, stranger = genkey()
    ghost = make(kernel_pair, tmp_path, backend="netlink")
    ghost.peer, ghost.peer_text = stranger, base64.b64encode(stranger).decode()
    with pytest.raises(Misconfigured, match="has no peer"):
        await ghost.prepare()
    nowhere = make(kernel_pair, tmp_path, backend="netlink")
    nowhere.interface = "wqnone0"
    with pytest.raises(Misconfigured, match="ENODEV"):
        await nowhere.prepare()
    sink = make(kernel_pair, tmp_path, backend="netlink")
    await sink.prepare()
    a.wg("set", a.iface, "peer", b.public_text, "remove")
    with pytest.raises(SinkError, match="has no peer"):
        await sink.install(LINK, Secret.random(), meta(1))
    assert b.public_text not in a.wg("show", a.iface, "peers"), "update_only must not create"
    await sink.aclose()


async def test_kernel_handshake_follows_rotation_and_erase(
    kernel_pair: Pair, tmp_path: Path
) -> None:
    a, b = kernel_pair.a, kernel_pair.b
    sink = make(kernel_pair, tmp_path, backend="netlink")
    await sink.prepare()
    assert not await trio.to_thread.run_sync(kernel_pair.fresh_handshake, 1.5)
    for epoch in (1, 2):
        secret = Secret.random()
        await sink.install(LINK, secret, meta(epoch))
        await trio.to_thread.run_sync(b.set_psk, a, secret.reveal(), kernel_pair.workdir)
        assert a.psk_of(b) == secret.reveal() == b.psk_of(a)
        assert await trio.to_thread.run_sync(kernel_pair.fresh_handshake, 8.0), epoch
        assert a.latest_handshake(b) > 0
    await sink.erase(LINK, "reject_after")
    assert a.psk_of(b) not in (None, secret.reveal())
    assert not await trio.to_thread.run_sync(kernel_pair.fresh_handshake, 1.5)
    assert a.latest_handshake(b) == 0
    await sink.aclose()


async def test_many_peers_in_one_batch(kernel_pair: Pair, tmp_path: Path) -> None:
    from pyroute2 import WireGuard

    a = kernel_pair.a
    peers = [os.urandom(32) for _ in range(100)]
    with WireGuard() as wg:  # the administrator's side: peers with allowed IPs, no PSK
        for i, peer in enumerate(peers):
            wg.set(
                a.iface,
                peer={
                    "public_key": base64.b64encode(peer).decode(),
                    "allowed_ips": [f"10.216.0.{i + 1}/32"],
                },
            )
    sinks = []
    for i, peer in enumerate(peers):
        sink = make(kernel_pair, tmp_path, backend="netlink")
        sink.name = f"wg{i}"
        sink.peer, sink.peer_text = peer, base64.b64encode(peer).decode()
        sinks.append(sink)
    async with trio.open_nursery() as nursery:
        for sink in sinks:
            nursery.start_soon(sink.prepare)
    secrets = [Secret.random() for _ in sinks]
    async with trio.open_nursery() as nursery:
        for sink, secret in zip(sinks, secrets, strict=True):
            nursery.start_soon(sink.install, LINK, secret, meta(1))
    held = dict(line.split("\t") for line in a.wg("show", a.iface, "preshared-keys").splitlines())
    allowed = dict(line.split("\t") for line in a.wg("show", a.iface, "allowed-ips").splitlines())
    for i, (sink, secret) in enumerate(zip(sinks, secrets, strict=True)):
        assert held[sink.peer_text] == base64.b64encode(secret.reveal()).decode()
        assert allowed[sink.peer_text] == f"10.216.0.{i + 1}/32"
    for sink in sinks:
        await sink.aclose()
