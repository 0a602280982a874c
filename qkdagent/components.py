"""Turning `[sources.*]` / `[sinks.*]` tables into plugin instances, and calling them safely.

The wrappers add what every call needs and no plugin should have to write: a timeout, logging
without key bytes, and errors that name the component.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from .config import AgentConfig, ComponentConfig
from .errors import ConfigError, QkdAgentError, SinkError, SourceError, SourceUnavailable
from .interfaces import KeyMeta, Link, PluginContext, Sink, Source
from .plugins import Plugins
from .secret import Key, Secret

log = logging.getLogger(__name__)


@dataclass
class SourceHandle:
    id: str
    type: str
    timeout: float
    source: Source

    async def new_key(self, link: Link) -> Key:
        try:
            with trio.fail_after(self.timeout):
                key = await self.source.new_key(link)
        except trio.TooSlowError:
            raise SourceUnavailable(f"source {self.id!r}: new_key timed out") from None
        return _checked(self.id, key)

    async def key_by_id(self, link: Link, key_id: str) -> Key:
        try:
            with trio.fail_after(self.timeout):
                key = await self.source.key_by_id(link, key_id)
        except trio.TooSlowError:
            raise SourceUnavailable(f"source {self.id!r}: key_by_id timed out") from None
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

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        await self._call("install", self.sink.install(link, secret, meta))

    async def erase(self, link: Link, reason: str) -> None:
        await self._call("erase", self.sink.erase(link, reason))

    async def verify(self, link: Link, secret: Secret, meta: KeyMeta) -> bool | None:
        with trio.fail_after(self.timeout):
            return await self.sink.verify(link, secret, meta)

    async def _call(self, what: str, coro: object) -> None:
        try:
            with trio.fail_after(self.timeout):
                await coro  # type: ignore[misc]
        except trio.TooSlowError:
            raise SinkError(
                f"sink {self.id!r}: {what} timed out after {self.timeout:g} s"
            ) from None
        except QkdAgentError:
            raise
        except Exception as exc:
            # A plugin bug or a library error: keep the type, drop the message (it might quote
            # arguments, and the secret is one of them).
            raise SinkError(f"sink {self.id!r}: {what} failed ({type(exc).__name__})") from None


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
        cid: SinkHandle(cid, c.label, c.timeout, _make(c, plugins.sinks, context, "sink"))
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
        raise component.options.error(
            "type", f"{cls.__name__} rejected its options: {type(exc).__name__}: {exc}"
        ) from exc
    component.options.finish()
    return instance
