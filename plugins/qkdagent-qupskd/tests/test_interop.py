"""One qkdagent against a quPSKd daemon (tests/qupskd_peer.py, written from REFERENCE §11),
under trio's virtual clock on an in-memory network: both roles, 50 rotations each with the same
PSK on both sides, quPSKd's 180 s expiry and the /new resync, and a restart that continues the
chain from the committed state."""

from __future__ import annotations

import base64
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import trio
import trio.testing

from qkdagent.testing import AgentPair, MemoryPool, open_agent_pair

from .memnet import MemoryNetwork
from .qupskd_peer import Peer

ALICE = ("127.0.0.1", 5555)
BOB = ("127.0.0.1", 5556)
PSK_TEXT = "thisisverysecret"


def pool_name(tmp_path: Path) -> str:
    return f"qupskd-{tmp_path.name}"


def bob_peer(tmp_path: Path, memnet: MemoryNetwork, **options: Any) -> Peer:
    """quPSKd's bob, its fake KME paired with alice's `memory` source (no threads, so the
    virtual clock jumps only when everything waits)."""
    shared = MemoryPool.named(pool_name(tmp_path)).keys
    return Peer(bob_config(), memnet, psk_file=tmp_path / "bob.key", shared=shared, **options)


def bob_config() -> dict[str, Any]:
    """quPSKd's example bob (REFERENCE §11, the seed's example configs), on the test network."""
    return {
        "qupskd_bind": BOB[0],
        "qupskd_port": BOB[1],
        "enable_fake_qkd_api": True,
        "etsi_url": f"http://{BOB[0]}:{BOB[1]}",
        "remote_qupskd_url": f"http://{ALICE[0]}:{ALICE[1]}",
        "alias": "bob",
        "psk": PSK_TEXT,
        "source_KME_ID": "hsn_bob",
        "target_KME_ID": "hsn_alice",
        "master_SAE_ID": "sae_bob",
        "remote_SAE_ID": "sae_alice",
    }


def alice_side(tmp_path: Path, **link: Any) -> dict[str, Any]:
    psk = tmp_path / "qupskd-psk"
    psk.write_text(PSK_TEXT)
    psk.chmod(0o600)
    return {
        "sources": {"kme": {"type": "memory", "pool": pool_name(tmp_path)}},
        "sinks": {"psk": {"type": "recording"}},
        "link": {
            "protocol": "qupskd",
            "insecure": True,
            "listen": f"{ALICE[0]}:{ALICE[1]}",
            "peer_url": f"http://{BOB[0]}:{BOB[1]}",
            "psk": {"file": str(psk)},
            **link,
        },
        "plugins": ["qupskd", "memory"],
    }


def alice_pair(tmp_path: Path) -> AbstractAsyncContextManager[AgentPair]:
    """Alice's agent (not started) in process: the test kit's local network, no threads."""
    return open_agent_pair(tmp_path, alice=alice_side(tmp_path), start=False, local=True)


async def start_alice(pair: AgentPair) -> None:
    """pair_configs drops any peer_url of a non-native link (core gap, see README): put ours
    back before starting."""
    pair.configs["alice"]["links"]["alice-bob"]["peer_url"] = f"http://{BOB[0]}:{BOB[1]}"
    await pair.start("alice")


