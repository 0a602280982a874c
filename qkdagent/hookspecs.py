"""Every hook qkdagent calls, in one place (DESIGN §3).

Hooks are synchronous and cheap: they register types, services and commands, or observe events.
None of them may block or do I/O; I/O belongs in the async methods of the objects they register.
Implementations take only the arguments they need (pluggy passes them by name). The core calls
them through `qkdagent.hooks.Hooks`, one typed method per spec.

Each spec's docstring says, on labelled lines, when it is called (`When:`), its parameters
(`Parameters:`), whether the first non-None answer wins (`Result:`, "firstresult") and what an
exception in an implementation does (`Exception:`); `tests/test_hookspecs.py` checks that.
Two policies: an exception in a registration hook stops the start (a `PluginError` naming the
plugin); an exception in an observation hook is logged by type and place, never stops the
agent, and the other observers still run.
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
    from .linkprotocol import LinkProtocol
    from .services import Service

PROJECT = "qkdagent"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qkdagent_register_sources(register: Callable[[type[Source]], None]) -> None:
    """Declare the source types this plugin provides.

    When: once, as the plugin is loaded (agent start, `qkdagent check`), only for plugins named
    in the config (`[agent] plugins`) or built in.
    Parameters: `register(cls)` takes a `Source` subclass with a unique `type_name`.
    Result: none; every implementation is called.
    Exception: start-up stops with a `PluginError` naming the plugin; so does registering a
    non-`Source`, a class without `type_name`, or a type name another distribution registered.
    """


@hookspec
def qkdagent_register_sinks(register: Callable[[type[Sink]], None]) -> None:
    """Declare the sink types this plugin provides.

    When: once, as the plugin is loaded (agent start, `qkdagent check`).
    Parameters: `register(cls)` takes a `Sink` subclass with a unique `type_name`.
    Result: none; every implementation is called.
    Exception: start-up stops with a `PluginError` naming the plugin (as for sources).
    """


@hookspec
def qkdagent_register_link_protocols(register: Callable[[type[LinkProtocol]], None]) -> None:
    """Declare a peer protocol other than qkdagent's own, for links with `protocol = "<name>"`.

    For migration only (DESIGN v2 §3): a link keeps qkdagent's sources, sinks, durable state
    and fail-closed erase, while the protocol talks to a system that cannot be upgraded yet.
    When: once, as the plugin is loaded (agent start, `qkdagent check`).
    Parameters: `register(cls)` takes a `LinkProtocol` subclass with a unique `protocol_name`.
    Result: none; every implementation is called.
    Exception: start-up stops with a `PluginError` naming the plugin (as for sources).
    """


@hookspec
def qkdagent_register_services(register: Callable[[Service], None], context: PluginContext) -> None:
    """Add long-running tasks to an agent (a simulator, an exporter): `register(Service(...))`.

    When: once per agent start, after its components are prepared, before it serves peers.
    Background work of one source or sink belongs in that component's `run()` instead.
    Parameters: `register` takes a `Service(name, run)`; `run(task_status=...)` is started with
    `nursery.start` in the agent's nursery, must call `task_status.started()` once ready and is
    cancelled when the agent stops. `context` is the agent's `PluginContext` (its name, state
    dir and `stash`).
    Result: none; every implementation is called.
    Exception: the agent does not start (`PluginError` naming the plugin); an exception in a
    service's `run` stops the agent.
    """


@hookspec
def qkdagent_add_commands(cli: CommandRegistry) -> None:
    """Add CLI subcommands: `cli.add(name, help=..., configure=..., run=...)`.

    When: when `qkdagent NAME` runs, only for the plugin that declares NAME under the
    `qkdagent.commands` entry-point group, so invoking one command never imports unrelated
    plugins.
    Parameters: `cli` is the `CommandRegistry` to add to; adding a name twice raises.
    Result: none; every implementation is called.
    Exception: `qkdagent NAME` fails with a `PluginError` naming the plugin (exit 1).
    """


@hookspec
def qkdagent_after_rotation(event: RotationEvent) -> None:
    """Observe a rotation that committed on this side.

    When: after the new epoch is durable and this side's sinks were installed (a failed sink
    is listed in `event.failed_sinks`); on both the initiator and the responder.
    Parameters: `event` is a `RotationEvent` (link, epoch, key IDs, role, duration, sinks),
    never key bytes.
    Result: none; every implementation is called.
    Exception: logged by type and place; the agent and the other observers carry on.
    """


@hookspec
def qkdagent_on_rotation_error(event: RotationErrorEvent) -> None:
    """Observe a failed rotation attempt; the link stays on its previous epoch and retries.

    When: after an attempt failed at a stage ("source", "peer", "confirm", "install", "state",
    "internal"), on the side that saw the failure.
    Parameters: `event` is a `RotationErrorEvent` (link, epoch kept, stage, a reason without key
    material).
    Result: none; every implementation is called.
    Exception: logged by type and place; the agent and the other observers carry on.
    """


@hookspec
def qkdagent_after_erase(event: EraseEvent) -> None:
    """Observe a fail-closed erase of a link's sinks.

    When: after the sinks of a link were erased: at start-up before a first key ("startup"),
    when the key grew older than `reject_after`, on a resync, or when a reload removed the
    link ("removed").
    Parameters: `event` is an `EraseEvent` (link, epoch, reason, the sinks erased).
    Result: none; every implementation is called.
    Exception: logged by type and place; the agent and the other observers carry on.
    """


@hookspec
def qkdagent_on_component_event(event: ComponentEvent) -> None:
    """Observe something a source or sink reported outside a rotation.

    When: each time a component calls `context.report(event)` (a credential an operator's
    reload removed and the sink put back, a background task that failed, ...).
    Parameters: `event` is the `ComponentEvent` (component, kind, detail, link), never key bytes.
    Result: none; every implementation is called.
    Exception: logged by type and place; the agent and the other observers carry on.
    """


@hookspec(firstresult=True)
def qkdagent_demo_link(directory: Path) -> DemoLink | None:
    """Offer the key source `qkdagent demo` runs through (e.g. two simulated KMEs).

    When: by `qkdagent demo --source NAME` (or `auto`), only for the plugin declared under the
    `qkdagent.demo` entry-point group.
    Parameters: `directory` is the demo's working directory; files the link needs (PKI) go
    under it.
    Result: firstresult: the first non-None `DemoLink` (a service that runs the simulators and
    the `[sources.*]` tables for alice and bob) is used.
    Exception: the demo fails with a `PluginError` naming the hook (exit 1).
    """
