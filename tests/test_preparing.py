"""Preparing components together: order of errors, cancellation, one-at-a-time components."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from qkdagent import KeyMeta, Link, Misconfigured, Options, PluginContext, Secret, Sink
from qkdagent.components import SinkHandle
from qkdagent.errors import StartupError
from qkdagent.lifecycle import prepare_all

Behaviour = Callable[[], Awaitable[None]]


class ScriptedSink(Sink):
    type_name = "scripted"

    def __init__(self, name: str, behaviour: Behaviour) -> None:
        super().__init__(name, Options({}, where=f"sinks.{name}"), PluginContext("t", Path(".")))
        self.behaviour = behaviour
        self.outcome = "not started"

    async def prepare(self) -> None:
        self.outcome = "running"
        try:
            await self.behaviour()
        except trio.Cancelled:
            self.outcome = "cancelled"
            raise
        self.outcome = "done"

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        raise AssertionError("not used")

    async def erase(self, link: Link, reason: str) -> None:
        raise AssertionError("not used")


class SerialSink(ScriptedSink):
    concurrent_prepare = False


def handle(sink: ScriptedSink, timeout: float = 30) -> SinkHandle:
    return SinkHandle(sink.name, sink.name, timeout, sink)


def after(seconds: float, error: Exception | None = None) -> Behaviour:
    async def behaviour() -> None:
        await trio.sleep(seconds)
        if error is not None:
            raise error

    return behaviour


async def failed_start(caplog: pytest.LogCaptureFixture, match: str, *sinks: ScriptedSink) -> str:
    """Prepare `sinks`, expect a StartupError matching `match`; what was logged meanwhile."""
    with caplog.at_level(logging.ERROR, logger="qkdagent.preparing"):
        with pytest.raises(StartupError, match=match):
            await prepare_all([handle(s) for s in sinks])
    return caplog.text


async def test_components_prepare_at_the_same_time(autojump_clock: trio.testing.MockClock) -> None:
    sinks = [ScriptedSink(f"s{i}", after(3)) for i in range(5)]
    await prepare_all([handle(s) for s in sinks])
    assert trio.current_time() == pytest.approx(3)
    assert {s.outcome for s in sinks} == {"done"}


async def test_one_failure_cancels_the_components_after_it_not_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    early = ScriptedSink("early", after(8))
    failing = ScriptedSink("failing", after(1, Misconfigured("no such thing")))
    late = ScriptedSink("late", after(20))
    with pytest.raises(StartupError, match="^sink 'failing': no such thing$") as raised:
        await prepare_all([handle(early), handle(failing), handle(late)])
    assert isinstance(raised.value.__cause__, Misconfigured)
    assert (early.outcome, late.outcome) == ("done", "cancelled")
    assert trio.current_time() == pytest.approx(8)  # the earlier one still decides


async def test_the_first_failure_in_config_order_wins_and_the_others_are_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    slow = ScriptedSink("slow", after(5, Misconfigured("slow broke")))
    fast = ScriptedSink("fast", after(1, Misconfigured("fast broke")))
    logged = await failed_start(caplog, "^sink 'slow': slow broke$", slow, fast)
    assert "also failed to start: sink 'fast': fast broke" in logged


async def test_a_plugin_bug_keeps_its_type_and_is_logged_by_type_only(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    first = ScriptedSink("first", after(2, Misconfigured("first broke")))
    buggy = ScriptedSink("buggy", after(1, ValueError("secret 0123abcd")))
    logged = await failed_start(caplog, "first broke", first, buggy)
    assert "sink 'buggy': ValueError" in logged
    assert "0123abcd" not in logged
    with pytest.raises(ValueError, match="0123abcd"):  # alone, raised as before
        await prepare_all([handle(ScriptedSink("buggy", after(1, ValueError("0123abcd"))))])


async def test_a_timeout_names_the_component(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(StartupError, match="^sink 'stuck': prepare\\(\\) timed out$"):
        await prepare_all([handle(ScriptedSink("stuck", after(60)), timeout=5)])
    assert trio.current_time() == pytest.approx(5)


async def test_one_at_a_time_components_never_wait_against_their_own_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three components that share one serial resource (held 2 s each), 3 s timeout each:
    concurrently the third would wait 4 s and time out; one at a time, all succeed."""
    resource = trio.Lock()

    async def use_resource() -> None:
        async with resource:
            await trio.sleep(2)

    serial = [SerialSink(f"token{i}", use_resource) for i in range(3)]
    other = ScriptedSink("other", after(1))
    await prepare_all([*(handle(s, timeout=3) for s in serial), handle(other)])
    assert trio.current_time() == pytest.approx(6)
    assert {s.outcome for s in [*serial, other]} == {"done"}
    shared = [ScriptedSink(f"token{i}", use_resource) for i in range(3)]
    with pytest.raises(StartupError, match="timed out"):  # the same, prepared together
        await prepare_all([handle(s, timeout=3) for s in shared])


async def test_what_a_cancelled_component_raises_is_not_a_failure(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def noisy_cleanup() -> None:
        try:
            await trio.sleep(20)
        finally:
            raise Misconfigured("cleanup failed")

    failing = ScriptedSink("failing", after(1, Misconfigured("no such thing")))
    noisy = ScriptedSink("noisy", noisy_cleanup)
    assert "noisy" not in await failed_start(caplog, "^sink 'failing'", failing, noisy)
