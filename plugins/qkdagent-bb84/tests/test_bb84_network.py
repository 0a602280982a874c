"""The two ends over the network: mutual TLS, framed and authenticated, hostile peers refused.

Both sources run in this process here (real sockets, real clock, worker threads), each with its
own state directory; `test_bb84_processes.py` runs them as two agent processes.
"""

from __future__ import annotations

import base64
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from qkdagent import (
    ComponentEvent,
    ConfigError,
    Key,
    Link,
    Misconfigured,
    PluginContext,
    SourceUnavailable,
    extend_test_pki,
    write_test_pki,
)
from qkdagent.testing import build_component, encrypted_key_copy, running

from qkdagent_bb84 import Bb84Source
from qkdagent_bb84.channel import ALICE, block_key, mac, pack_bits
from qkdagent_bb84.engine import fingerprint, gather
from qkdagent_bb84.frames import (
    KINDS,
    MAX_FRAME,
    BlockStart,
    FrameError,
    body_length,
    encode_block_start,
    encode_frame,
    parse_block_start,
    parse_frame,
)
from qkdagent_bb84.stream import FramedStream
from qkdagent_bb84.tls import TlsFiles, server_context

ALICE_LINK = Link("ab", "alice", "bob", True)
BOB_LINK = Link("ab", "bob", "alice", False)
FAST = {"decoys": False, "block_bits": 4_000, "low_water": 2, "seed": 5, "check_every": 0.05}


def pki_tables(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """alice's and bob's network options (certificates, shared secret), and the secret file."""
    pki = write_test_pki(tmp_path / "pki", ["alice", "bob"])
    secret = tmp_path / "channel.key"
    secret.write_bytes(base64.b64encode(os.urandom(32)))
    secret.chmod(0o600)
    common = {**FAST, "auth_key": {"file": str(secret)}, "timeout": 5, "idle_timeout": 5}

    def tls(name: str) -> dict[str, str]:
        return {"cert": str(pki[name].cert), "key": str(pki[name].key), "ca": str(pki.ca_cert)}

    alice = {**common, "tls": tls("alice"), "peer_name": "bob"}
    bob = {**common, "tls": tls("bob"), "peer_name": "alice", "listen": "127.0.0.1:0"}
    return alice, bob, secret


class Events:
    def __init__(self) -> None:
        self.seen: list[ComponentEvent] = []

    def kinds(self) -> set[str]:
        return {e.kind for e in self.seen}


@asynccontextmanager
async def responder(
    tmp_path: Path, table: dict[str, Any], events: Events | None = None
) -> AsyncIterator[Bb84Source]:
    context = PluginContext("bob", tmp_path / "b", reporter=(events or Events()).seen.append)
    bob = build_component(Bb84Source, table, name="qkd", context=context, links=(BOB_LINK,))
    async with running(bob):
        yield bob


def initiator(tmp_path: Path, table: dict[str, Any], port: int, **kw: Any) -> Bb84Source:
    events: Events = kw.pop("events", Events())
    context = PluginContext("alice", tmp_path / "a", reporter=events.seen.append)
    options = {**table, "connect": f"127.0.0.1:{port}", **kw}
    return build_component(Bb84Source, options, name="qkd", context=context, links=(ALICE_LINK,))


async def wait_for(predicate: Any, what: str, seconds: float = 20) -> None:
    with trio.move_on_after(seconds):
        while not predicate():  # noqa: ASYNC110 - state moved by sockets and worker threads
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def test_keys_cross_the_network_identical_and_once(tmp_path: Path) -> None:
    a_table, b_table, _ = pki_tables(tmp_path)
    async with responder(tmp_path, b_table) as bob:
        alice = initiator(tmp_path, a_table, bob.port)
        async with running(alice):
            for _ in range(5):
                key = await wait_key(alice)
                assert (await bob.key_by_id(BOB_LINK, key.key_id)).value == key.value
            assert bob.store is not None and alice.store is not None
            # the run task keeps Alice's pool above low_water, Bob holds the same pieces
            await wait_for(lambda: alice.store.level() >= 2, "alice's pool to fill")
            exposition = alice.context.metrics.families()
    names = {f.name for f in exposition}
    assert {"qkdagent_bb84_pool_bits", "qkdagent_bb84_blocks", "qkdagent_bb84_qber"} <= names


def metric(source: Bb84Source, name: str) -> float:
    for family in source.context.metrics.families():
        if family.name == name:
            return family.values.get((source.name,), 0.0)
    return 0.0


async def test_a_certificate_of_another_ca_or_naming_someone_else_is_refused(
    tmp_path: Path,
) -> None:
    a_table, b_table, _ = pki_tables(tmp_path)
    other = write_test_pki(tmp_path / "other", ["alice"])
    extend_test_pki(tmp_path / "pki", ["mallory"])  # the right CA, the wrong name
    pki = tmp_path / "pki"
    wrong = (
        {"cert": str(other["alice"].cert), "key": str(other["alice"].key)},
        {"cert": str(pki / "mallory.pem"), "key": str(pki / "mallory.key")},
    )
    for tls, why in zip(wrong, ("TLS handshake failed", "does not name the peer"), strict=True):
        events = Events()
        async with responder(tmp_path, b_table, events) as bob:
            alice = initiator(tmp_path, a_table, bob.port, tls={**a_table["tls"], **tls})
            async with running(alice):
                await wait_for(lambda e=events: "peer_refused" in e.kinds(), "bob to refuse")
                with pytest.raises(SourceUnavailable):
                    await alice.new_key(ALICE_LINK)
            assert bob.store is not None and bob.store.level() == 0
            assert alice.store is not None and alice.store.level() == 0
        assert any(why in e.detail for e in events.seen if e.kind == "peer_refused")


async def raw_client(tmp_path: Path, port: int) -> trio.SSLStream[trio.SocketStream]:
    """A TLS client holding alice's certificate that speaks no protocol of ours."""
    pki = tmp_path / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "alice.pem"), str(pki / "alice.key"))
    return await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx)


