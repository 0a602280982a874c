"""Two real agents rotating wireguard-go PSKs end to end, their keys from two simulated ETSI
GS QKD 014 KMEs (`qkdagent_etsi014.sim`, HTTPS with mutual TLS on every hop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from qkdagent_etsi014.sim import Simulator, open_kme_pair
from wg_testbed import Node, Pair

from qkdagent.testing import open_agent_pair


async def held(pair: Pair) -> tuple[bytes | None, bytes | None]:
    a, b = pair.a, pair.b
    assert a is not None and b is not None
    return (await trio.to_thread.run_sync(a.psk_of, b), await trio.to_thread.run_sync(b.psk_of, a))


def side(sim: Simulator, sae: str, node: Node, peer: Node) -> dict[str, Any]:
    """One agent's config: keys from its KME as SAE `sae`, the PSK of `peer` on `node`."""
    sink = {"type": "wireguard", "interface": node.iface, "peer_public_key": peer.public_text}
    return {
        "plugins": ["etsi014", "wireguard"],
        "sources": {"qkd": sim.source_table(sae)},
        "sinks": {"wg": {**sink, "backend": "uapi"}},
    }


async def test_two_agents_rotate_psks_and_fail_closed(userspace_pair: Pair, tmp_path: Path) -> None:
    a, b = userspace_pair.a, userspace_pair.b
    assert a is not None and b is not None
    async with (
        open_kme_pair(tmp_path / "kme") as sim,
        open_agent_pair(
            tmp_path / "agents",
            alice=side(sim, "alice", a, b),
            bob=side(sim, "bob", b, a),
            link={"interval": 3, "reject_after": 6},
        ) as agents,
    ):
        assert agents.sink("alice", "wg").resolved == "uapi"
        fingerprints = set()
        for epoch in (1, 2, 3):
            await agents.wait_for_epoch(epoch, timeout=20)
            # Both agents installed the secret they derived, and it is the same one.
            with trio.fail_after(10):
                while True:
                    secret = agents.secret("alice", "wg")
                    if secret == agents.secret("bob", "wg") and await held(userspace_pair) == (
                        secret.reveal(),
                        secret.reveal(),
                    ):
                        break
                    await trio.sleep(0.05)
            fingerprints.add(secret.fingerprint())
            assert await trio.to_thread.run_sync(userspace_pair.fresh_handshake, 6.0)
        assert len(fingerprints) == 3
        # the keys came from the KMEs: alice fetched at KME_A, bob by key ID at KME_B
        assert sim.apps["KME_A"].stats["keys"] >= 3 and sim.apps["KME_B"].stats["keys"] >= 3
        await agents.stop("bob")
        # A rotation of alice's under way as bob stopped may still commit and install (his
        # drain took its rotate): her link's lock is held until it ends.
        async with agents.alice.link("alice-bob").lock:
            last = agents.secret("alice", "wg").reveal()
            assert (await held(userspace_pair))[0] == last
        # reject_after (6 s) with the peer gone: alice replaces the PSK by a random one.
        with trio.fail_after(20):
            while True:
                if (await held(userspace_pair))[0] != last:
                    break
                await trio.sleep(0.1)
        alice_psk = (await held(userspace_pair))[0]
        assert alice_psk is not None and any(alice_psk) and alice_psk != last
        assert agents.alice.link("alice-bob").status.erased_reason == "reject_after"
        assert not await trio.to_thread.run_sync(userspace_pair.fresh_handshake, 2.0)
        assert a.latest_handshake(b) == 0
