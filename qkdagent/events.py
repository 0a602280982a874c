"""Observation events for hooks: IDs, epochs, times and reasons, never key bytes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RotationEvent:
    """A rotation committed on this side and its sinks were installed."""

    link: str
    epoch: int
    key_ids: tuple[str, ...]
    initiator: bool
    duration: float
    """Seconds from the start of the rotation to the last install on this side."""
    sinks: tuple[str, ...]
    failed_sinks: tuple[str, ...] = ()


@dataclass(frozen=True)
class RotationErrorEvent:
    """A rotation attempt failed; the link stays on `epoch`."""

    link: str
    epoch: int
    stage: str
    """Where it failed: "source", "peer", "confirm", "install", "state"."""
    error: str
    """A human-readable reason without key material."""


@dataclass(frozen=True)
class EraseEvent:
    """The link's sinks were erased (fail closed)."""

    link: str
    epoch: int
    reason: str
    """"startup" (no key yet), "reject_after", "resync" or "removed"."""
    sinks: tuple[str, ...]


@dataclass(frozen=True)
class ComponentEvent:
    """Something a source or sink noticed outside a rotation, e.g. a credential an operator's
    reload removed and the sink put back. Reported with `context.report(event)`."""

    component: str
    """The instance name from the config (`[sinks.NAME]` or `[sources.NAME]`)."""
    kind: str
    """A short machine-readable word: "repaired", "reinstall_failed", ..."""
    detail: str
    """A human-readable description without key material."""
    link: str | None = None
