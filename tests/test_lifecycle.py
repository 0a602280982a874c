"""The pure parts of the component lifecycle: `plan_reload`, and start-up cut short."""

from __future__ import annotations

import copy
from pathlib import Path

import trio
import trio.testing

from qkdagent.config import parse_config
from qkdagent.lifecycle import plan_reload
from qkdagent.scheduler import Clock, Timing, after_failure
from qkdagent.testing import open_agent_pair, pair_configs


def _configs(tmp_path: Path) -> dict:
    sinks = {"a": {"type": "recording", "label": "a"}, "b": {"type": "recording", "label": "b"}}
    return pair_configs(tmp_path, alice={"sinks": sinks})["alice"]


def test_an_unchanged_config_plans_nothing(tmp_path: Path) -> None:
    raw = _configs(tmp_path)
    plan = plan_reload(parse_config(raw), parse_config(copy.deepcopy(raw)))
    assert not plan.changed_components and not plan.dropped_components
    assert plan.added_links == plan.removed_links == plan.changed_links == ()
    assert not plan.agent_settings_changed


def test_a_changed_sink_rebuilds_it_and_restarts_its_links(tmp_path: Path) -> None:
    raw = _configs(tmp_path)
    new = copy.deepcopy(raw)
    new["sinks"]["b"]["delay"] = 1
    plan = plan_reload(parse_config(raw), parse_config(new))
    assert plan.changed_components == {"b"} and plan.changed_links == ("alice-bob",)


def test_local_only_counts_as_a_change(tmp_path: Path) -> None:
    raw = _configs(tmp_path)
    new = copy.deepcopy(raw)
    new["sinks"]["a"]["local_only"] = True
    assert plan_reload(parse_config(raw), parse_config(new)).changed_components == {"a"}


def test_links_added_removed_and_components_dropped(tmp_path: Path) -> None:
    raw = _configs(tmp_path)
    new = copy.deepcopy(raw)
    new["links"]["alice-carol"] = {**new["links"].pop("alice-bob"), "peer": "carol"}
    new["links"]["alice-carol"]["sinks"] = ["a"]
    del new["sinks"]["b"]
    new["agent"]["drain_timeout"] = 3
    plan = plan_reload(parse_config(raw), parse_config(new))
    assert plan.added_links == ("alice-carol",) and plan.removed_links == ("alice-bob",)
    assert plan.dropped_components == {"b"} and not plan.changed_components
    assert plan.agent_settings_changed


def test_backoff_survives_a_very_long_outage() -> None:
    clock = Clock(initiator=True, last_success=0.0, next_attempt=0.0, failures=5000)
    timing = Timing(interval=120, backoff_min=1, backoff_max=30)
    assert after_failure(clock, timing, 10.0).next_attempt == 40.0  # was OverflowError


async def test_a_shutdown_during_start_up_ends_it_cleanly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    slow = {"sinks": {"rec": {"type": "recording", "prepare_delay": 500, "timeout": 600}}}
    async with open_agent_pair(tmp_path, alice=slow, local=True, start=False) as pair:
        await pair.start("bob")
        stop = trio.Event()
        from qkdagent.agent import Agent

        agent = Agent(parse_config(pair.configs["alice"]))
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: agent.run(shutdown_trigger=stop.wait))
            await trio.sleep(5)
            stop.set()
        assert trio.current_time() - started < 10  # not the 500 s prepare()
        assert not agent.links
