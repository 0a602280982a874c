"""Two real agents rotating through two simulated QKD modules (004 over mTLS), per dialect."""

from __future__ import annotations

from pathlib import Path

from qkdagent_etsi004 import codec
from qkdagent_etsi004.sim import SimSettings, Simulator, open_simulator

from qkdagent.testing import open_agent_pair

from .conftest import MODULES

ROTATIONS = 100


def side(sim: Simulator, app: str, transport: str) -> dict:
    return {
        "sources": {"qkd": sim.source_table(app, transport=transport)},
        "sinks": {"rec": {"type": "recording"}},
        "plugins": ["etsi004", "memory"],
    }


async def test_two_agents_rotate_100_times_with_identical_secrets(
    sim: Simulator, tmp_path: Path, transport: str
) -> None:
    async with open_agent_pair(
        tmp_path / "agents",
        alice=side(sim, "alice", transport),
        bob=side(sim, "bob", transport),
        link={"interval": 0.01, "jitter": 0, "reject_after": 30},
    ) as pair:
        await pair.wait_for_epoch(ROTATIONS, timeout=120)
        await pair.wait_for_installs(ROTATIONS, "rec")
        installs = {
            name: {r.epoch: r for r in pair.sink(name, "rec").installs} for name in ("alice", "bob")
        }
    epochs = range(1, ROTATIONS + 1)
    ksids = set()
    for epoch in epochs:
        a, b = installs["alice"][epoch], installs["bob"][epoch]
        assert a.fingerprint == b.fingerprint, epoch
        assert a.key_ids == b.key_ids and len(a.key_ids) == 1
        parsed = codec.parse_key_id(a.key_ids[0])
        assert parsed is not None
        ksids.add(parsed[0])
    assert len({installs["alice"][e].fingerprint for e in epochs}) == ROTATIONS
    assert len(ksids) == 1, "the stream stays open across rotations"
    # one OPEN_CONNECT per side, then only GET_KEY: the stream was kept, not reopened per key
    assert sim.network.stats["open"] == 2
    assert sim.network.stats["keys"] >= 2 * ROTATIONS


async def test_stream_is_reopened_after_a_module_restart(
    sim: Simulator, tmp_path: Path, transport: str
) -> None:
    async with open_agent_pair(
        tmp_path / "agents",
        alice=side(sim, "alice", transport),
        bob=side(sim, "bob", transport),
        link={"interval": 0.01, "jitter": 0, "reject_after": 30},
    ) as pair:
        await pair.wait_for_epoch(5, timeout=60)
        sim.servers["QKDM_A"].restart()
        sim.servers["QKDM_B"].restart()
        epoch = max(r.epoch for r in pair.sink("alice", "rec").installs)
        await pair.wait_for_epoch(epoch + 5, timeout=60)
        installs = {
            name: {r.epoch: r for r in pair.sink(name, "rec").installs} for name in ("alice", "bob")
        }
    ksids = {codec.parse_key_id(r.key_ids[0])[0] for r in installs["alice"].values()}  # type: ignore[index]
    assert len(ksids) >= 2, "a new stream after the restart"
    for e, record in installs["alice"].items():
        if e in installs["bob"]:
            assert installs["bob"][e].fingerprint == record.fingerprint


async def test_two_agents_rotate_100_times_over_the_rest_form(pki: Path, tmp_path: Path) -> None:
    """qkd-module's plain-HTTP form (insecure opt-in): same secrets, one stream, fresh indices."""
    async with open_simulator(pki, SimSettings(modules=MODULES, rest=True)) as sim:
        async with open_agent_pair(
            tmp_path / "agents",
            alice=side(sim, "alice", "qkd-module"),
            bob=side(sim, "bob", "qkd-module"),
            link={"interval": 0.01, "jitter": 0, "reject_after": 30},
        ) as pair:
            await pair.wait_for_epoch(ROTATIONS, timeout=120)
            await pair.wait_for_installs(ROTATIONS, "rec")
            installs = {
                name: {r.epoch: r for r in pair.sink(name, "rec").installs}
                for name in ("alice", "bob")
            }
    epochs = range(1, ROTATIONS + 1)
    ids = [installs["alice"][e].key_ids[0] for e in epochs]
    for epoch in epochs:
        a, b = installs["alice"][epoch], installs["bob"][epoch]
        assert a.fingerprint == b.fingerprint and a.key_ids == b.key_ids, epoch
    assert len({installs["alice"][e].fingerprint for e in epochs}) == ROTATIONS
    parsed = [codec.parse_key_id(i) for i in ids]
    assert len({p[0] for p in parsed if p}) == 1, "the stream stays open across rotations"
    indices = [p[1] for p in parsed if p]
    assert indices == sorted(set(indices)), "the module's indices only grow"
