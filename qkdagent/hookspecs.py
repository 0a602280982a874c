"""Every hook qkdagent calls, in one place.

Hooks are synchronous and cheap: they register types, services and commands, or observe events.
None of them may block or do I/O; I/O belongs in the async methods of the objects they register.
Implementations take only the arguments they need (pluggy passes them by name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from .commands import CommandRegistry, DemoLink
    from .events import ComponentEvent, EraseEvent, RotationErrorEvent, RotationEvent
    from .interfaces import PluginContext, Sink, Source
    from .services import Service

PROJECT = "qkdagent"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qkdagent_register_sources(register: Callable[[type[Source]], None]) -> None:
    """Called once at start-up: call `register(cls)` for every `Source` subclass you provide.

    A type name registered twice stops start-up with an error naming both distributions.
    """


@hookspec
def qkdagent_register_sinks(register: Callable[[type[Sink]], None]) -> None:
    """Called once at start-up: call `register(cls)` for every `Sink` subclass you provide."""


@hookspec
def qkdagent_register_services(register: Callable[[Service], None], context: PluginContext) -> None:
    """Called when an agent starts: `register(Service(name, run))` for long-running tasks.

    `run(task_status=...)` is started with `nursery.start` inside the agent's own nursery, must call
    `task_status.started()` once ready, and is cancelled when the agent stops.
    """


@hookspec
def qkdagent_add_commands(cli: CommandRegistry) -> None:
    """Add CLI subcommands with `cli.add(name, help=..., configure=..., run=...)`.

    Called only for the plugin that declares the command under the `qkdagent.commands`
    entry-point group, so invoking one command never imports unrelated plugins.
    """


@hookspec
def qkdagent_after_rotation(event: RotationEvent) -> None:
    """Called after a rotation committed on this side and its sinks were installed."""


@hookspec
def qkdagent_on_rotation_error(event: RotationErrorEvent) -> None:
    """Called after a rotation attempt failed; the link stays on its previous epoch."""


@hookspec
def qkdagent_after_erase(event: EraseEvent) -> None:
    """Called after the sinks of a link were erased (start-up, reject_after, resync, removal)."""


@hookspec
def qkdagent_on_component_event(event: ComponentEvent) -> None:
    """Called when a source or sink reports something outside a rotation (`context.report`)."""


@hookspec(firstresult=True)
def qkdagent_demo_link(directory: Path) -> DemoLink | None:
    """Offer the key source `qkdagent demo` runs through (e.g. two simulated KMEs).

    Called only for the plugin declared under the `qkdagent.demo` entry-point group. Return a
    `DemoLink`: a service to start (the simulators) and the `[sources.*]` tables for alice and bob;
    files it needs (PKI) go under `directory`. firstresult: the first non-None answer is used.
    """
