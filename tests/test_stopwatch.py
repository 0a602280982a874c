"""The parts of a rotation's time (`qkdagent.stopwatch`), under trio's virtual clock."""

from __future__ import annotations

import trio
import trio.testing

from qkdagent.stopwatch import Stopwatch, parts_ms, parts_text


async def test_each_lap_is_charged_to_its_part_and_a_part_timed_twice_adds_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started = trio.current_time()
    await trio.sleep(0.5)  # before the watch exists: still counted from `started`
    watch = Stopwatch(started)
    watch.lap("keys")
    await trio.sleep(1.25)
    watch.lap("reply")
    await trio.sleep(0.25)
    watch.lap("keys")  # a resync fetches keys again
    watch.lap("store")
    assert watch.parts == {"keys": 0.75, "reply": 1.25, "store": 0.0}
    assert parts_ms(watch.parts) == {"keys": 750.0, "reply": 1250.0, "store": 0.0}
    assert parts_text(watch.parts) == "keys 750.0 + reply 1250.0 + store 0.0 ms"


def test_parts_in_ms_are_rounded_to_the_microsecond() -> None:
    assert parts_ms({"a": 0.0012344, "b": 1.0000006}) == {"a": 1.234, "b": 1000.001}
