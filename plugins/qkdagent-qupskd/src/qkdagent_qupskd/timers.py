"""When to call the peer and when to give up (quPSKd's timers, REFERENCE §11), pure.

quPSKd calls its peer when it has not rotated for `initiator_wait` (120 s) after it was the
caller, or `responder_wait` (130 s) while it was the receiver, so the last caller keeps calling
and the other side steps in only if it stops. After `max_wait` (180 s) without a rotation it
sets a random PSK. Here, additionally, a chain that is not known to match the peer's (no state
yet, after an expiry, after a restart without state) is resynchronised with `/new` at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

RETRY_MIN = 1.0
"""quPSKd retries a failed call after about a second."""
RETRY_MAX = 15.0


@dataclass(frozen=True)
class Waits:
    initiator: float = 120.0
    responder: float = 130.0
    maximum: float = 180.0

    def problem(self) -> str | None:
        if not 0 < self.initiator < self.maximum or not 0 < self.responder < self.maximum:
            return "initiator_wait and responder_wait must be positive and below max_wait"
        return None


class Action(enum.Enum):
    WAIT = "wait"
    CALL = "call"
    EXPIRE = "expire"


@dataclass(frozen=True)
class Decision:
    action: Action
    at: float
    """WAIT: when to decide again; otherwise now."""
    new: bool = False
    """CALL: `/new` (resynchronise) rather than `/rotate`."""


def decide(
    now: float,
    *,
    since: float,
    caller: bool,
    synced: bool,
    waits: Waits,
    retry_at: float | None = None,
) -> Decision:
    """`since`: the last rotation (or start, or expiry); `retry_at`: not before (backoff)."""
    if synced and now - since >= waits.maximum:
        return Decision(Action.EXPIRE, now)
    due = since + (waits.initiator if caller else waits.responder) if synced else since
    if retry_at is not None:
        due = max(due, retry_at)
    if now >= due:
        return Decision(Action.CALL, now, new=not synced)
    wake = min(due, since + waits.maximum) if synced else due
    return Decision(Action.WAIT, wake)


def retry_delay(failures: int) -> float:
    """Backoff after `failures` consecutive failed calls (1 s doubling, capped)."""
    if failures <= 0:
        return 0.0
    return min(RETRY_MIN * 2 ** min(failures - 1, 16), RETRY_MAX)
