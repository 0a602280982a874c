"""Loading plugins: only those named, from entry points, one plugin manager per agent.

A root daemon must not run code from every installed distribution, so nothing is imported unless
the config (or the command line) names it. A named plugin that fails to import, and a type name
registered twice, stop start-up with a message naming the distribution(s) involved.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .hooks import Hooks
from .interfaces import Sink, Source
from .linkprotocol import LinkProtocol

log = logging.getLogger(__name__)

PLUGIN_GROUP = "qkdagent.plugins"
COMMAND_GROUP = "qkdagent.commands"
DEMO_GROUP = "qkdagent.demo"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str


def _dist(ep: md.EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return ("(unknown distribution)", "?")
    return (dist.name, dist.version)


def installed(group: str = PLUGIN_GROUP) -> dict[str, md.EntryPoint]:
    """Entry points of a group by name, read from metadata without importing anything."""
    found: dict[str, md.EntryPoint] = {}
    for ep in md.entry_points(group=group):
        if ep.name in found and found[ep.name].value != ep.value:
            raise PluginError(
                f"plugin name {ep.name!r} is provided by both {_dist(found[ep.name])[0]} and "
                f"{_dist(ep)[0]}; uninstall one of them"
            )
        found[ep.name] = ep
    return found


def describe_installed() -> list[PluginInfo]:
    return [PluginInfo(name, *_dist(ep), ep.value) for name, ep in sorted(installed().items())]


class Plugins:
    """The plugin manager of one agent (or one CLI command), with its registered types."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.hooks = Hooks(self.pm)
        """Typed hook calls: `plugins.hooks.after_rotation(event)`, never hook-name strings."""
        self.loaded: dict[str, PluginInfo] = {}
        self.sources: dict[str, tuple[type[Source], str]] = {}
        self.sinks: dict[str, tuple[type[Sink], str]] = {}
        self.link_protocols: dict[str, tuple[type[LinkProtocol], str]] = {}

    def load(self, names: Iterable[str], *, group: str = PLUGIN_GROUP) -> None:
        available = installed(group)
        for name in names:
            if name in self.loaded:
                continue
            ep = available.get(name)
            if ep is None:
                hint = f"pip install qkdagent-{name}" if group == PLUGIN_GROUP else "install it"
                raise PluginError(f"plugin {name!r} is not installed ({hint})")
            dist, version = _dist(ep)
            try:
                module = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {name!r} from {dist} {version} failed to import: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self.add(name, module, dist, version)

    def add(self, name: str, module: ModuleType | object, dist: str, version: str = "") -> None:
        """Register an already imported plugin object (also used by tests)."""
        try:
            self.pm.register(module, name=name)
        except ValueError as exc:
            raise PluginError(f"plugin {name!r} from {dist} cannot be registered: {exc}") from exc
        info = PluginInfo(name, dist, version, getattr(module, "__name__", repr(module)))
        self.loaded[name] = info
        self._register_types(name, info)

    def _register_types(self, plugin: str, info: PluginInfo) -> None:
        for table, base, attr, call in (
            (self.sources, Source, "type_name", self.hooks.register_sources),
            (self.sinks, Sink, "type_name", self.hooks.register_sinks),
            (
                self.link_protocols,
                LinkProtocol,
                "protocol_name",
                self.hooks.register_link_protocols,
            ),
        ):

            def register(
                cls: Any, table: dict = table, base: type = base, attr: str = attr
            ) -> None:
                if not (isinstance(cls, type) and issubclass(cls, base)):
                    raise PluginError(f"{info.distribution} registered {cls!r}, not a {base}")
                type_name = getattr(cls, attr, None)
                if not isinstance(type_name, str) or not type_name or type_name == "native":
                    raise PluginError(f"{info.distribution}: {cls.__name__} has no {attr}")
                if type_name in table and table[type_name][0] is not cls:
                    raise PluginError(
                        f"{base.__name__.lower()} type {type_name!r} is registered by both "
                        f"{table[type_name][1]} and {info.distribution}"
                    )
                table[type_name] = (cls, info.distribution)

            call(register, plugin=plugin)
