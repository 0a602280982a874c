"""Fail closed means the old key is really gone: a failed erase is retried until it succeeds,
and status, metrics, events and logs say so meanwhile (issue 11, defect 4). And a bug in one
link's task never stops the agent (defect 1). Virtual time."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from qkdagent.testing import open_agent_pair

REC = {"sinks": {"rec": {"type": "recording"}, "other": {"type": "recording", "label": "o"}}}
LINK = {"interval": 10, "reject_after": 30, "jitter": 0, "backoff_min": 1, "backoff_max": 8}


async def test_a_failed_erase_is_retried_until_the_key_is_gone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(2, timeout=60)
        sink = pair.sink("bob", "rec")
        sink.erase_failures = 4  # ENOSPC, a stopped daemon...: the next four erases fail
        installed = pair.secret("bob", "rec")
        caplog.clear()
        await pair.stop("alice")
        with trio.fail_after(60):  # reject_after passes: bob erases; "rec" fails
            while pair.bob.link("alice-bob").status.erased_reason is None:  # noqa: ASYNC110
                await trio.sleep(0.5)
        status = pair.bob.link("alice-bob").describe()
        assert status["erase_failed"] == ["rec"]
        assert sink.current["alice-bob"] == installed  # the old key is still there...
        metric = pair.bob.metrics.erase_failed.labels("alice-bob").get()
        assert metric == 1
        events = [e for e in pair.bob.recent_events if e["kind"] == "erase_failed"]
        assert len(events) == 1 and events[0]["component"] == "rec"
        erased_lines = [r.getMessage() for r in caplog.records if "sinks erased" in r.getMessage()]
        assert erased_lines and all("rec" not in line.split(": ")[-1] for line in erased_lines)
        assert pair.sink("bob", "other").calls[-1] == "erase:reject_after"

        # ...until a retry (1, 2, 4, 8 s of backoff) gets it out.
        await trio.sleep(1 + 2 + 4 + 8 + 1)
        assert sink.calls[-5:] == [*["erase-failed:reject_after"] * 4, "erase:reject_after"]
        assert sink.current["alice-bob"] != installed
        status = pair.bob.link("alice-bob").describe()
        assert status["erase_failed"] is None and status["erased"] == "reject_after"
        assert pair.bob.metrics.erase_failed.labels("alice-bob").get() == 0
        assert [e["kind"] for e in pair.bob.recent_events][-1] == "erase_recovered"
        calls = len(sink.calls)
        await trio.sleep(120)
        assert len(sink.calls) == calls  # no more retries once it is gone


async def test_a_failed_startup_erase_is_retried_too(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    failing = {"sinks": {"rec": {"type": "recording", "erase_failures": 2}}}
    async with open_agent_pair(tmp_path, alice=REC, bob=failing, link=LINK, local=True) as pair:
        pair_sink = pair.sink("bob", "rec")
        await pair.stop("alice")  # no rotation may install a key instead
        await trio.sleep(1 + 2 + 1)
        assert pair_sink.calls[:3] == ["erase-failed:startup", "erase-failed:startup",
                                       "erase:startup"]  # fmt: skip
        assert pair.bob.link("alice-bob").describe()["erase_failed"] is None


async def test_a_rotation_that_installs_ends_the_erase_retries(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=60)
        sink = pair.sink("bob", "rec")
        sink.erase_failures = 1000
        await pair.stop("alice")
        await trio.sleep(35)
        assert pair.bob.link("alice-bob").describe()["erase_failed"] == ["rec"]
        await pair.start("alice")
        await pair.wait_for_epoch(2, timeout=60)
        assert pair.bob.link("alice-bob").describe()["erase_failed"] is None
        recovered = [e for e in pair.bob.recent_events if e["kind"] == "erase_recovered"]
        assert recovered and "now holds epoch" in recovered[-1]["detail"]
        tries = len(sink.calls)
        await trio.sleep(60)
        assert not any(c.startswith("erase") for c in sink.calls[tries:])


async def test_a_bug_in_one_links_task_restarts_that_link_and_spares_the_agent(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=60)
        runtime = pair.alice.link("alice-bob")
        bugs = 3

        def buggy_decide(*args: object) -> object:
            nonlocal bugs
            if bugs:
                bugs -= 1
                raise RecursionError("secret 0123abcd")
            return original(*args)

        from qkdagent import scheduler

        original = scheduler.decide
        monkeypatch.setattr(scheduler, "decide", buggy_decide)
        runtime.poke()
        epoch = pair.epoch("alice")
        await pair.wait_for_epoch(epoch + 1, timeout=120)
        assert bugs == 0
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert sum("unexpected RecursionError" in line for line in lines) == 3
        assert not any("0123abcd" in line for line in lines)


async def test_a_removed_links_failed_erase_is_retried_before_its_sink_closes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copy

    from qkdagent.config import parse_config
    from qkdagent.testing import RecordingSink

    closed: list[str] = []

    async def record_close(self: RecordingSink) -> None:
        closed.append(self.name)

    monkeypatch.setattr(RecordingSink, "aclose", record_close)
    one = {"sinks": {"rec": {"type": "recording"}}}
    async with open_agent_pair(tmp_path, alice=one, bob=one, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=60)
        sink = pair.sink("alice", "rec")
        installed = sink.current["alice-bob"]
        sink.erase_failures = 3
        config = copy.deepcopy(pair.configs["alice"])
        del config["links"]["alice-bob"]
        del config["sinks"]["rec"]
        await pair.alice.reload(parse_config(config))
        assert sink.current["alice-bob"] == installed and closed == []
        assert pair.alice.describe()["removed_links_erase_failed"] == {"alice-bob": ["rec"]}
        await trio.sleep(1 + 2 + 4 + 1)
        assert sink.calls[-4:] == [*["erase-failed:removed"] * 3, "erase:removed"]
        assert sink.current["alice-bob"] != installed
        assert closed == ["rec"]  # closed once nothing needs it any more
        assert pair.alice.describe()["removed_links_erase_failed"] == {}


def _reloaded(pair, change) -> object:
    import copy

    from qkdagent.config import parse_config

    config = copy.deepcopy(pair.configs["alice"])
    change(config)
    return parse_config(config)


async def test_a_link_added_back_takes_its_sinks_over_from_the_old_erase_retry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Review finding: the removed link's retry erased the re-added link's live key."""
    one = {"sinks": {"rec": {"type": "recording"}}}
    async with open_agent_pair(tmp_path, alice=one, bob=one, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=60)
        sink = pair.sink("alice", "rec")
        sink.erase_failures = 1
        original = pair.configs["alice"]
        await pair.alice.reload(_reloaded(pair, lambda c: c["links"].clear()))
        assert pair.alice.describe()["removed_links_erase_failed"] == {"alice-bob": ["rec"]}
        from qkdagent.config import parse_config

        await pair.alice.reload(parse_config(original))
        await pair.wait_for_epoch(pair.epoch("bob") + 1, timeout=60)
        calls = len(sink.calls)
        await trio.sleep(30)  # the old retry would have come after 1 s
        assert not any(c.startswith("erase") for c in sink.calls[calls:])
        assert sink.current["alice-bob"] == pair.secret("alice", "rec")
        assert pair.alice.describe()["removed_links_erase_failed"] == {}


