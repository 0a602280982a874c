"""Lost state, role conflicts and several sources, with the agent pair in virtual time."""

from __future__ import annotations

import shutil
import uuid
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from qkdagent import transport
from qkdagent.peerserver import ServerLimits
from qkdagent.testing import MemoryPool, open_agent_pair, pair_configs
from qkdagent.testing.agents import LINK, AgentPair

from .helpers import until

REC = {"sinks": {"rec": {"type": "recording"}}}
LINK_OPTS = {"interval": 60, "reject_after": 300, "jitter": 0}


async def _lose_state(pair, name: str) -> None:
    await pair.stop(name)
    shutil.rmtree(pair.configs[name]["agent"]["state_dir"])
    await pair.start(name)


async def test_responder_that_lost_its_state_resynchronises(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK_OPTS, local=True) as pair:
        await pair.wait_for_epoch(3, timeout=600)
        old = pair.secret("alice", "rec")
        await _lose_state(pair, "bob")
        assert pair.epoch("bob") == 0
        await trio.sleep(61)
        assert pair.epoch("alice") == pair.epoch("bob") == 4  # resync moves past both epochs
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec") != old
        await trio.sleep(60)
        assert pair.epoch("alice") == pair.epoch("bob") == 5  # and the chain goes on normally


async def test_initiator_that_lost_its_state_resynchronises(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK_OPTS, local=True) as pair:
        await pair.wait_for_epoch(3, timeout=600)
        await _lose_state(pair, "alice")
        await trio.sleep(1)
        assert pair.epoch("alice") == pair.epoch("bob") == 4
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec")
        assert pair.sink("bob", "rec").current["alice-bob"] == pair.secret("bob", "rec")


async def test_both_sides_initiator_is_refused_and_reported(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    both = {**REC, "link": {"role": "initiator"}}
    async with open_agent_pair(tmp_path, alice=both, bob=both, link=LINK_OPTS, local=True) as pair:
        await trio.sleep(5)
        assert pair.epoch("alice") == pair.epoch("bob") == 0
        assert (
            "both agents are configured as initiator"
            in (pair.alice.link("alice-bob").describe()["last_error"])
        )


async def test_several_sources_are_combined(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sources = {
        "qkd": {"type": "memory", "pool": f"qkd-{tmp_path.name}"},
        "dske": {"type": "memory", "pool": f"dske-{tmp_path.name}", "key_size": 64},
    }
    alice = {**REC, "sources": sources}
    bob = {**REC, "sources": sources}
    async with open_agent_pair(tmp_path, alice=alice, bob=bob, link=LINK_OPTS, local=True) as pair:
        await pair.wait_for_epoch(2, timeout=600)
        (record,) = pair.sink("bob", "rec").installs[-1:]
        assert len(record.key_ids) == 2
        assert MemoryPool.named(f"qkd-{tmp_path.name}").taken >= 2
        assert MemoryPool.named(f"dske-{tmp_path.name}").taken >= 2
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec")
        MemoryPool.named(f"dske-{tmp_path.name}").down = True
        epoch = pair.epoch("alice")
        await trio.sleep(61)
        assert pair.epoch("alice") == epoch  # every source is required for a rotation


async def test_a_responder_restored_from_an_old_backup_is_resynchronised_by_every_link_unpaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding (M1), over the real peer API: each link's announce and rotate are
    refused (409, epoch) by a responder restored from an old backup, then it resynchronises.
    With a refusal budget of one (then one per 1,000 s), only the links' own allowances let
    every link through: before them, the resyncs waited for the client's debt."""
    limits = partial(ServerLimits, refusal_rate=0.001, refusal_burst=1)
    monkeypatch.setattr(transport, "ServerLimits", limits)
    pool = {"sim": {"type": "memory", "pool": f"restore-{uuid.uuid4().hex}", "fetch_ahead": True}}
    side = {**REC, "sources": pool}
    configs = pair_configs(tmp_path, alice=side, bob=side, link={"interval": 2, "jitter": 0})
    links = [f"l{i}" for i in range(6)]
    for config in configs.values():
        template = config["links"].pop(LINK)
        config["links"] = {name: dict(template) for name in links}
    state = Path(configs["bob"]["agent"]["state_dir"])

    async with trio.open_nursery() as nursery:
        pair = AgentPair(nursery, configs, None)
        await pair.start("bob")
        await pair.start("alice")

        def epochs(name: str) -> list[int]:
            records = [pair.agents[name].link(n).record for n in links]
            return [record.epoch if record else 0 for record in records]

        async def all_past(epoch: int) -> None:
            await until(lambda: min(epochs("alice") + epochs("bob")) > epoch, 30, every=0.05)

        await all_past(1)
        await pair.stop("bob")
        shutil.copytree(state, tmp_path / "backup")
        await pair.start("bob")
        await all_past(max(epochs("alice")) + 1)  # the backup is two rotations behind, or more
        await pair.stop("bob")
        shutil.rmtree(state)
        shutil.copytree(tmp_path / "backup", state)
        ahead = max(epochs("alice"))
        await pair.start("bob")
        assert max(epochs("bob")) < ahead
        await all_past(ahead)  # every link resynchronised, within 30 s
        # (a rotation may be under way between the two sides)
        await until(lambda: epochs("alice") == epochs("bob"), 30, every=0.05)
        refused = pair.bob.metrics.registry.get_sample_value(
            "qkdagent_peer_requests_refused_total", {"status": "409"}
        )
        assert refused is not None and refused >= 2 * len(links)  # announce and rotate each
        for name in list(pair.agents):
            await pair.stop(name)