async def until(predicate: Callable[[], bool], within: float = 1000, poll: float = 5) -> None:
    """Bounded polling in virtual seconds (each idle poll costs the clock's 5 ms threshold)."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(poll)


def agent_psk(pair: AgentPair) -> bytes:
    """What a `file` sink with format = "base64" writes: 44 characters, no newline."""
    return base64.b64encode(pair.secret("alice", "psk").reveal())


def protocol(pair: AgentPair) -> Any:
    return pair.alice.describe()["links"][0]


async def _compare_rotations(pair: AgentPair, peer: Peer, count: int) -> None:
    start_peer, start_agent = peer.rotations, pair.epoch("alice")
    for step in range(1, count + 1):
        await until(
            lambda s=step: min(peer.rotations - start_peer, pair.epoch("alice") - start_agent) >= s
        )
        assert peer.psk_file is not None
        written = peer.psk_file.read_bytes()
        assert len(written) == 44 and written == agent_psk(pair), (
            f"rotation {step} differs: {peer.history} {peer.key} {peer.key_id} {peer.initial()}"
        )


async def test_qkdagent_as_caller_50_rotations_identical_psks(
    tmp_path: Path, memnet: MemoryNetwork, clock: trio.testing.MockClock
) -> None:
    peer = bob_peer(tmp_path, memnet, client_enabled=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        async with alice_pair(tmp_path) as pair:
            await start_alice(pair)
            began = trio.current_time()
            await _compare_rotations(pair, peer, 50)
            # the first call was /new (no state), then /rotate every initiator_wait (120 s)
            calls = peer.peer_calls()
            assert calls[:3] == ["/new", "/ack", "/rotate"]
            assert calls.count("/new") == 1 and calls.count("/ack") == 50
            assert 49 * 120 <= trio.current_time() - began < 49 * 120 + 300
            status = protocol(pair)
            assert status["insecure"] is True and status["protocol"] == "qupskd"
            assert status["qupskd_last_role"] == "caller" and status["qupskd_called"] == 50
            assert peer.errors == []
        nursery.cancel_scope.cancel()


async def test_qkdagent_as_receiver_50_rotations_identical_psks(
    tmp_path: Path, memnet: MemoryNetwork, clock: trio.testing.MockClock
) -> None:
    peer = bob_peer(tmp_path, memnet)
    memnet.down.add(BOB)  # the agent's own /new attempts fail until quPSKd is up
    async with alice_pair(tmp_path) as pair:
        await start_alice(pair)
        await trio.sleep(20)
        assert pair.epoch("alice") == 0 and protocol(pair)["qupskd_failed"] >= 3
        memnet.down.clear()
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.run)  # quPSKd calls /new at once, then every 120 s
            await _compare_rotations(pair, peer, 50)
            status = protocol(pair)
            assert status["qupskd_last_role"] == "receiver" and status["qupskd_served"] == 50
            assert status["qupskd_called"] == 0  # the caller keeps calling; 130 s never elapse
            assert peer.peer_calls() == [] and peer.errors == []
            nursery.cancel_scope.cancel()


async def test_max_wait_expiry_sets_a_random_psk_then_new_resynchronises(
    tmp_path: Path, memnet: MemoryNetwork, clock: trio.testing.MockClock
) -> None:
    peer = bob_peer(tmp_path, memnet)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        async with alice_pair(tmp_path) as pair:
            await start_alice(pair)
            await until(lambda: peer.rotations >= 3 and pair.epoch("alice") >= 3)
            await until(lambda: peer.psk_file.read_bytes() == agent_psk(pair))  # type: ignore[union-attr]
            sink = pair.sink("alice", "psk")
            erasures = len(sink.erasures)
            # a partition: neither side reaches the other for longer than max_wait
            memnet.down.update({ALICE, BOB})
            cut = trio.current_time()
            await until(lambda: len(sink.erasures) > erasures)
            assert 180 <= trio.current_time() - cut <= 181 + 130
            await until(lambda: protocol(pair)["qupskd_expired"] >= 1)
            assert protocol(pair)["qupskd_synced"] is False
            await until(lambda: peer.history[-1] not in peer.history[:-1] and peer.rotations > 3)
            rotations, epoch = peer.rotations, pair.epoch("alice")
            memnet.down.clear()
            # the agent resynchronises with /new: both back on one chain from psk0
            await until(lambda: pair.epoch("alice") > epoch and protocol(pair)["qupskd_synced"])
            await until(lambda: peer.psk_file.read_bytes() == agent_psk(pair))  # type: ignore[union-attr]
            assert "/new" in peer.peer_calls()[-4:]
            await _compare_rotations(pair, peer, 3)
            assert peer.rotations > rotations
        nursery.cancel_scope.cancel()


async def test_a_restart_continues_the_chain_from_the_committed_state(
    tmp_path: Path, memnet: MemoryNetwork, clock: trio.testing.MockClock
) -> None:
    peer = bob_peer(tmp_path, memnet, client_enabled=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        async with alice_pair(tmp_path) as pair:
            await start_alice(pair)
            await _compare_rotations(pair, peer, 2)
            await pair.stop("alice")
            await start_alice(pair)
            assert protocol(pair)["qupskd_synced"] is True
            await _compare_rotations(pair, peer, 2)
            assert peer.peer_calls().count("/new") == 1  # /rotate after the restart, not /new
        nursery.cancel_scope.cancel()