async def test_a_sink_dropped_from_a_link_is_erased(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Review finding: a sink a reload takes off a link kept that link's key for good."""
    two = {"sinks": {"rec": {"type": "recording"}, "extra": {"type": "recording", "label": "x"}}}
    async with open_agent_pair(tmp_path, alice=two, bob=two, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=60)
        extra = pair.sink("alice", "extra")
        held = extra.current["alice-bob"]

        def drop_extra(config: dict) -> None:
            config["links"]["alice-bob"]["sinks"] = ["rec"]
            config["sinks"]["extra"]["local_only"] = True  # kept configured, fed by no link

        await pair.alice.reload(_reloaded(pair, drop_extra))
        assert extra.calls[-1] == "erase:removed"
        assert extra.current["alice-bob"] != held


async def test_a_reload_that_fails_half_way_erases_the_links_it_stranded(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: a failure after a changed link was stopped left it without a timer and
    its key installed for good."""
    from qkdagent import link as link_module
    from qkdagent.errors import ReloadFailed

    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=60)
        sink = pair.sink("alice", "rec")
        held = sink.current["alice-bob"]

        async def broken_open(*args: object, **kwargs: object) -> object:
            raise OSError("disk gone")

        monkeypatch.setattr(link_module.LinkRuntime, "open", broken_open)

        def change(config: dict) -> None:
            config["links"]["alice-bob"]["interval"] = 20

        with pytest.raises(ReloadFailed, match="links stopped and erased: alice-bob"):
            await pair.alice.reload(_reloaded(pair, change))
        assert sink.calls[-1] == "erase:reload-failed"
        assert sink.current["alice-bob"] != held


async def test_a_sink_whose_erase_and_install_failed_gets_the_current_key_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Review finding: once the link rotated again, retrying the old erase left the sink
    keyless until the next rotation; it is given the current key instead."""
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=60)
        sink = pair.sink("bob", "rec")
        sink.erase_failures = 1000
        await pair.stop("alice")
        await trio.sleep(31)  # reject_after: bob's erase fails, and keeps failing
        assert pair.bob.link("alice-bob").describe()["erase_failed"] == ["rec"]
        sink.fail = True  # ...and the next install fails too
        await pair.start("alice")
        await pair.wait_for_epoch(2, timeout=60)
        assert pair.bob.link("alice-bob").describe()["erase_failed"] == ["rec"]
        sink.fail = False
        await trio.sleep(10)  # the retry comes within backoff_max
        assert sink.calls[-1] == f"install:{pair.epoch('bob')}"
        assert sink.current["alice-bob"] == pair.secret("bob", "rec")
        assert pair.bob.link("alice-bob").describe()["erase_failed"] is None


async def test_a_state_write_cancelled_before_its_batch_never_commits(tmp_path: Path) -> None:
    """Review finding: a caller cancelled while waiting for the batch lock left its write
    queued, and the next batch committed it behind the caller's back."""
    from qkdagent.secret import Secret
    from qkdagent.state import StateStore

    store = StateStore(tmp_path / "state")
    key = Secret(b"k" * 32)
    await store.run(store.create, "l", "bob", key, key)
    writing, done = trio.Event(), trio.Event()

    async def batch_in_progress() -> None:
        async with store._batch_lock:
            writing.set()
            await done.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batch_in_progress)
        await writing.wait()
        with trio.move_on_after(0.05):
            await store.run(lambda: store.commit(
                "l", epoch=7, chain_key=key, auth_key=key, key_ids=(), outputs={}
            ))  # fmt: skip
        done.set()
    await store.run(store.load, "l")  # the next batch
    record = await store.run(store.load, "l")
    assert record is not None and record.epoch == 0
    store.close()