async def closed_by_peer(stream: trio.SSLStream[trio.SocketStream]) -> bool:
    """Whether the other end closes the connection (reading past its last frames)."""
    with trio.fail_after(10):
        try:
            while await stream.receive_some(1 << 16):
                pass
        except trio.BrokenResourceError:
            pass
    return True


def block_start(bob: Bb84Source, secret: bytes, block_id: str, *, good_tag: bool = True) -> bytes:
    settings = bob.settings
    det = gather(settings, np.random.default_rng(1))
    start = BlockStart(
        block_id,
        fingerprint(settings, bob.key_size),
        det.pulses,
        det.cls.size,
        pack_bits(det.b_basis),
        pack_bits(det.b_bit),
    )
    payload = encode_block_start(start)
    key = block_key(secret, block_id)
    tag = mac(key, ALICE, 0, "block.start", payload) if good_tag else bytes(32)
    return encode_frame("block.start", payload, tag)


GARBAGE = {
    "oversized header": b"\xff\xff\xff\xff",
    "too short for a tag": b"\x00\x00\x00\x05hello",
    "unknown kind": b"\x00\x00\x00\x21\xee" + bytes(32),
    "message outside a block": encode_frame("sift.match", b"x", bytes(32)),
    "random bytes": bytes(range(256)) * 4,
}


async def test_garbage_from_a_tls_peer_aborts_the_block_and_leaves_the_pool(
    tmp_path: Path,
) -> None:
    _, b_table, secret_file = pki_tables(tmp_path)
    secret = base64.b64decode(secret_file.read_bytes())
    events = Events()
    # a frame cut short is waited for until the deadline: a short one for this test
    async with responder(tmp_path, {**b_table, "timeout": 0.5, "idle_timeout": 0.5}, events) as bob:
        assert bob.store is not None
        pool = bob.store.directory
        for what, data in GARBAGE.items():
            stream = await raw_client(tmp_path, bob.port)
            await stream.send_all(data)
            assert await closed_by_peer(stream), what
        # a block.start with a bad tag, then a genuine one followed by a forged message
        stream = await raw_client(tmp_path, bob.port)
        await stream.send_all(block_start(bob, secret, "0badc0de-1", good_tag=False))
        assert await closed_by_peer(stream)
        assert metric(bob, "qkdagent_bb84_blocks_aborted") == 0
        stream = await raw_client(tmp_path, bob.port)
        await stream.send_all(block_start(bob, secret, "0badc0de-2"))
        await stream.send_all(encode_frame("sift.match", b"\x00" * 64, bytes(32)))
        assert await closed_by_peer(stream)
        await wait_for(lambda: metric(bob, "qkdagent_bb84_blocks_aborted") == 1, "the abort")
        assert bob.store.level() == 0 and not list(pool.glob("*.key*"))
    closes = [e for e in events.seen if e.kind == "connection_closed"]
    assert len(closes) == len(GARBAGE) + 1
    assert any("authentication" in e.detail for e in events.seen if e.kind == "block_aborted")


