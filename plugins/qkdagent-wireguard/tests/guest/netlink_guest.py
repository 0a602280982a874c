"""Kernel WireGuard through netlink. Runs inside the QEMU guest (see test_kernel.py), where the
Debian kernel has the wireguard module; the file name keeps the host's pytest from collecting it.

Side a of each pair lives in the test's own namespace so the in-process netlink sink reaches it;
side b lives in a namespace of its own and is configured with `wg` as the peer's agent would.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from qkdagent_wireguard import genl
from qkdagent_wireguard.auto import Kernel, probe_kernel
from qkdagent_wireguard.backend import BackendError, Op
from qkdagent_wireguard.broker import BrokerBackend
from qkdagent_wireguard.drive import drive_blocking
from qkdagent_wireguard.sink import WireGuardSink
from wg_testbed import Node, Pair, genkey

from qkdagent import KeyMeta, Link, Misconfigured, PluginContext, Secret, SinkError
from qkdagent.testing import SinkContract, build_component, require_binary, require_root

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


def make(
    pair: Pair,
    tmp_path: Path,
    name: str = "wg",
    links: tuple[Link, ...] = (),
    context: PluginContext | None = None,
    **options: object,
) -> WireGuardSink:
    """Agent "guest"'s sink for a's peer b (override with options); sinks given one `context`
    belong to one agent and share its backends."""
    assert pair.a is not None and pair.b is not None
    table = {"interface": pair.a.iface, "peer_public_key": pair.b.public_text, **options}
    if context is None:
        context = PluginContext("guest", tmp_path)
    return build_component(WireGuardSink, table, name=name, links=links, context=context)


class TestNetlinkSinkContract(SinkContract):
    @pytest.fixture
    def read_back(self, kernel_pair: Pair):  # type: ignore[no-untyped-def]
        a, b = kernel_pair.a, kernel_pair.b

        async def read(link: Link) -> bytes | None:
            return await trio.to_thread.run_sync(a.psk_of, b)

        return read

    library = "builtin"

    @pytest.fixture
    def unprepared_sink(self, kernel_pair: Pair, tmp_path: Path, link: Link) -> WireGuardSink:
        return make(
            kernel_pair, tmp_path, links=(link,), backend="netlink", netlink_library=self.library
        )


class TestPyroute2SinkContract(TestNetlinkSinkContract):
    library = "pyroute2"


def stale_socket(directory: Path, interface: str) -> Path:
    """A control socket file for `interface` that nobody listens on (as a dead wireguard-go,
    or one in another namespace sharing /run/wireguard, would leave)."""
    directory.mkdir(exist_ok=True)
    path = directory / f"{interface}.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


async def test_auto_picks_netlink_for_a_kernel_interface(kernel_pair: Pair, tmp_path: Path) -> None:
    uapi_dir = tmp_path / "uapi"
    stale_socket(uapi_dir, kernel_pair.a.iface)  # the kernel is asked first: never used
    sink = make(kernel_pair, tmp_path, uapi_dir=str(uapi_dir))
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
    stranger_text = base64.b64encode(stranger).decode()
    ghost = make(kernel_pair, tmp_path, backend="netlink", peer_public_key=stranger_text)
    with pytest.raises(Misconfigured, match="has no peer"):
        await ghost.prepare()
    nowhere = make(kernel_pair, tmp_path, backend="netlink", interface="wqnone0")
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
    agent = PluginContext("guest", tmp_path)  # one agent: its sinks share one netlink backend
    sinks = [
        make(
            kernel_pair,
            tmp_path,
            name=f"wg{i}",
            context=agent,
            backend="netlink",
            peer_public_key=base64.b64encode(peer).decode(),
        )
        for i, peer in enumerate(peers)
    ]
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


def test_probe_tells_a_non_wireguard_interface_from_a_kernel_one(kernel_pair: Pair) -> None:
    a = kernel_pair.a
    veth = drive_blocking(probe_kernel(a.veth), 5, "probe")
    assert veth == (Kernel.ABSENT, "netlink: EOPNOTSUPP, not a WireGuard device")
    assert drive_blocking(probe_kernel(a.iface), 5, "probe")[0] is Kernel.DEVICE


SPLIT_IPS = 900
"""IPv6 /128s of one peer: ~36 KB of attributes, more than one dump message holds (<= 32 KiB)."""


def dump_parts(interface: str, public: bytes, library: str) -> int:
    """How many messages of a GET_DEVICE dump carry a part of peer `public`."""
    if library == "pyroute2":
        from pyroute2 import WireGuard

        text = base64.b64encode(public)
        with WireGuard() as wg:
            return sum(
                any(
                    p.get_attr("WGPEER_A_PUBLIC_KEY") == text
                    for p in m.get_attr("WGDEVICE_A_PEERS") or ()
                )
                for m in wg.info(interface)
            )
    client = genl.GenlWireGuard()
    try:
        drive_blocking(client.open(), 5, "netlink")
        assert client.family is not None
        get = genl.nla(genl.WGDEVICE_A_IFNAME, interface.encode() + b"\x00")
        request = (client.family, genl.WG_CMD_GET_DEVICE, get, genl.NLM_F_DUMP)
        (payloads,) = drive_blocking(client.transact([request]), 5, "netlink")
    finally:
        client.close()
    parts = 0
    for payload in payloads:
        for kind, value in genl.iter_nlas(payload):
            if kind == genl.WGDEVICE_A_PEERS:
                for _, peer in genl.iter_nlas(value):
                    fields = dict(genl.iter_nlas(peer))
                    parts += bytes(fields[genl.WGPEER_A_PUBLIC_KEY]) == public
    return parts


@pytest.mark.parametrize("library", ["builtin", "pyroute2"])
async def test_peer_split_across_dump_messages_keeps_its_psk(
    kernel_pair: Pair, tmp_path: Path, library: str
) -> None:
    a, b = kernel_pair.a, kernel_pair.b
    ips = [f"{b.tunnel}/32"] + [f"fd00:215::{i:x}/128" for i in range(1, SPLIT_IPS + 1)]
    a.wg("set", a.iface, "peer", b.public_text, "allowed-ips", ",".join(ips))
    parts = await trio.to_thread.run_sync(dump_parts, a.iface, b.public, library)
    assert parts >= 2, "the kernel did not split the peer: the test proves nothing"
    sink = make(kernel_pair, tmp_path, backend="netlink", netlink_library=library)
    await sink.prepare()
    for epoch in (1, 2):
        secret = Secret.random()
        await sink.install(LINK, secret, meta(epoch))  # read back through the split dump
        assert await sink.verify(LINK, secret, meta(epoch)) is True
        assert a.psk_of(b) == secret.reveal()
    assert await sink.verify(LINK, Secret.random(), meta(3)) is False
    assert len(a.allowed_ips(b).split()) == SPLIT_IPS + 1
    await sink.aclose()


@pytest.mark.parametrize("backend", ["netlink", "auto"])
async def test_broker_over_kernel_netlink(
    kernel_pair: Pair,
    tmp_path: Path,
    broker_factory,
    backend: str,  # type: ignore[no-untyped-def]
) -> None:
    a, b = kernel_pair.a, kernel_pair.b
    _, third = genkey()
    third_text = base64.b64encode(third).decode()
    a.wg("set", a.iface, "peer", third_text, "allowed-ips", "10.215.0.9/32")
    uapi_dir = tmp_path / "uapi"
    stale_socket(uapi_dir, a.iface)  # `auto` must still pick netlink
    args = ["--allow", f"{a.iface}:{b.public_text}", "--backend", backend]
    args += ["--uapi-dir", str(uapi_dir)]
    sock = await trio.to_thread.run_sync(lambda: broker_factory(*args, timeout=90))
    sink = make(kernel_pair, tmp_path, backend="broker", broker_socket=str(sock))
    await sink.prepare()
    secret = Secret.random()
    await sink.install(LINK, secret, meta(1))
    assert a.psk_of(b) == secret.reveal()
    assert await sink.verify(LINK, secret, meta(1)) is True
    # a peer of the same interface that is not on the allow list: refused, left alone
    key = os.urandom(32)
    with pytest.raises(BackendError, match="allow list"):
        await trio.to_thread.run_sync(
            drive_blocking, BrokerBackend(sock).exchange(a.iface, [Op(third, key, True)]), 10, "b"
        )
    held = dict(line.split("\t") for line in a.wg("show", a.iface, "preshared-keys").splitlines())
    assert held[third_text] == "(none)"
    await sink.aclose()
    log = (sock.parent / "broker-0.log").read_text()
    assert "allow list" in log and secret.reveal().hex() not in log and key.hex() not in log
