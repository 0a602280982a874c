"""Handles on the agent's sources and sinks: every call to a plugin goes through one.

The wrappers add what every call needs and no plugin should have to write: a timeout, checks
of what came back, and errors that name the component and carry no key bytes. Building,
preparing, running and closing components is `lifecycle.py`'s job.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from .errors import QkdAgentError, SinkError, SourceError, SourceUnavailable
from .interfaces import Answered, KeyMeta, Link, Sink, Source
from .protocol import MAX_ANSWER
from .secret import MAX_KEY_ID_ANY, Key, Secret

if TYPE_CHECKING:
    from .linkprotocol import LinkProtocol

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class SourceHandle:
    id: str
    type: str
    timeout: float
    source: Source
    kind = "source"

    @property
    def component(self) -> Source:
        return self.source

    @property
    def max_key_id(self) -> int:
        return min(self.source.max_key_id, MAX_KEY_ID_ANY)

    @property
    def fetch_ahead(self) -> bool:
        return bool(self.source.fetch_ahead)

    async def offer(self, link: Link, state: bytes | None) -> Key:
        """Initiator: a fresh key, the source seeing the link's committed source state."""
        key = _checked(
            self.id,
            await _guarded("new_key", self.timeout, SourceError, self.source.offer(link, state)),
        )
        if len(key.key_id.encode()) > self.max_key_id:
            raise SourceError(f"source {self.id!r} returned a key ID over its max_key_id")
        return key

    async def answer(self, link: Link, key_id: str, state: bytes | None) -> Answered:
        """Responder: the key the peer's source handed out under `key_id`, with any answer
        and new source state (checked: the right ID, bounded sizes)."""
        answered = await _guarded(
            "key_by_id", self.timeout, SourceError, self.source.answer(link, key_id, state)
        )
        if not isinstance(answered, Answered):
            raise SourceError(f"source {self.id!r} answered {type(answered).__name__}")
        if _checked(self.id, answered.key).key_id != key_id:
            raise SourceError(f"source {self.id!r} returned a different key ID than asked for")
        if len(answered.answer) > MAX_ANSWER:
            raise SourceError(f"source {self.id!r} answered more than {MAX_ANSWER} bytes")
        return Answered(answered.key, answered.answer, _state(self.id, answered.state))

    async def accept_answer(self, link: Link, answer: bytes, state: bytes | None) -> bytes | None:
        """Initiator: the responder's answer; returns the link's new source state."""
        method = self.source.accept_answer
        call = method(link, answer, state)
        if getattr(method, "__func__", None) is Source.accept_answer:
            # a plain source's: it never waits, so it needs no timeout (a cancel scope on
            # every rotation's path), and it raises nothing but `SourceError`
            new = await call
        else:
            new = await _guarded("accept_answer", self.timeout, SourceError, call)
        return _state(self.id, new)


MAX_SOURCE_STATE = 64 * 1024
"""Largest per-link source state the core stores (a KEM private key is a few KiB)."""


def _state(source_id: str, state: object) -> bytes | None:
    if state is not None and not isinstance(state, bytes):
        raise SourceError(f"source {source_id!r} returned a {type(state).__name__} state")
    if state is not None and len(state) > MAX_SOURCE_STATE:
        raise SourceError(f"source {source_id!r} keeps more than {MAX_SOURCE_STATE} bytes")
    return state


def _checked(source_id: str, key: object) -> Key:
    if not isinstance(key, Key):
        raise SourceError(f"source {source_id!r} returned {type(key).__name__}, not a Key")
    return key


@dataclass
class SinkHandle:
    id: str
    label: str
    timeout: float
    sink: Sink
    local_only: bool = False
    kind = "sink"

    @property
    def component(self) -> Sink:
        return self.sink

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        await self._call("install", self.sink.install(link, secret, meta))

    async def erase(self, link: Link, reason: str) -> None:
        await self._call("erase", self.sink.erase(link, reason))

    async def verify(self, link: Link, secret: Secret, meta: KeyMeta) -> bool | None:
        return await self._call("verify", self.sink.verify(link, secret, meta))

    async def _call(self, what: str, coro: Coroutine[Any, Any, T]) -> T:
        return await _guarded(what, self.timeout, SinkError, coro)


async def _guarded(
    what: str, seconds: float, error: type[QkdAgentError], coro: Coroutine[Any, Any, T]
) -> T:
    """Await a plugin call with a timeout; anything but the core's own errors becomes `error`.

    A plugin bug or a library error keeps its type and loses its message: it might quote
    arguments (a secret, or a key a KME sent), and one faulty component must fail its link's
    rotation, not the agent. A timeout of a source is `SourceUnavailable` (retried later).
    Callers name the component (the link logs "source X: ..." / "sink X: ...").
    """
    try:
        with trio.fail_after(seconds):
            return await coro
    except trio.TooSlowError:
        cls = SourceUnavailable if error is SourceError else error
        raise cls(f"{what} timed out after {seconds:g} s") from None
    except QkdAgentError:
        raise
    except Exception as exc:
        raise error(f"{what} failed ({type(exc).__name__})") from None


@dataclass
class Components:
    sources: dict[str, SourceHandle]
    sinks: dict[str, SinkHandle]
    protocols: dict[str, LinkProtocol] = field(default_factory=dict)
    """Link name -> the protocol instance of each link of another protocol (`linkprotocol`)."""

    def handles(self) -> list[Handle]:
        """Every handle, sources first, each in config order."""
        return [*self.sources.values(), *self.sinks.values()]

    def all(self) -> list[Source | Sink]:
        return [h.component for h in self.handles()]


Handle = SourceHandle | SinkHandle
"""One handle type for code that treats sources and sinks alike (prepare, run, close)."""
