"""Component background tasks and the per-agent stash (DESIGN v2 §3), in virtual time."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from qkdagent import hookimpl
from qkdagent.config import parse_config
from qkdagent.stash import Stash, StashKey
from qkdagent.testing import RecordingSink, open_agent_pair

TICKS: StashKey[list[str]] = StashKey("test.ticks")


class TickingSink(RecordingSink):
    """A recording sink with a background task that ticks once a second into the stash."""

    type_name = "ticking"
    failures = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ticks = self.context.stash.setdefault(TICKS, list)
        ticks.append(f"{self.name}:start")
        task_status.started()
        try:
            while True:
                await trio.sleep(1)
                if TickingSink.failures:
                    TickingSink.failures -= 1
                    raise ValueError("psk=0123abcd")
                ticks.append(f"{self.name}:tick")
        finally:
            ticks.append(f"{self.name}:stop")

    async def aclose(self) -> None:
        self.context.stash.setdefault(TICKS, list).append(f"{self.name}:close")


class _Plugin:
    @hookimpl
    def qkdagent_register_sinks(self, register):  # type: ignore[no-untyped-def]
        register(TickingSink)


@pytest.fixture(autouse=True)
def _ticking(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkdagent import plugins

    original = plugins.Plugins.load

    def load(self, names, group="qkdagent.plugins"):  # type: ignore[no-untyped-def]
        original(self, names, group=group)
        if "ticking" not in self.sinks:
            self.add("ticking", _Plugin(), "test")

    monkeypatch.setattr(plugins.Plugins, "load", load)
    TickingSink.failures = 0


def test_stash_keys_are_typed_and_private_to_their_object() -> None:
    stash, other = Stash(), Stash()
    key: StashKey[int] = StashKey("n")
    assert stash.get(key) is None and key not in stash
    stash[key] = 3
    assert stash[key] == 3 and other.get(key) is None
    assert stash.setdefault(key, lambda: 9) == 3
    assert StashKey("n") not in stash  # same name, another key
    del stash[key]
    assert len(stash) == 0


async def test_tasks_start_after_prepare_stop_before_close_and_share_the_stash(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sinks = {"sinks": {"t1": {"type": "ticking", "label": "a"}, "t2": {"type": "ticking"}}}
    async with open_agent_pair(tmp_path, alice=sinks, bob=sinks, local=True) as pair:
        await trio.sleep(2.5)
        ticks = pair.alice.context.stash[TICKS]
        assert ticks[:2] == ["t1:start", "t2:start"]
        assert ticks.count("t1:tick") == 2 and ticks.count("t2:tick") == 2
        assert pair.bob.context.stash[TICKS] is not ticks  # one stash per agent
        await pair.stop("alice")
        assert ticks[-4:] in (
            ["t1:stop", "t2:stop", "t1:close", "t2:close"],
            ["t2:stop", "t1:stop", "t1:close", "t2:close"],
        )


async def test_a_reload_stops_the_dropped_component_and_starts_the_new_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sinks = {"sinks": {"t1": {"type": "ticking"}}}
    async with open_agent_pair(tmp_path, alice=sinks, bob=sinks, local=True) as pair:
        await trio.sleep(1.5)
        config = copy.deepcopy(pair.configs["alice"])
        config["sinks"] = {"t2": {"type": "ticking"}}
        config["links"]["alice-bob"]["sinks"] = ["t2"]
        await pair.alice.reload(parse_config(config))
        ticks = pair.alice.context.stash[TICKS]
        assert ticks.index("t2:start") < ticks.index("t1:stop") < ticks.index("t1:close")
        await trio.sleep(2.5)  # not 2: two tasks due at one instant run in either order
        assert ticks[ticks.index("t1:close") :].count("t1:tick") == 0
        assert ticks.count("t2:tick") >= 2  # the new one runs


async def test_a_failing_task_is_restarted_reported_by_type_and_spares_the_agent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    TickingSink.failures = 2
    alice = {"sinks": {"t1": {"type": "ticking", "label": "psk"}}}
    bob = {"sinks": {"t1": {"type": "recording", "label": "psk"}}}
    async with open_agent_pair(tmp_path, alice=alice, bob=bob, local=True) as pair:
        await trio.sleep(10)
        events = [e for e in pair.alice.recent_events if e["kind"] == "task_failed"]
        assert len(events) == 2 and all("ValueError" in e["detail"] for e in events)
        ticks = pair.alice.context.stash[TICKS]
        assert ticks.count("t1:start") == 3  # restarted after each failure
        assert ticks.count("t1:tick") >= 3  # and ticking again
        assert "0123abcd" not in caplog.text
        await pair.wait_for_epoch(1)
