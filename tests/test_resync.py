"""Lost state, role conflicts and several sources, with the agent pair in virtual time."""

from __future__ import annotations

import shutil
from pathlib import Path

import trio
import trio.testing

from qkdagent.testing import MemoryPool, open_agent_pair

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
