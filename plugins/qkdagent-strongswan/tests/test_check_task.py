"""The sink's background task: each sink checked at its own interval (virtual clock)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from qkdagent_strongswan import PpkRepair, StrongswanPpkSink

from qkdagent import SinkError
from qkdagent.testing import build_component


class CountingSink(StrongswanPpkSink):
    """A sink whose `check_once()` only records when it ran (or fails, like a charon down)."""

    fail = False
    checks: list[float]

    async def check_once(self) -> list[PpkRepair]:
        self.checks.append(trio.current_time())
        if self.fail:
            raise SinkError("charon is down")
        return []


def counting_sink(name: str, interval: float, tmp_path: Path, fail: bool = False) -> CountingSink:
    table = {"ppk_id": "qkd-gw", "socket": str(tmp_path / "none.vici"), "check_interval": interval}
    sink = build_component(CountingSink, table, name=name, state_dir=tmp_path)
    sink.fail = fail
    sink.checks = []
    return sink


async def test_each_sink_task_checks_at_its_interval(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fast, slow = counting_sink("fast", 1.0, tmp_path), counting_sink("slow", 3.0, tmp_path)
    broken, late = counting_sink("x", 2.0, tmp_path, True), counting_sink("late", 1.0, tmp_path)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for sink in (slow, broken):
            await nursery.start(sink.run)
        async with trio.open_nursery() as dropped:  # what the agent does on a reload:
            await dropped.start(fast.run)
            await trio.sleep(9)
            await nursery.start(late.run)  # starts the task of a sink the reload added
            await trio.sleep(0.5)
            dropped.cancel_scope.cancel()  # and cancels the task of the sink it dropped
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    offsets = lambda s: [round(t - start, 3) for t in s.checks]  # noqa: E731
    assert offsets(fast) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert offsets(slow) == [3, 6, 9]
    assert offsets(broken) == [2, 4, 6, 8, 10]  # a failing check does not stop the task
    assert offsets(late) == [10, 11]
    assert "PPK check failed: charon is down" in caplog.text
    assert dropped.cancel_scope.cancelled_caught  # the dropped sink's task ended when cancelled
