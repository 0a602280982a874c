"""Two real agents rotating through two simulated KMEs (014 over mTLS on both hops)."""

from __future__ import annotations

from pathlib import Path

from qkdagent_etsi014.sim import Simulator
from qkdagent_etsi014.wire import UUID_RE

from qkdagent.testing import open_agent_pair

ROTATIONS = 100


def side(sim: Simulator, sae: str) -> dict:
    return {
        "sources": {"qkd": sim.source_table(sae)},
        "sinks": {"rec": {"type": "recording"}},
        "plugins": ["etsi014", "memory"],
    }


async def test_two_agents_rotate_100_times_with_identical_secrets(
    sim: Simulator, tmp_path: Path
) -> None:
    async with open_agent_pair(
        tmp_path / "agents",
        alice=side(sim, "alice"),
        bob=side(sim, "bob"),
        link={"interval": 0.01, "jitter": 0, "reject_after": 30},
    ) as pair:
        await pair.wait_for_epoch(ROTATIONS, timeout=120)
        await pair.wait_for_installs(ROTATIONS, "rec")
        installs = {
            name: {r.epoch: r for r in pair.sink(name, "rec").installs} for name in ("alice", "bob")
        }
    epochs = range(1, ROTATIONS + 1)
    for epoch in epochs:
        a, b = installs["alice"][epoch], installs["bob"][epoch]
        assert a.fingerprint == b.fingerprint, epoch
        assert a.key_ids == b.key_ids and len(a.key_ids) == 1 and UUID_RE.match(a.key_ids[0])
    assert len({installs["alice"][e].fingerprint for e in epochs}) == ROTATIONS
    assert len({installs["alice"][e].key_ids for e in epochs}) == ROTATIONS
    # every key came from the KMEs: handed to alice at KME_A and to bob at KME_B, none left over
    delivered_a, delivered_b = sim.apps["KME_A"].stats["keys"], sim.apps["KME_B"].stats["keys"]
    assert delivered_a >= ROTATIONS and delivered_b >= ROTATIONS
    assert sim.network.parked_count("KME_B") <= delivered_a - delivered_b
