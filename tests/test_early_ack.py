"""The responder acknowledges a `commit` once it is committed and installs after (issue 18): the
initiator's rotation no longer waits for the responder's sinks, and nothing reaches the link
before that install is done (it holds the link's lock). The commit itself is not fsync'd on its
own: the pending epoch it makes current already is, and a commit lost to a power loss is
recovered as a lost `commit` message is."""

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


async def test_the_initiator_is_done_once_the_responder_has_committed(
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


async def test_only_the_responder_commit_leaves_its_fsync_to_the_next(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What each side writes, and whether it must be on disk before the side goes on: the
    responder's pending epoch (with its key IDs) and the initiator's commit, which decides
    the rotation, are durable; the responder's commit of that pending epoch is not."""
    from qkdagent.state import StateStore

    writes: list[tuple[Path, str, bool]] = []
    real_run = StateStore.run

    async def spy(self: StateStore, fn: Any, *args: Any, durable: bool = True) -> Any:
        name = getattr(fn, "func", fn).__name__
        writes.append((self.state_dir, name, durable))
        return await real_run(self, fn, *args, durable=durable)

    monkeypatch.setattr(StateStore, "run", spy)
    async with open_agent_pair(tmp_path, alice=ALICE, bob=ALICE, link=LINK, local=True) as pair:
        await pair.wait_for_installs(3, "rec", timeout=4 * LINK["interval"])
        alice_dir = Path(pair.configs["alice"]["agent"]["state_dir"])
    rotation = {(side == alice_dir, name, durable) for side, name, durable in writes
                if name in ("commit", "store_pending")}  # fmt: skip
    assert rotation == {
        (True, "commit", True),
        (False, "store_pending", True),
        (False, "commit", False),
    }


async def test_a_responder_commit_lost_with_the_power_is_made_by_the_next_rotate(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """What a power loss right after bob's commit of epoch n+1 leaves him (its fsync came
    later): epoch n and the durable pending n+1. Emulated by putting back his state file as
    it was when alice's commit reached him. Until alice's next regular rotation the two hold
    different keys (the availability this fsync's saving costs); that rotate, under n+1's
    auth key, makes bob commit n+1 first: both reach n+2 with the same key, no resync, no
    key ID twice."""
    import shutil

    from qkdagent.testing.hostile import Exchange, ManInTheMiddle

    link = {"interval": 100.0, "reject_after": 300.0, "jitter": 0}
    async with open_agent_pair(tmp_path, alice=ALICE, bob=ALICE, link=link, local=True) as pair:
        await pair.wait_for_installs(1, "rec")
        state = Path(pair.configs["bob"]["agent"]["state_dir"]) / "state.db"
        saved = tmp_path / "as-on-disk.db"
        mitm = ManInTheMiddle.on(pair, "bob")

        async def snapshot_at_commit(exchange: Exchange) -> Any:
            if exchange.action == "commit" and not saved.exists():
                shutil.copyfile(state, saved)  # epoch 1 and pending 2, checkpointed
            return await exchange.forward()

        mitm.tamper = snapshot_at_commit
        await pair.wait_for_installs(2, "rec", timeout=2 * link["interval"])
        await pair.stop("bob")
        for stale in state.parent.glob("state.db*"):
            stale.unlink()
        shutil.copyfile(saved, state)
        bob = await pair.start("bob")
        record = bob.link("alice-bob").record
        assert record.epoch == 1 and record.pending is not None and record.pending.epoch == 2
        assert pair.epoch("alice") == 2
        assert [r.epoch for r in pair.sink("bob", "rec").installs] == [1]  # epoch 1's key
        assert pair.sink("bob", "rec").current["alice-bob"] != pair.secret("alice", "rec")
        await pair.wait_for_installs(3, "rec", timeout=2 * link["interval"])
        assert pair.epoch("alice") == pair.epoch("bob") == 3
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec")
        assert not mitm.requests("resync")
        used = [r.key_ids for r in pair.sink("alice", "rec").installs]
        assert len(used) == len(set(used))
