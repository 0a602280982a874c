"""The responder acknowledges a `commit` once it is durable and installs after (issue 18): the
initiator's rotation no longer waits for the responder's sinks, and nothing reaches the link
before that install is done (it holds the link's lock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from qkdagent.hookspecs import hookimpl
from qkdagent.testing import open_agent_pair

INSTALL = 5.0
"""Virtual seconds bob's sink takes to install."""
LINK = {"interval": 100.0, "reject_after": 300.0, "jitter": 0}
ALICE = {"sinks": {"rec": {"type": "recording"}}}
BOB = {"sinks": {"rec": {"type": "recording", "delay": INSTALL}}}


class _SeenAtAck:
    """On alice's side: what bob had done when alice's rotation ended (her after_rotation)."""

    def __init__(self, pair: Any) -> None:  # type: ignore[misc]
        self.pair = pair
        self.seen: list[tuple[int, int, list[int]]] = []

    @hookimpl
    def qkdagent_after_rotation(self, event: Any) -> None:
        bob = self.pair.bob.link("alice-bob")
        installs = [r.epoch for r in self.pair.sink("bob", "rec").installs]
        self.seen.append((event.epoch, bob.record.epoch, installs))


async def test_the_initiator_is_done_once_the_responder_commit_is_durable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(
        tmp_path, alice=ALICE, bob=BOB, link=LINK, local=True, start=False
    ) as pair:
        await pair.start("bob")
        alice = await pair.start("alice")
        seen = _SeenAtAck(pair)
        alice.plugins.add("seen", seen, "seen")
        await pair.wait_for_installs(2, "rec", timeout=3 * LINK["interval"])
        # At alice's end of epoch 2 bob had committed it (the ack says so) and was installing.
        assert (2, 2, [1]) in seen.seen
        assert alice.link("alice-bob").status.last_rotation_seconds < INSTALL
        assert bob_status(pair).last_rotation_seconds >= INSTALL
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec")
        assert pair.sink("bob", "rec").current["alice-bob"] == pair.secret("alice", "rec")


async def test_the_next_rotation_waits_for_the_responder_install(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=ALICE, bob=BOB, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1)
        assert [r.epoch for r in pair.sink("bob", "rec").installs] == []  # still installing
        started = trio.current_time()
        assert await pair.alice.link("alice-bob").rotate_once()  # at once, not at the interval
        # bob took the rotate only once epoch 1 was in his sink: the lock was held throughout
        assert installs(pair)[:1] == ["install:1"]
        assert trio.current_time() - started >= INSTALL / 2
        await pair.wait_for_installs(2, "rec")
        assert installs(pair) == ["install:1", "install:2"]
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec")


def bob_status(pair: Any) -> Any:  # type: ignore[misc]
    return pair.bob.link("alice-bob").status


def installs(pair: Any) -> list[str]:  # type: ignore[misc]
    return [call for call in pair.sink("bob", "rec").calls if call.startswith("install:")]
