"""Events a source or sink reports outside rotations reach hooks, metrics, logs and /status."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from qkdagent import ComponentEvent, PluginContext, hookimpl
from qkdagent.testing import open_agent_pair

REC = {"sinks": {"rec": {"type": "recording"}}}


class _Listener:
    def __init__(self) -> None:
        self.events: list[ComponentEvent] = []

    @hookimpl
    def qkdagent_on_component_event(self, event: ComponentEvent) -> None:
        self.events.append(event)


async def test_reported_event_reaches_hook_metric_status_and_log(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, local=True) as pair:
        await pair.wait_for_epoch(1)
        listener = _Listener()
        pair.alice.plugins.pm.register(listener)
        event = ComponentEvent("rec", "repaired", "credential put back", link="ab")
        with caplog.at_level(logging.WARNING):
            pair.sink("alice", "rec").context.report(event)
        assert listener.events == [event]
        metrics = pair.alice.metrics.exposition().decode()
        assert 'qkdagent_component_events_total{component="rec",kind="repaired"} 1.0' in metrics
        recent = pair.alice.describe()["recent_component_events"]
        assert [(e["component"], e["kind"], e["link"]) for e in recent] == [
            ("rec", "repaired", "ab")
        ]
        assert "rec: repaired (link ab): credential put back" in caplog.text
        # the other agent saw nothing
        assert pair.bob.describe()["recent_component_events"] == []


def test_report_without_an_agent_only_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    context = PluginContext("solo", tmp_path)
    with caplog.at_level(logging.WARNING):
        context.report(ComponentEvent("s", "reinstall_failed", "token busy"))
    assert "s: reinstall_failed: token busy" in caplog.text


async def test_failing_listener_does_not_break_the_reporter(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    class Broken:
        @hookimpl
        def qkdagent_on_component_event(self, event: ComponentEvent) -> None:
            raise RuntimeError("listener bug")

    async with open_agent_pair(tmp_path, alice=REC, bob=REC, local=True) as pair:
        await pair.wait_for_epoch(1)
        pair.alice.plugins.pm.register(Broken())
        pair.sink("alice", "rec").context.report(ComponentEvent("rec", "repaired", "x"))
        assert len(pair.alice.describe()["recent_component_events"]) == 1
