"""Key fetches that outlive a cancelled caller.

ETSI 014 keys are single-use: once the KME has sent an answer, dropping it loses the key. Yet the
agent bounds every source call with its own timeout and cancels calls at shutdown, and a caller
must leave *at once* when cancelled (a shielded exchange let a trickling KME hold a call, a
rotation and SIGTERM for tens of seconds). So each key fetch runs as a trio system task under its
own cancel scope and deadline; callers wait on it and leave promptly when cancelled. A fetch that
nobody waits for any more finishes the exchange on the wire (its key is parked for the next
caller) but starts no new one, and `close()` cancels every fetch.

A fetch may serve several callers (one Get key call for several keys): `limit` is how many it
may serve and `claims` what they asked for (key IDs); the source decides who may join (`find`)
and, once the result is in, keeps what no caller still waits for (`park`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

from qkdagent import QkdAgentError, SourceError, SourceUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


class Fetch(Generic[T]):
    """One fetch: its waiters, whether a request is on the wire, and its outcome."""

    def __init__(self, tag: Hashable, limit: int = 1) -> None:
        self.tag = tag
        self.limit = limit
        """How many callers it may serve."""
        self.claims: dict[str, int] = {}
        """What its callers asked for, where each asks for a different thing (a key ID), and how
        many of them still wait for it."""
        self.sealed = False
        """Its request is made: no caller joins for a new key any more."""
        self.answered: set[str] = set()
        """The claims its result answers (fewer than asked for, from some KMEs)."""
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.waiters = 0
        self.on_wire = False
        """True while a request is out: leaving then could lose a key the KME hands out."""
        self.result: T | None = None
        self.error: QkdAgentError | None = None

    @property
    def wanted(self) -> bool:
        """Someone still waits: worth starting another attempt (a retry) for."""
        return self.waiters > 0


class Fetches(Generic[T]):
    """The running fetches of one source, by tag (e.g. the operation and the peer SAE)."""

    def __init__(self, describe: str) -> None:
        self._describe = describe
        self._running: dict[Hashable, list[Fetch[T]]] = {}
        self._closed = False

    def __len__(self) -> int:
        return sum(len(fetches) for fetches in self._running.values())

    def find(self, tag: Hashable, accept: Callable[[Fetch[T]], bool]) -> Fetch[T] | None:
        """A running fetch with this tag that `accept`s one more caller."""
        for fetch in self._running.get(tag, ()):
            if fetch.done.is_set() or fetch.scope.cancel_called:
                continue
            if accept(fetch):
                return fetch
        return None

    def start(
        self,
        tag: Hashable,
        job: Callable[[Fetch[T]], Awaitable[T]],
        park: Callable[[Fetch[T]], None],
        discard: Callable[[T], None],
        *,
        limit: int = 1,
    ) -> Fetch[T]:
        """Run `job` in the background; `park` what of its result the waiters will not take
        (or `discard` it once closed)."""
        if self._closed:
            raise SourceUnavailable(f"{self._describe}: source is closed")
        fetch: Fetch[T] = Fetch(tag, limit)
        self._running.setdefault(tag, []).append(fetch)
        trio.lowlevel.spawn_system_task(self._run, fetch, job, park, discard, name=repr(tag))
        return fetch

    async def wait(self, fetch: Fetch[T]) -> T:
        """Wait for `fetch`; raise its error. Cancellation leaves at once; the fetch goes on
        only while its request is on the wire."""
        fetch.waiters += 1
        try:
            await fetch.done.wait()
        finally:
            fetch.waiters -= 1
            if not fetch.waiters and not fetch.on_wire:
                fetch.scope.cancel()
        if fetch.error is not None:
            raise type(fetch.error)(*fetch.error.args) from None  # a fresh copy per waiter
        assert fetch.result is not None
        return fetch.result

    async def close(self, grace: float = 2.0) -> None:
        """Cancel every fetch and wait (at most `grace` seconds) for them to unwind."""
        self._closed = True
        fetches = [f for running in self._running.values() for f in running]
        for fetch in fetches:
            fetch.scope.cancel()
        with trio.move_on_after(grace, shield=True):
            for fetch in fetches:
                await fetch.done.wait()

    async def _run(
        self,
        fetch: Fetch[T],
        job: Callable[[Fetch[T]], Awaitable[T]],
        park: Callable[[Fetch[T]], None],
        discard: Callable[[T], None],
    ) -> None:
        # A system task must never raise (trio would crash the whole run): every outcome is
        # stored on the fetch for its waiters.
        try:
            with fetch.scope:
                try:
                    result = await job(fetch)
                except QkdAgentError as exc:
                    fetch.error = exc
                except Exception as exc:  # a library bug: its message might quote key bytes
                    log.debug("%s: fetch failed (%s)", self._describe, type(exc).__name__)
                    fetch.error = SourceError(f"{self._describe}: failed ({type(exc).__name__})")
                else:
                    if self._closed:
                        discard(result)
                    else:
                        fetch.result = result
                        park(fetch)
        finally:
            if fetch.result is None and fetch.error is None:  # cancelled
                fetch.error = SourceUnavailable(
                    f"{self._describe}: abandoned (source closed or caller gone)"
                )
            running = self._running.get(fetch.tag, [])
            if fetch in running:
                running.remove(fetch)
            if not running:
                self._running.pop(fetch.tag, None)
            fetch.done.set()