async def test_a_removed_link_forgets_its_used_key_ids_a_bounded_chunk_at_a_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link removed by a reload takes its used key IDs with it, deleted in transactions of
    at most `USED_KEY_ID_PRUNE_MAX` (at 100,000 IDs, one transaction held the store for 0.5 s),
    and the link's other state goes too; another link's IDs stay."""
    from qkdagent import agent as agent_module
    from qkdagent.state import StateStore

    monkeypatch.setattr(agent_module, "USED_KEY_ID_PRUNE_MAX", 7)
    deleted: list[int] = []
    forget = StateStore.forget_used_ids

    def counted(store: StateStore, name: str, limit: int) -> int:
        deleted.append(forget(store, name, limit))
        return deleted[-1]

    monkeypatch.setattr(StateStore, "forget_used_ids", counted)
    one = {"sinks": {"rec": {"type": "recording"}}}
    async with open_agent_pair(tmp_path, alice=one, bob=one, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(30, timeout=3600)
        db = pair.alice.store._db
        db.execute("INSERT INTO used_key_ids VALUES ('other', 'sim', 'k', 1)")  # another link's
        used = db.execute("SELECT COUNT(*) FROM used_key_ids WHERE link = 'alice-bob'")
        count = used.fetchone()[0]
        assert count >= 30
        await pair.alice.reload(_reloaded(pair, lambda c: c["links"].clear()))
        assert deleted == [7] * (count // 7) + [count % 7]
        assert pair.alice.store.load("alice-bob") is None
        rows = db.execute("SELECT link FROM used_key_ids").fetchall()
        assert rows == [("other",)]
