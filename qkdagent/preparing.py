"""Prepare an agent's components together, with errors that do not depend on timing.

A gateway may configure one sink per peer: 1,000 WireGuard sinks prepared one after another
took 4.6 s (each lists the whole device), while prepared together they share a few device
round trips. Components whose class sets `concurrent_prepare = False` (they queue on one
serial resource, such as a PKCS#11 worker thread) are prepared one at a time instead, in
config order, so a prepare's timeout never counts the time spent waiting behind the others.

The error raised is the one of the first failed component in config order. Once a component
has failed, components later in the config are cancelled (their result could not change
which error is raised); other failures that did complete are logged.
"""

from __future__ import annotations

import logging

import trio

from .components import SinkHandle, SourceHandle
from .errors import QkdAgentError, StartupError
from .interfaces import Sink, Source

log = logging.getLogger(__name__)

LIMIT = 64
"""Components prepared at the same time."""


Handle = SourceHandle | SinkHandle


def _describe(handle: Handle) -> tuple[str, Source | Sink]:
    if isinstance(handle, SourceHandle):
        return "source", handle.source
    return "sink", handle.sink


async def prepare_all(handles: list[Handle]) -> None:
    """Prepare every component; raise the first failure in config order (see module doc)."""
    errors: dict[int, Exception] = {}
    scopes = [trio.CancelScope() for _ in handles]
    limiter = trio.CapacityLimiter(LIMIT)

    async def prepare(index: int) -> None:
        handle = handles[index]
        kind, obj = _describe(handle)
        with scopes[index]:
            async with limiter:
                try:
                    with trio.fail_after(handle.timeout):
                        await obj.prepare()
                    return
                except trio.TooSlowError:
                    error: Exception = StartupError(f"{kind} {handle.id!r}: prepare() timed out")
                except QkdAgentError as exc:
                    error = StartupError(f"{kind} {handle.id!r}: {exc}")
                    error.__cause__ = exc
                except Exception as exc:  # a plugin bug: re-raised as is, as before
                    error = exc
        if scopes[index].cancel_called:  # cancelled: what it raised on the way out is moot
            return
        errors[index] = error
        for later in scopes[index + 1 :]:
            later.cancel()

    async def one_at_a_time(indexes: list[int]) -> None:
        for index in indexes:
            await prepare(index)

    serial = [i for i, h in enumerate(handles) if not _describe(h)[1].concurrent_prepare]
    async with trio.open_nursery() as nursery:
        if serial:
            nursery.start_soon(one_at_a_time, serial)
        for index in sorted(set(range(len(handles))) - set(serial)):
            nursery.start_soon(prepare, index)
    if not errors:
        return
    first = min(errors)
    for index, error in sorted(errors.items())[1:]:
        if not isinstance(error, QkdAgentError):  # a plugin bug's text might quote a key
            kind, _ = _describe(handles[index])
            error = StartupError(f"{kind} {handles[index].id!r}: {type(error).__name__}")
        log.error("also failed to start: %s", error)
    raise errors[first]
