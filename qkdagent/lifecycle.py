"""Component lifecycle: the background tasks of components (DESIGN v2 §3 `run()`).

A component that defines `run(*, task_status)` gets one supervised task in the agent's nursery
after `prepare()`: the agent waits for `task_status.started()`, cancels the task before
`aclose()` and when a reload replaces or drops the component, and restarts it after a backoff
if it raises (a plugin bug, logged by type and place only: its message might quote a key).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from .events import ComponentEvent
from .interfaces import Sink, Source, _Configurable

log = logging.getLogger(__name__)

RESTART_MIN = 1.0
RESTART_MAX = 60.0
START_TIMEOUT = 30.0
"""How long a component's task may take to call `task_status.started()`."""

Component = Source | Sink


def has_task(component: Component) -> bool:
    """Whether the component's class defines its own `run()`."""
    return type(component).run is not _Configurable.run


@dataclass
class _Running:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class ComponentTasks:
    """The running `run()` tasks of an agent's components, keyed by component object."""

    def __init__(self, report: Callable[[ComponentEvent], None]) -> None:
        self._report = report
        self._running: dict[int, _Running] = {}

    async def start(self, nursery: trio.Nursery, components: Iterable[Component]) -> None:
        """Start the task of every component that has one; return once each has started."""
        for component in components:
            if has_task(component) and id(component) not in self._running:
                running = _Running()
                self._running[id(component)] = running
                with trio.fail_after(START_TIMEOUT):
                    await nursery.start(self._supervise, component, running)

    async def stop(self, components: Iterable[Component]) -> None:
        """Cancel the tasks of these components and wait until they have ended."""
        stopping = [self._running.pop(id(c)) for c in components if id(c) in self._running]
        for running in stopping:
            running.scope.cancel()
        for running in stopping:
            await running.done.wait()

    async def _supervise(
        self,
        component: Component,
        running: _Running,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        delay = RESTART_MIN
        status = _OnceStarted(task_status)
        try:
            with running.scope:
                while True:
                    try:
                        await component.run(task_status=status)
                        return
                    except Exception as exc:
                        self._failed(component, exc, delay)
                    status.started()  # a first run that failed before it started
                    await trio.sleep(delay)
                    delay = min(delay * 2, RESTART_MAX)
        finally:
            running.done.set()

    def _failed(self, component: Component, exc: Exception, delay: float) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        detail = f"its task raised {type(exc).__name__}{where}; restarting in {delay:g} s"
        self._report(ComponentEvent(component.name, "task_failed", detail))


class _OnceStarted:
    """A task status whose `started()` may be called again (by a restarted task): only the
    first call reaches the agent."""

    def __init__(self, inner: trio.TaskStatus[None]) -> None:
        self._inner = inner
        self._done = False

    def started(self, value: None = None) -> None:
        if not self._done:
            self._done = True
            self._inner.started(value)
