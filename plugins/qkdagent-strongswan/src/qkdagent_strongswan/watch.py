"""The periodic PPK check, run as an agent service.

The core gives sinks no background task of their own, but it passes one `PluginContext` per
agent to every sink and to `qkdagent_register_services`. Each sink enrols itself in that
context's `extras` (a weak set, so sinks dropped by a config reload fall out); the service
registered by this plugin then calls `check_once()` on every live sink when its
`check_interval` is due. Scheduling is a pure function (`due`), tested without trio.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import trio

from qkdagent import PluginContext, QkdAgentError, Service

if TYPE_CHECKING:
    from .sink import StrongswanPpkSink

log = logging.getLogger(__name__)
EXTRAS_KEY = "qkdagent_strongswan.sinks"
IDLE = 10.0
"""Seconds between looks when no sink is enrolled (a config reload may add one)."""


def enrol(context: PluginContext, sink: StrongswanPpkSink) -> None:
    sinks = context.extras.setdefault(EXTRAS_KEY, weakref.WeakSet())
    sinks.add(sink)


def enrolled(context: PluginContext) -> list[StrongswanPpkSink]:
    sinks = context.extras.get(EXTRAS_KEY)
    return [s for s in list(sinks or ()) if not s.closed]


def due(now: float, last: dict[Any, float], sinks: Iterable[Any]) -> tuple[list[Any], float]:
    """Which sinks to check now, and when to look next. `last` maps sink → last check time."""
    todo, wake = [], now + IDLE
    for sink in sinks:
        interval = sink.config.check_interval
        next_at = last.get(sink, now - interval) + interval
        if next_at <= now:
            todo.append(sink)
            next_at = now + interval
        wake = min(wake, next_at)
    return todo, wake


async def watch(context: PluginContext, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run every enrolled sink's `check_once()` at its interval until cancelled."""
    task_status.started()
    last: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
    first = {s: trio.current_time() for s in enrolled(context)}
    last.update(first)  # the agent just installed or erased: first check one interval later
    while True:
        now = trio.current_time()
        todo, wake = due(now, dict(last), enrolled(context))
        for sink in todo:
            last[sink] = now
            try:
                await sink.check_once()
            except QkdAgentError as exc:
                log.warning("sink %s: PPK check failed: %s", sink.name, exc)
        await trio.sleep_until(wake)


def service(context: PluginContext) -> Service:
    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await watch(context, task_status=task_status)

    return Service("strongswan-ppk-check", run)
