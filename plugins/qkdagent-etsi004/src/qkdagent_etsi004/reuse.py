"""Whether to keep a module connection for the next request (binary dialects). Pure: the
caller passes the time and reports what it saw.

004 leaves it to the module: the ETSI reference module closes its side after every answer, the
QUBIP port keeps a connection for as long as the application likes. `persistent = "auto"` keeps
the connection after an answer and lets the next request find out (the caller checks, before
writing anything, whether the module closed it). A module seen closing a kept connection gets a
connection per request from then on: keeping one would only hold a socket the module is about to
close, and writing into a connection the module is closing right then is a request that may or
may not have been executed (one failed attempt, never resent). After `reprobe_after` seconds the
next answer's connection is kept again to look once more, because a module may be restarted or
upgraded into one that keeps connections, and one that closes idle connections after a timeout
looks like one that closes after every request whenever the requests are further apart than that
timeout. A probe costs nothing over a connection per request against a module that still closes:
the next request needs a new connection either way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

REPROBE_AFTER = 300.0
"""Seconds a module seen closing a kept connection gets a connection per request."""


class Persistence(enum.Enum):
    ALWAYS = "true"
    """Keep connections (a closed one is still found out and replaced before writing)."""
    NEVER = "false"
    """A new connection per request, closed after the answer."""
    AUTO = "auto"
    """Keep connections while the module does; a connection per request while it does not."""


class Learned(enum.Enum):
    UNKNOWN = "unknown"
    KEEPS = "keeps connections"
    CLOSES = "closes connections"


@dataclass
class ReusePolicy:
    mode: Persistence
    reprobe_after: float = REPROBE_AFTER
    learned: Learned = Learned.UNKNOWN
    closed_at: float = 0.0
    """When the module was last seen closing a kept connection (`learned` CLOSES)."""

    def keep(self, now: float) -> bool:
        """Whether a connection should be kept after its answer (and reused if still open)."""
        if self.mode is not Persistence.AUTO:
            return self.mode is Persistence.ALWAYS
        if self.learned is not Learned.CLOSES:
            return True
        return now - self.closed_at >= self.reprobe_after

    def saw_close(self, now: float) -> bool:
        """The module closed a connection that was kept for reuse; True if this is news."""
        news = self.learned is not Learned.CLOSES
        self.learned, self.closed_at = Learned.CLOSES, now
        return news

    def saw_reuse(self) -> bool:
        """A kept connection carried another request and its answer; True if this is news."""
        news = self.learned is not Learned.KEEPS
        self.learned = Learned.KEEPS
        return news


def parse_persistent(value: object) -> Persistence | None:
    """The `persistent` option: true, false or "auto"; None for anything else."""
    if value is True:
        return Persistence.ALWAYS
    if value is False:
        return Persistence.NEVER
    if value == "auto":
        return Persistence.AUTO
    return None