async def test_a_dropped_connection_aborts_the_block_and_alice_reconnects(tmp_path: Path) -> None:
    a_table, b_table, _ = pki_tables(tmp_path)
    async with responder(tmp_path, b_table) as bob:
        port = bob.port
        alice = initiator(tmp_path, a_table, port, backoff_max=0.2)
        async with running(alice):
            first = await wait_key(alice)
            assert (await bob.key_by_id(BOB_LINK, first.key_id)).value == first.value
        # bob's listener went away with the context; alice keeps trying, then bob is back
    b_again = {**b_table, "listen": f"127.0.0.1:{port}"}
    events = Events()
    alice = initiator(tmp_path, a_table, port, backoff_max=0.2, events=events)
    async with running(alice):
        await wait_for(lambda: "connect_failed" in events.kinds(), "a failed connection")
        async with responder(tmp_path, b_again) as bob:
            key = await wait_key(alice)
            assert (await bob.key_by_id(BOB_LINK, key.key_id)).value == key.value


async def wait_key(alice: Bb84Source) -> Key:
    with trio.fail_after(30):
        while True:
            try:
                return await alice.new_key(ALICE_LINK)
            except SourceUnavailable:
                await trio.sleep(0.05)


def test_options_are_checked(tmp_path: Path) -> None:
    a_table, b_table, _ = pki_tables(tmp_path)
    bad = [
        {**b_table, "connect": "127.0.0.1:1"},
        {**a_table, "connect": "nohost"},
        {**a_table, "connect": "127.0.0.1:0"},
        {**a_table, "connect": "127.0.0.1:\u00b2"},
        {**a_table, "connect": "127.0.0.1:1", "worker_thread": False},
        {**{k: v for k, v in a_table.items() if k != "auth_key"}, "connect": "127.0.0.1:1"},
        {**a_table, "connect": "127.0.0.1:1", "tls": {**a_table["tls"], "ca": "/nonexistent"}},
        {**FAST, "peer_name": "bob"},
    ]
    for table in bad:
        with pytest.raises(ConfigError):
            build_component(Bb84Source, table)


@pytest.mark.parametrize("end", ["alice", "bob"])
async def test_an_unusable_certificate_is_misconfigured_at_start(tmp_path: Path, end: str) -> None:
    """A certificate file that exists (so the config passes) but holds no certificate: the
    source refuses to start, rather than retrying connections (Alice) or failing its listener
    (Bob) with nothing said at start."""
    a_table, b_table, _ = pki_tables(tmp_path)
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    if end == "alice":
        table = {**a_table, "connect": "127.0.0.1:1", "tls": {**a_table["tls"], "cert": str(bad)}}
        link = ALICE_LINK
    else:
        table = {**b_table, "tls": {**b_table["tls"], "cert": str(bad)}}
        link = BOB_LINK
    source = build_component(Bb84Source, table, links=(link,), state_dir=tmp_path / "x")
    with pytest.raises(Misconfigured, match="TLS"):
        async with running(source):
            pass


