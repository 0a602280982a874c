"""What a link needs from its agent, handed over once as one frozen object.

Built by the agent after the state store and the peer client are open, so a link never holds
an optional store or client, never reaches back into the agent, and the agent and the link
modules do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from .events import ComponentEvent, EraseEvent, RotationErrorEvent, RotationEvent
from .observability import Metrics
from .state import StateStore
from .timers import LinkTimers
from .transport import PeerPoster


class Observers(Protocol):
    """The observation hooks a link calls (each logs a failing observer and never raises)."""

    def after_rotation(self, event: RotationEvent) -> None: ...

    def on_rotation_error(self, event: RotationErrorEvent) -> None: ...

    def after_erase(self, event: EraseEvent) -> None: ...


@dataclass(frozen=True)
class LinkEnv:
    agent_name: str
    store: StateStore
    client: PeerPoster
    metrics: Metrics
    observers: Observers
    report: Callable[[ComponentEvent], None]
    """Turns a ComponentEvent into a log line, a metric, a hook call and a /status entry."""
    rotation_slots: trio.CapacityLimiter
    """Bounds concurrent initiator rotations of the agent (and its connections to peers)."""
    rotation_timeout: float
    timers: LinkTimers
    """Wakes the links whose timer is due (one task for all of them)."""
