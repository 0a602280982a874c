"""Real handshakes through wireguard-go in two namespaces, PSKs set by the sink over UAPI."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing
from wg_testbed import Pair, genkey

from qkdagent import KeyMeta, Link, Misconfigured, Secret, SinkError

ALICE = Link("site", "alice", "bob", True)
BOB = Link("site", "bob", "alice", False)


def meta(epoch: int) -> KeyMeta:
    return KeyMeta(epoch, (f"k{epoch}",), "wireguard", time.time())


@contextmanager
def held(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """The daemon stopped (SIGSTOP) for the block: requests wait in its socket, unanswered.

    A stop lands on each thread on its own time; waitpid(WUNTRACED) returns once all have
    stopped, so a thread still running cannot answer a request sent inside the block.
    """
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"the daemon did not stop (wait status {status})"
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


async def handshake(pair: Pair, within: float = 6.0) -> bool:
    return await trio.to_thread.run_sync(pair.fresh_handshake, within)


async def test_each_rotation_gives_a_fresh_working_handshake(userspace_pair, make_sink) -> None:  # type: ignore[no-untyped-def]
    a, b = userspace_pair.a, userspace_pair.b
    alice, bob = make_sink(a, b), make_sink(b, a)
    await alice.prepare()
    await bob.prepare()
    assert not await handshake(userspace_pair, 1.5), "distinct random PSKs must not handshake"
    seen = set()
    for epoch in range(1, 4):
        secret = Secret.random()
        await alice.install(ALICE, secret, meta(epoch))
        await bob.install(BOB, Secret(secret.reveal()), meta(epoch))
        assert a.psk_of(b) == secret.reveal() == b.psk_of(a)
        assert await alice.verify(ALICE, secret, meta(epoch)) is True
        before = a.latest_handshake(b)
        assert await handshake(userspace_pair), f"no handshake after rotation {epoch}"
        assert a.latest_handshake(b) >= max(before, 1)
        seen.add(secret.fingerprint())
    assert len(seen) == 3
    await alice.aclose()
    await bob.aclose()


async def test_mismatched_psk_fails_the_handshake_then_recovers(userspace_pair, make_sink) -> None:  # type: ignore[no-untyped-def]
    a, b = userspace_pair.a, userspace_pair.b
    alice, bob = make_sink(a, b), make_sink(b, a)
    await alice.prepare()
    await bob.prepare()
    await alice.install(ALICE, Secret.random(), meta(1))
    await bob.install(BOB, Secret.random(), meta(1))
    assert not await handshake(userspace_pair, 2.0)
    assert a.latest_handshake(b) == 0
    assert a.log is not None and "Received invalid response message" in a.log.read_text()
    secret = Secret.random()
    await bob.install(BOB, secret, meta(2))
    await alice.install(ALICE, Secret(secret.reveal()), meta(2))
    assert await handshake(userspace_pair)


async def test_erase_fails_closed(userspace_pair, make_sink) -> None:  # type: ignore[no-untyped-def]
    a, b = userspace_pair.a, userspace_pair.b
    alice, bob = make_sink(a, b), make_sink(b, a)
    await alice.prepare()
    await bob.prepare()
    secret = Secret.random()
    await alice.install(ALICE, secret, meta(1))
    await bob.install(BOB, Secret(secret.reveal()), meta(1))
    assert await handshake(userspace_pair)
    await alice.erase(ALICE, "reject_after")
    held = a.psk_of(b)
    assert held is not None and any(held), "erase must never leave no PSK"
    assert held != secret.reveal()
    assert await alice.verify(ALICE, secret, meta(1)) is False
    assert not await handshake(userspace_pair, 2.0)


async def test_psk_only_update_keeps_allowed_ips_endpoint_and_other_peers(
    userspace_pair, make_sink
) -> None:  # type: ignore[no-untyped-def]
    a, b = userspace_pair.a, userspace_pair.b
    _, third = genkey()
    third_psk = os.urandom(32)
    pskfile = userspace_pair.workdir / "third"
    fd = os.open(pskfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, base64.b64encode(third_psk) + b"\n")
    os.close(fd)
    third_text = base64.b64encode(third).decode()
    a.wg(
        "set",
        a.iface,
        "peer",
        third_text,
        "allowed-ips",
        "10.215.0.9/32",
        "preshared-key",
        str(pskfile),
    )
    dump_before = a.wg("show", a.iface, "dump").splitlines()
    alice = make_sink(a, b)
    await alice.prepare()
    secret = Secret.random()
    await alice.install(ALICE, secret, meta(1))
    dump_after = a.wg("show", a.iface, "dump").splitlines()
    assert a.allowed_ips(b) == f"{b.tunnel}/32"
    fields_before = {line.split("\t")[0]: line.split("\t") for line in dump_before[1:]}
    fields_after = {line.split("\t")[0]: line.split("\t") for line in dump_after[1:]}
    assert set(fields_before) == set(fields_after) == {b.public_text, third_text}
    # columns: public key, psk, endpoint, allowed ips, handshake, rx, tx, keepalive
    for column in (2, 3, 7):
        assert fields_before[b.public_text][column] == fields_after[b.public_text][column]
    assert fields_after[third_text] == fields_before[third_text]
    assert a.psk_of(b) == secret.reveal()
    await alice.aclose()


@pytest.mark.parametrize("bad", [bytes(32), os.urandom(31), os.urandom(33), b""])
async def test_zero_and_wrong_length_keys_are_refused(userspace_pair, make_sink, bad) -> None:  # type: ignore[no-untyped-def]
    a, b = userspace_pair.a, userspace_pair.b
    alice = make_sink(a, b)
    await alice.prepare()
    before = a.psk_of(b)
    with pytest.raises(SinkError, match=r"exactly 32|all-zero"):
        await alice.install(ALICE, Secret(bad), meta(1))
    assert a.psk_of(b) == before
    await alice.aclose()


async def test_missing_peer_or_interface_is_a_clear_error(userspace_pair, make_sink) -> None:  # type: ignore[no-untyped-def]
    a, b = userspace_pair.a, userspace_pair.b
    _, stranger = genkey()
    ghost = make_sink(a, b)
    ghost.peer = stranger
    ghost.peer_text = base64.b64encode(stranger).decode()
    with pytest.raises(Misconfigured, match="has no peer"):
        await ghost.prepare()
    for backend in ("uapi", "auto"):
        nowhere = make_sink(a, b, backend=backend)
        nowhere.interface = "wqnone" + os.urandom(3).hex()
        with pytest.raises(Misconfigured, match="control socket"):
            await nowhere.prepare()
    # A peer removed after start-up: install reports it instead of silently doing nothing,
    # and never re-creates the peer.
    alice = make_sink(a, b)
    await alice.prepare()
    a.wg("set", a.iface, "peer", b.public_text, "remove")
    with pytest.raises(SinkError, match="has no peer"):
        await alice.install(ALICE, Secret.random(), meta(1))
    with pytest.raises(SinkError, match="has no peer"):
        await alice.verify(ALICE, Secret.random(), meta(1))
    assert b.public_text not in a.wg("show", a.iface, "peers")
    await alice.aclose()


async def test_userspace_daemon_gone_is_a_sink_error(userspace_pair, make_sink) -> None:  # type: ignore[no-untyped-def]
    a, b = userspace_pair.a, userspace_pair.b
    alice = make_sink(a, b)
    await alice.prepare()
    assert a.proc is not None
    a.proc.terminate()
    a.proc.wait(5)
    with pytest.raises(SinkError, match=r"control socket|connect"):
        await alice.install(ALICE, Secret.random(), meta(1))
    await alice.aclose()


async def test_many_peers_on_one_interface_are_coalesced(userspace_pair, make_sink) -> None:  # type: ignore[no-untyped-def]
    """300 installs at once cost at most two device round trips.

    The device is held (wireguard-go stopped) while the installs start, so the first batch is
    in flight when every other install queues: coalescing is shown whatever the scheduler does
    (on a loaded machine a quick device used to answer before the others had queued).
    """
    a = userspace_pair.a
    peers = [os.urandom(32) for _ in range(300)]
    request = (
        b"set=1\n"
        + b"".join(
            b"public_key=%s\nallowed_ip=10.216.%d.%d/32\n"
            % (p.hex().encode(), i // 250, i % 250 + 1)
            for i, p in enumerate(peers)
        )
        + b"\n"
    )
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(f"/run/wireguard/{a.iface}.sock")
        sock.sendall(request)
        assert sock.recv(100) == b"errno=0\n\n"
    sinks = []
    for i, peer in enumerate(peers):
        sink = make_sink(a, userspace_pair.b, name=f"wg{i}")
        sink.peer, sink.peer_text = peer, base64.b64encode(peer).decode()
        sinks.append(sink)
    async with trio.open_nursery() as nursery:
        for sink in sinks:
            nursery.start_soon(sink.prepare)
    secrets = [Secret.random() for _ in sinks]
    shared = sinks[0]._shared
    assert shared is not None and a.proc is not None
    batcher = shared.batcher(a.iface)
    batches_before = batcher.batches
    async with trio.open_nursery() as nursery:
        with held(a.proc):
            for sink, secret in zip(sinks, secrets, strict=True):
                nursery.start_soon(sink.install, ALICE, secret, meta(1))
            # every install is now in the one batch at the device or queued behind it
            await trio.testing.wait_all_tasks_blocked()
            assert batcher.batches - batches_before == 1
    batches = batcher.batches - batches_before
    assert batches <= 2, batches
    held_psks = {}
    for line in a.wg("show", a.iface, "preshared-keys").splitlines():
        pub, _, psk = line.partition("\t")
        held_psks[pub] = psk
    for sink, secret in zip(sinks, secrets, strict=True):
        assert held_psks[sink.peer_text] == base64.b64encode(secret.reveal()).decode()
    for sink in sinks:
        await sink.aclose()
