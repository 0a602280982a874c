"""Building and running one source or sink in a test exactly as the agent does.

    sink = build_component(WireGuardSink, {"interface": "wg0", ...}, state_dir=tmp_path)
    async with running(sink):             # prepare(), run() started, then cancelled, aclose()
        await sink.install(link, secret, meta)

The agent constructs a component from its config table (`Options` with located errors, unknown
keys refused by `finish()`), sets `links` before `prepare()`, starts `run()` after it and
cancels that task before `aclose()`. Tests that do the same by hand drift from the agent; these
two helpers are that sequence, once.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from ..interfaces import Link, PluginContext, Sink, Source
from ..options import Options

C = TypeVar("C", bound="Source | Sink")


def build_component(
    cls: type[C],
    options: Mapping[str, Any],
    *,
    name: str = "x",
    context: PluginContext | None = None,
    links: tuple[Link, ...] = (),
    agent: str = "alice",
    state_dir: Path | None = None,
) -> C:
    """Construct `cls` from a config table as the agent would, without preparing it.

    `options` is the `[sources.NAME]`/`[sinks.NAME]` table; its `type` key, if any, must name
    `cls`. Unknown keys raise `ConfigError`, as in `qkdagent check`. Without `context`, the
    component gets `PluginContext(agent, state_dir)` (a fresh temporary directory if
    `state_dir` is None, removed when the process exits).
    """
    table = dict(options)
    declared = table.pop("type", cls.type_name)
    if declared != cls.type_name:
        raise ValueError(f"options say type {declared!r}, but {cls.__name__} is {cls.type_name!r}")
    section = "sources" if issubclass(cls, Source) else "sinks"
    if context is None:
        directory = state_dir or _temporary_dir()
        context = PluginContext(agent_name=agent, state_dir=directory)
    opts = Options(table, where=f"{section}.{name}")
    component = cls(name, opts, context)
    opts.finish()
    component.links = tuple(links)
    return component


def _temporary_dir() -> Path:
    """A fresh directory, removed when the process exits (a test run made hundreds)."""
    directory = Path(tempfile.mkdtemp(prefix="qkdagent-test-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside nested single-member groups, or None if there are several."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup):
        if len(inner.exceptions) != 1:
            return None
        inner = inner.exceptions[0]
    return inner


@asynccontextmanager
async def running(*components: Source | Sink) -> AsyncIterator[None]:
    """Prepare `components` in order, start each one's `run()` task, and on exit cancel the
    tasks and `aclose()` every component (also one whose `prepare()` failed or never ran).

    A lone exception (from `prepare()`, a task or the body) propagates as itself, not wrapped
    in an exception group, so `pytest.raises(SinkError)` around the body works.
    """
    try:
        for component in components:
            await component.prepare()
        async with trio.open_nursery() as nursery:
            for component in components:
                await nursery.start(component.run)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        single = _single(group)
        if single is None:
            raise
        raise single from None
    finally:
        with trio.move_on_after(60) as bound:  # bounded, and not cut short by the test's end
            bound.shield = True
            for component in components:
                await component.aclose()


__all__ = ["build_component", "running"]
