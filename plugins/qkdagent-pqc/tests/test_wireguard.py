"""Two real agents rotating wireguard-go PSKs with the `mlkem` source: a pqc-only link (a
post-quantum PSK rotator, Rosenpass's job) and a hybrid link with keys from two simulated
ETSI GS QKD 014 KMEs beside ML-KEM. Each epoch's PSK is in both wireguard-go daemons and a
fresh handshake succeeds with it.

Needs root, wireguard-go, wg, ip and ping (the wireguard plugin's test bed: two namespaces).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from qkdagent_etsi014.sim import open_kme_pair

from qkdagent.testing import open_agent_pair, require_binary, require_root

from .conftest import StaticKeys

# the wireguard plugin's throw-away topology (namespaces, wireguard-go), beside its tests
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "qkdagent-wireguard" / "tests"))
from wg_testbed import Node, Pair

EPOCHS = 3


@pytest.fixture
def wg_pair(tmp_path: Path) -> Iterator[Pair]:
    require_root()
    require_binary("wireguard-go", "wg", "ip", "ping")
    pair = Pair(tmp_path / "wg")
    try:
        pair.open(os.urandom(32), os.urandom(32))
        yield pair
    finally:
        pair.close()


@contextlib.asynccontextmanager
async def _kme(directory: Path, hybrid: bool) -> AsyncIterator[Any]:
    if not hybrid:
        yield None
        return
    async with open_kme_pair(directory) as sim:
        yield sim


def _side(keys: StaticKeys, name: str, node: Node, peer: Node, sim: Any) -> dict[str, Any]:
    sources: dict[str, Any] = {"kme": sim.source_table(name)} if sim is not None else {}
    sources["pqc"] = keys.table(name)
    sink = {"type": "wireguard", "interface": node.iface, "peer_public_key": peer.public_text}
    return {
        "plugins": ["pqc", "wireguard", *(["etsi014"] if sim is not None else [])],
        "sources": sources,
        "sinks": {"wg": {**sink, "backend": "uapi"}},
    }


async def _held(pair: Pair) -> tuple[bytes | None, bytes | None]:
    a, b = pair.a, pair.b
    assert a is not None and b is not None
    return (await trio.to_thread.run_sync(a.psk_of, b), await trio.to_thread.run_sync(b.psk_of, a))


@pytest.mark.parametrize("hybrid", [False, True], ids=["pqc-only", "etsi014+pqc"])
async def test_wireguard_go_handshakes_with_every_pqc_psk(
    wg_pair: Pair, tmp_path: Path, static_keys: StaticKeys, hybrid: bool
) -> None:
    a, b = wg_pair.a, wg_pair.b
    assert a is not None and b is not None
    async with (
        _kme(tmp_path / "kme", hybrid) as sim,
        open_agent_pair(
            tmp_path / "agents",
            alice=_side(static_keys, "alice", a, b, sim),
            bob=_side(static_keys, "bob", b, a, sim),
            link={"interval": 1, "reject_after": 30, "jitter": 0},
        ) as agents,
    ):
        seen = set()
        for epoch in range(1, EPOCHS + 1):
            await agents.wait_for_epoch(epoch, timeout=30)
            with trio.fail_after(10):  # both sides install right after they commit
                while True:
                    secret = agents.secret("alice", "wg")
                    if secret == agents.secret("bob", "wg") and await _held(wg_pair) == (
                        secret.reveal(),
                        secret.reveal(),
                    ):
                        break
                    await trio.sleep(0.05)
            seen.add(secret.fingerprint())
            assert await trio.to_thread.run_sync(wg_pair.fresh_handshake, 6.0)
        assert len(seen) == EPOCHS
        record = agents.alice.link("alice-bob").record
        assert set(record.source_state) == {"pqc"}  # the chain ran (a public key is kept)
        if sim is not None:  # the QKD keys came from the KMEs
            assert sim.apps["KME_A"].stats["keys"] >= EPOCHS
    # a PSK the agents never installed does not handshake (the check above can fail)
    a.set_psk(b, os.urandom(32), wg_pair.workdir)
    assert not await trio.to_thread.run_sync(wg_pair.fresh_handshake, 2.0)


ROTATIONS = 100


@pytest.mark.parametrize("hybrid", [False, True], ids=["pqc-only", "etsi014+pqc"])
async def test_a_hundred_rotations_into_wireguard_go(
    wg_pair: Pair, tmp_path: Path, static_keys: StaticKeys, hybrid: bool
) -> None:
    """100 epochs installed into both wireguard-go daemons without one failed install, every
    epoch's secrets identical on both sides (a recording sink beside WireGuard shows each one),
    and the last PSK held by both daemons and good for a handshake."""
    a, b = wg_pair.a, wg_pair.b
    assert a is not None and b is not None
    sides = {}
    for name, node, peer in (("alice", a, b), ("bob", b, a)):
        side = _side(static_keys, name, node, peer, None)
        side["sinks"]["rec"] = {"type": "recording"}
        side["plugins"].append("memory")  # the test kit's recording sink
        sides[name] = side
    async with _kme(tmp_path / "kme", hybrid) as sim:
        if sim is not None:
            for name in sides:
                sides[name]["plugins"].append("etsi014")
                sides[name]["sources"] = {"kme": sim.source_table(name), **sides[name]["sources"]}
        link = {"interval": 0.05, "reject_after": 30, "jitter": 0}
        async with open_agent_pair(
            tmp_path / "agents", alice=sides["alice"], bob=sides["bob"], link=link
        ) as agents:
            await agents.wait_for_epoch(ROTATIONS, timeout=120)
            await agents.stop("alice")  # no more rotations: the daemons keep the last PSK
            last = agents.alice.link("alice-bob").record.epoch
            with trio.fail_after(10):  # bob installs once alice's commit reaches him
                while agents.bob.link("alice-bob").record.epoch < last:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            # bob acknowledges the commit once durable and installs after: wait for his sinks
            await agents.wait_for_installs(last, "rec", timeout=10)
            secret = agents.secret("alice", "wg")
            assert secret == agents.secret("bob", "wg")
            with trio.fail_after(10):  # the wg sink installs beside "rec", not before it
                while await _held(wg_pair) != (secret.reveal(), secret.reveal()):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            for name in ("alice", "bob"):
                installs = agents.agents[name].metrics.installs
                assert installs.labels("alice-bob", "wg", "error").get() == 0
                assert installs.labels("alice-bob", "wg", "ok").get() >= ROTATIONS
            alice_rec = agents.sink("alice", "rec").installs
            bob_rec = agents.sink("bob", "rec").installs
            by_epoch = {r.epoch: r.fingerprint for r in bob_rec}
            assert len({r.epoch for r in alice_rec}) >= ROTATIONS
            assert all(by_epoch.get(r.epoch) == r.fingerprint for r in alice_rec)
            assert len({r.fingerprint for r in alice_rec}) == len(alice_rec)  # all distinct
    assert await trio.to_thread.run_sync(wg_pair.fresh_handshake, 6.0)