@pytest.mark.parametrize("end", ["alice", "bob"])
async def test_an_encrypted_key_is_refused_not_prompted_for(tmp_path: Path, end: str) -> None:
    """OpenSSL would ask for the passphrase on the terminal and the agent hang at prepare:
    the source refuses the key instead, naming it."""
    a_table, b_table, _ = pki_tables(tmp_path)
    table, link = (a_table, ALICE_LINK) if end == "alice" else (b_table, BOB_LINK)
    encrypted = encrypted_key_copy(table["tls"]["key"], tmp_path / "encrypted.key")
    table = {**table, "tls": {**table["tls"], "key": str(encrypted)}}
    if end == "alice":
        table["connect"] = "127.0.0.1:1"
    source = build_component(Bb84Source, table, links=(link,), state_dir=tmp_path / "x")
    with pytest.raises(Misconfigured, match=r"key file .*encrypted\.key is encrypted"):
        async with running(source):
            pass


async def test_the_roles_follow_the_link(tmp_path: Path) -> None:
    _, b_table, _ = pki_tables(tmp_path)
    wrong = build_component(Bb84Source, b_table, links=(ALICE_LINK,), state_dir=tmp_path / "x")
    with pytest.raises(Misconfigured, match="responder"):
        async with running(wrong):
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_the_frame_parser_refuses_anything_else_with_frame_error(data: bytes) -> None:
    for parse in (parse_frame, lambda d: parse_block_start(d)):
        try:
            parse(data)
        except FrameError:
            pass


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(KINDS),
    st.binary(max_size=100),
    st.binary(min_size=32, max_size=32),
    st.integers(min_value=0, max_value=200),
)
def test_frames_round_trip_and_a_cut_frame_is_refused(
    kind: str, payload: bytes, tag: bytes, cut: int
) -> None:
    data = encode_frame(kind, payload, tag)
    frame = parse_frame(data)
    assert (frame.kind, frame.payload, frame.tag) == (kind, payload, tag)
    if cut < len(data):
        with pytest.raises(FrameError):
            parse_frame(data[:cut])
    assert body_length(data[:4]) == len(data) - 4
    with pytest.raises(FrameError):
        body_length((MAX_FRAME + 1).to_bytes(4, "big"))


async def test_a_connection_dropped_mid_block_gives_alice_no_key(tmp_path: Path) -> None:
    """A 'Bob' that reads the block's first message and hangs up: the block aborts, nothing
    enters Alice's pool, and she connects again (with backoff)."""
    a_table, _, _ = pki_tables(tmp_path)
    pki = tmp_path / "pki"
    context = server_context(TlsFiles(pki / "bob.pem", pki / "bob.key", pki / "ca.pem"))
    accepted: list[int] = []

    async def hang_up(stream: trio.SSLStream[trio.SocketStream]) -> None:
        accepted.append(1)
        await FramedStream(stream, 5).receive_body()  # block.start
        await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_ssl_over_tcp, host="127.0.0.1")
        listeners = await nursery.start(serve, hang_up, 0, context)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        alice = initiator(tmp_path, a_table, port, backoff_max=0.1)
        async with running(alice):
            await wait_for(lambda: metric(alice, "qkdagent_bb84_blocks_aborted") >= 2, "aborts")
            assert alice.store is not None and alice.store.level() == 0
            assert not list(alice.store.directory.glob("*.key*"))
        nursery.cancel_scope.cancel()
    assert len(accepted) >= 2


async def test_connections_beyond_the_cap_are_closed_at_once(tmp_path: Path) -> None:
    """One connection more than Bob's cap, none doing a TLS handshake: exactly one is closed at
    once, long before the 30 s handshake deadline would free a slot."""
    from qkdagent_bb84.netlink import MAX_CONNECTIONS

    _, b_table, _ = pki_tables(tmp_path)
    async with responder(tmp_path, {**b_table, "timeout": 30}) as bob:
        streams = [
            await trio.open_tcp_stream("127.0.0.1", bob.port) for _ in range(MAX_CONNECTIONS + 1)
        ]
        closed: list[int] = []

        async def watch(index: int) -> None:
            try:
                if await streams[index].receive_some(1) == b"":
                    closed.append(index)
            except trio.BrokenResourceError:
                closed.append(index)

        with trio.move_on_after(5):  # far below the handshake deadline
            async with trio.open_nursery() as nursery:
                for index in range(len(streams)):
                    nursery.start_soon(watch, index)
        for stream in streams:
            await stream.aclose()
    assert len(closed) == 1
