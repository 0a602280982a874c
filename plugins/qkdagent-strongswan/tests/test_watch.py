"""The check service: each enrolled sink checked at its own interval (virtual clock)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from qkdagent_strongswan.watch import due, enrol, enrolled, service

from qkdagent import PluginContext, SinkError


class FakeSink:
    def __init__(self, name: str, interval: float, fail: bool = False) -> None:
        self.name = name
        self.config = SimpleNamespace(check_interval=interval)
        self.closed = False
        self.fail = fail
        self.checks: list[float] = []

    async def check_once(self) -> list[object]:
        self.checks.append(trio.current_time())
        if self.fail:
            raise SinkError("charon is down")
        return []


def test_due_picks_sinks_whose_interval_passed() -> None:
    a, b = FakeSink("a", 1.0), FakeSink("b", 5.0)
    todo, wake = due(10.0, {a: 9.5, b: 4.0}, [a, b])
    assert todo == [b] and wake == 10.5
    todo, wake = due(10.0, {}, [a])
    assert todo == [a] and wake == 11.0
    assert due(10.0, {}, []) == ([], 20.0)


async def test_service_checks_each_sink_at_its_interval(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    context = PluginContext("alice", tmp_path)
    fast, slow, broken = FakeSink("fast", 1.0), FakeSink("slow", 3.0), FakeSink("x", 2.0, True)
    for sink in (fast, slow, broken):
        enrol(context, sink)  # type: ignore[arg-type]
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(service(context).run)
        await trio.sleep(9.5)
        fast.closed = True
        late = FakeSink("late", 1.0)
        enrol(context, late)  # type: ignore[arg-type]
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    offsets = lambda s: [round(t - start, 3) for t in s.checks]  # noqa: E731
    assert offsets(fast) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert offsets(slow) == [3, 6, 9]
    assert offsets(broken) == [2, 4, 6, 8, 10]  # a failing check does not stop the service
    assert offsets(late) == [10, 11]
    assert "PPK check failed: charon is down" in caplog.text
    assert [s.name for s in enrolled(context)] and fast not in enrolled(context)
