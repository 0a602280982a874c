"""The parts of one rotation's time, for its "committed" log line: which part a slow rotation
lost its time on (a KME, the peer, the disk, a sink), without a profiler (issue 18)."""

from __future__ import annotations

import trio


class Stopwatch:
    """Laps from a start time, each charged to a named part (a part timed twice adds up)."""

    __slots__ = ("_last", "parts", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self._last = started
        self.parts: dict[str, float] = {}
        """Seconds per part, in the order the parts were first timed."""

    def lap(self, part: str) -> None:
        """Charge the time since the last lap (or the start) to `part`."""
        now = trio.current_time()
        self.parts[part] = self.parts.get(part, 0.0) + (now - self._last)
        self._last = now


def parts_text(parts: dict[str, float]) -> str:
    """`keys 0.0 + reply 2.1 + ... ms`: the parts in milliseconds, for a log message."""
    return " + ".join(f"{name} {1000 * seconds:.1f}" for name, seconds in parts.items()) + " ms"


def parts_ms(parts: dict[str, float]) -> dict[str, float]:
    """The parts in milliseconds, rounded to the microsecond, for a JSON log line."""
    return {name: round(1000 * seconds, 3) for name, seconds in parts.items()}
