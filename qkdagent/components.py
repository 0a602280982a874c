"""Turning `[sources.*]` / `[sinks.*]` tables into plugin instances, and calling them safely.

The wrappers add what every call needs and no plugin should have to write: a timeout, logging
without key bytes, and errors that name the component.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from .config import AgentConfig, ComponentConfig
from .errors import ConfigError, QkdAgentError, SinkError, SourceError, SourceUnavailable
from .interfaces import KeyMeta, Link, PluginContext, Sink, Source
from .plugins import Plugins
from .secret import Key, Secret

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class SourceHandle:
    id: str
    type: str
    timeout: float
    source: Source

    async def new_key(self, link: Link) -> Key:
        key = await _guarded("new_key", self.timeout, SourceError, self.source.new_key(link))
        return _checked(self.id, key)

    async def key_by_id(self, link: Link, key_id: str) -> Key:
        key = await _guarded(
            "key_by_id", self.timeout, SourceError, self.source.key_by_id(link, key_id)
        )
        key = _checked(self.id, key)
        if key.key_id != key_id:
            raise SourceError(f"source {self.id!r} returned a different key ID than asked for")
        return key


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

    def all(self) -> list[Source | Sink]:
        return [h.source for h in self.sources.values()] + [h.sink for h in self.sinks.values()]


def build_components(config: AgentConfig, plugins: Plugins, context: PluginContext) -> Components:
    """Instantiate every configured source and sink (options validated, no I/O yet)."""
    sources = {
        cid: SourceHandle(cid, c.type, c.timeout, _make(c, plugins.sources, context, "source"))
        for cid, c in config.sources.items()
    }
    sinks = {
        cid: SinkHandle(
            cid, c.label, c.timeout, _make(c, plugins.sinks, context, "sink"), c.local_only
        )
        for cid, c in config.sinks.items()
    }
    return Components(sources, sinks)


def _make(
    component: ComponentConfig,
    table: dict[str, tuple[type], str] | dict,
    context: PluginContext,
    what: str,
) -> object:
    entry = table.get(component.type)
    if entry is None:
        known = ", ".join(sorted(table)) or "none"
        raise component.options.error(
            "type",
            f"unknown {what} type {component.type!r} (known: {known}; is its plugin listed in "
            "[agent] plugins?)",
        )
    cls = entry[0]
    try:
        instance = cls(component.id, component.options, context)
    except ConfigError:
        raise
    except Exception as exc:
        # Only the type: a plugin's message might quote a value it read (a secret file, say).
        # Plugins report option problems as ConfigError (options.error), which passes above.
        raise component.options.error(
            "type", f"{cls.__name__} rejected its options ({type(exc).__name__})"
        ) from None
    component.options.finish()
    return instance
