"""Typed calls of the hooks in `hookspecs`: the only way the core calls into plugins' hooks.

One method per hook, so a caller cannot misspell a hook name or pass a wrong argument, and the
two error policies of DESIGN §3 live in one place:

- registration hooks (`register_*`, `add_commands`, `demo_link`) run while the agent or a
  command starts; an exception in one stops that start with a `PluginError` naming the plugin;
- observation hooks (`after_rotation`, `on_rotation_error`, `after_erase`,
  `on_component_event`) never raise: each implementation is called on its own, and one that
  raises is logged by exception type and place (never its message, which might quote anything)
  while the others still run.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from .errors import PluginError

if TYPE_CHECKING:
    from .commands import CommandRegistry, DemoLink
    from .events import ComponentEvent, EraseEvent, RotationErrorEvent, RotationEvent
    from .interfaces import PluginContext, Sink, Source
    from .linkprotocol import LinkProtocol
    from .services import Service

log = logging.getLogger(__name__)

OBSERVATION_HOOKS = (
    "qkdagent_after_rotation",
    "qkdagent_on_rotation_error",
    "qkdagent_after_erase",
    "qkdagent_on_component_event",
)


def _where(exc: BaseException) -> str:
    """`file:line` of the innermost frame that raised, to find the bug without the message."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


class Hooks:
    """The hook relay of one plugin manager, one typed method per hook spec."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm

    # -- registration: an exception stops the start ------------------------------------------

    def register_sources(
        self, register: Callable[[type[Source]], None], *, plugin: str | None = None
    ) -> None:
        """Each plugin (or only `plugin`) calls `register(cls)` for its source types."""
        self._register("qkdagent_register_sources", plugin, register=register)

    def register_sinks(
        self, register: Callable[[type[Sink]], None], *, plugin: str | None = None
    ) -> None:
        """Each plugin (or only `plugin`) calls `register(cls)` for its sink types."""
        self._register("qkdagent_register_sinks", plugin, register=register)

    def register_link_protocols(
        self, register: Callable[[type[LinkProtocol]], None], *, plugin: str | None = None
    ) -> None:
        """Each plugin (or only `plugin`) calls `register(cls)` for its link protocols."""
        self._register("qkdagent_register_link_protocols", plugin, register=register)

    def register_services(self, context: PluginContext) -> list[Service]:
        """The services every plugin registers for the agent `context` describes."""
        services: list[Service] = []
        self._register(
            "qkdagent_register_services", None, register=services.append, context=context
        )
        return services

    def add_commands(self, cli: CommandRegistry) -> None:
        self._register("qkdagent_add_commands", None, cli=cli)

    def demo_link(self, directory: Path) -> DemoLink | None:
        """The first demo link a plugin offers (firstresult)."""
        try:
            result: DemoLink | None = self._pm.hook.qkdagent_demo_link(directory=directory)
        except Exception as exc:
            raise PluginError(f"qkdagent_demo_link failed: {type(exc).__name__}: {exc}") from exc
        return result

    def _register(self, name: str, plugin: str | None, **kwargs: Any) -> None:
        for impl in reversed(getattr(self._pm.hook, name).get_hookimpls()):
            if plugin is not None and impl.plugin_name != plugin:
                continue
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: {name} failed: {type(exc).__name__}: {exc}"
                ) from exc

    # -- observation: never raises -----------------------------------------------------------

    def after_rotation(self, event: RotationEvent) -> None:
        self._observe("qkdagent_after_rotation", event)

    def on_rotation_error(self, event: RotationErrorEvent) -> None:
        self._observe("qkdagent_on_rotation_error", event)

    def after_erase(self, event: EraseEvent) -> None:
        self._observe("qkdagent_after_erase", event)

    def on_component_event(self, event: ComponentEvent) -> None:
        self._observe("qkdagent_on_component_event", event)

    def _observe(self, name: str, event: object) -> None:
        caller = getattr(self._pm.hook, name)
        impls = caller.get_hookimpls()
        if any(impl.wrapper or impl.hookwrapper for impl in impls):
            # wrappers need pluggy's own call loop; one failure then skips the rest
            self._guarded(name, "(with wrappers)", partial(caller, event=event))
            return
        for impl in reversed(impls):  # pluggy's call order
            kwargs = {arg: event for arg in impl.argnames}  # `event`, or nothing
            self._guarded(name, impl.plugin_name, partial(impl.function, **kwargs))

    @staticmethod
    def _guarded(name: str, plugin: str, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception as exc:
            log.error(
                "%s observer of plugin %r failed: %s at %s",
                name,
                plugin,
                type(exc).__qualname__,
                _where(exc),
                extra={"plugin": plugin, "hook": name, "error_type": type(exc).__qualname__},
            )


__all__ = ["OBSERVATION_HOOKS", "Hooks"]
