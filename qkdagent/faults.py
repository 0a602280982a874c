"""Crash injection for the crash-and-restart tests.

`QKDAGENT_CRASH_AT=<point>` in the environment makes the process exit abruptly (`os._exit`, as a
kill -9 would: no cleanup, no flush) when the rotation reaches that point. Unset, `crash_point()`
is a dictionary-free no-op. The points are listed in `POINTS`.
"""

from __future__ import annotations

import os

POINTS = (
    "initiator:keys-fetched",
    "initiator:reply-received",
    "initiator:committed",
    "initiator:installed",
    "responder:keys-fetched",
    "responder:pending-stored",
    "responder:committed",
    "responder:acknowledged",
    "responder:installed",
)
CRASH_EXIT_CODE = 86
_crash_at = os.environ.get("QKDAGENT_CRASH_AT") or None


def crash_point(name: str) -> None:
    if _crash_at is not None and name == _crash_at:
        os._exit(CRASH_EXIT_CODE)
