"""The responder acknowledges a `commit` once it is durable and installs after (issue 18): the
initiator's rotation no longer waits for the responder's sinks, and nothing reaches the link
before that install is done (it holds the link's lock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from qkdagent.hookspecs import hookimpl
from qkdagent.identity import PeerIdentity
from qkdagent.testing import open_agent_pair

ALICE_ID = PeerIdentity(dns=("alice",))
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


async def test_a_link_removed_while_bob_installs_ends_with_its_erase(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Bob removes the link (a reload) while he installs epoch 1 after its early ack and
    alice's next rotate waits for his lock: that rotate, queued ahead of the removal, is
    answered first; the erase is the sink's last call; and a request that gets the old
    runtime's lock after the removal began (here alice's commit of epoch 2, which would
    install it after the erase) is refused and changes nothing."""
    import copy

    from qkdagent import protocol, ratchet, responder_rules
    from qkdagent.config import parse_config
    from qkdagent.errors import ProtocolError

    async with open_agent_pair(tmp_path, alice=ALICE, bob=BOB, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1)
        old = pair.bob.link("alice-bob")
        sink = pair.sink("bob", "rec")
        assert installs(pair) == []  # bob installs epoch 1, holding the link's lock
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.alice.link("alice-bob").rotate_once)
            while old.lock.statistics().tasks_waiting < 1:  # noqa: ASYNC110 - alice waits
                await trio.sleep(0.01)
            config = copy.deepcopy(pair.configs["bob"])
            del config["links"]["alice-bob"]
            await pair.bob.reload(parse_config(config))
        pending = old.record.pending  # the queued rotate was answered before the removal
        assert pending is not None and pending.epoch == 2
        assert installs(pair) == ["install:1"]
        assert sink.calls[-1] == "erase:removed"
        assert sink.erasures[-1][1:] == ("alice-bob", "removed")
        keys = responder_rules.pending_keys(pending)
        commit = protocol.build(
            "commit",
            link="alice-bob",
            sender="alice",
            receiver="bob",
            epoch=2,
            auth_key=pending.auth_key,
            nonce=protocol.new_nonce(),
            confirm=ratchet.confirmation(keys, "initiator"),
        )
        with pytest.raises(ProtocolError) as refused:
            await old.handle("commit", commit, ALICE_ID)
        assert refused.value.status == 503
        assert sink.calls[-1] == "erase:removed" and old.record.epoch == 1


async def test_a_link_being_reconfigured_answers_503_not_404(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Between the old runtime and the new (a reload that changes the link), the peer gets
    a 503, which it retries, not a 404, after which it would not resend its commit; a
    stranger still learns nothing."""
    import copy

    from qkdagent.config import parse_config
    from qkdagent.errors import ProtocolError

    async with open_agent_pair(tmp_path, alice=ALICE, bob=BOB, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1)
        old = pair.bob.link("alice-bob")
        config = copy.deepcopy(pair.configs["bob"])
        config["links"]["alice-bob"]["interval"] = LINK["interval"] + 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.bob.reload, parse_config(config))
            while "alice-bob" in pair.bob.links:  # noqa: ASYNC110 - the reload stops it
                await trio.sleep(0.01)
            with pytest.raises(ProtocolError) as waiting:
                await pair.bob._handle_peer("alice-bob", "commit", b"{}", ALICE_ID)
            assert waiting.value.status == 503
            with pytest.raises(ProtocolError) as stranger:
                await pair.bob._handle_peer("alice-bob", "commit", b"{}", PeerIdentity())
            assert stranger.value.status == 403
        assert pair.bob.link("alice-bob") is not old  # the new runtime serves it
        with pytest.raises(ProtocolError) as unknown:
            await pair.bob._handle_peer("no-such-link", "commit", b"{}", ALICE_ID)
        assert unknown.value.status == 404
