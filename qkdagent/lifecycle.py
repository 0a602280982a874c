"""Component lifecycle, in one place: build, assign links, prepare, run, close, plan a reload.

- **Build** (`build_components`): every `[sources.*]`/`[sinks.*]` table becomes a plugin
  instance behind a handle; options are validated, no I/O (`qkdagent check` stops here).
- **Assign** (`assign_links`): each component learns which links use it, before `prepare()`.
- **Prepare** (`prepare_all`): concurrently, 64 at a time. 1,000 WireGuard sinks prepared one
  after another took 4.6 s (each lists the whole device); together they share a few device
  round trips. Components whose class sets `concurrent_prepare = False` (one serial resource,
  such as a PKCS#11 worker thread) go one at a time, so a prepare's timeout never counts the
  wait behind the others. The error raised is the first failed component's in config order;
  once one failed, those later in the config are cancelled; other failures are logged.
- **Run** (`ComponentTasks`): a component that defines `run(*, task_status)` gets one
  supervised task after `prepare()`: the agent waits for `task_status.started()`, cancels the
  task before `aclose()` and when a reload replaces or drops the component, and restarts it
  after a backoff if it raises (logged by type and place only: its message might quote a key).
- **Close** (`close_all`): each one, a failure named by type, the others still closed.
- **Reload** (`plan_reload`): a pure comparison of two configs; the agent applies the plan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from .components import Components, Handle, SinkHandle, SourceHandle
from .config import BUILTIN_PLUGINS, AgentConfig, ComponentConfig
from .errors import ConfigError, QkdAgentError, StartupError, named, raised_at
from .events import ComponentEvent
from .interfaces import Link, PluginContext, Sink, Source, _Configurable
from .linkprotocol import LinkProtocol
from .metricstore import PluginMetrics
from .plugins import Plugins

log = logging.getLogger(__name__)

RESTART_MIN = 1.0
RESTART_MAX = 60.0
START_TIMEOUT = 30.0
"""How long a component's task may take to call `task_status.started()`."""

Component = Source | Sink


def has_task(component: Component) -> bool:
    """Whether the component's class defines its own `run()`."""
    return type(component).run is not _Configurable.run


@dataclass
class _Running:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class ComponentTasks:
    """The running `run()` tasks of an agent's components, keyed by component object."""

    def __init__(self, report: Callable[[ComponentEvent], None]) -> None:
        self._report = report
        self._running: dict[int, _Running] = {}

    async def start(self, nursery: trio.Nursery, components: Iterable[Component]) -> None:
        """Start the task of every component that has one; return once each has started."""
        for component in components:
            if has_task(component) and id(component) not in self._running:
                running = _Running()
                self._running[id(component)] = running
                with trio.fail_after(START_TIMEOUT):
                    await nursery.start(self._supervise, component, running)

    async def stop(self, components: Iterable[Component]) -> None:
        """Cancel the tasks of these components and wait until they have ended."""
        stopping = [self._running.pop(id(c)) for c in components if id(c) in self._running]
        for running in stopping:
            running.scope.cancel()
        for running in stopping:
            await running.done.wait()

    async def _supervise(
        self,
        component: Component,
        running: _Running,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        delay = RESTART_MIN
        status = OnceStarted(task_status)
        try:
            with running.scope:
                while True:
                    try:
                        await component.run(task_status=status)
                        return
                    except Exception as exc:
                        self._failed(component, exc, delay)
                    status.started()  # a first run that failed before it started
                    await trio.sleep(delay)
                    delay = min(delay * 2, RESTART_MAX)
        finally:
            running.done.set()

    def _failed(self, component: Component, exc: Exception, delay: float) -> None:
        where = raised_at(exc)
        detail = f"its task raised {type(exc).__name__}{where}; restarting in {delay:g} s"
        self._report(ComponentEvent(component.name, "task_failed", detail))


class OnceStarted:
    """A task status whose `started()` may be called again (by a restarted task): only the
    first call reaches the agent (also a foreign link's protocol task's)."""

    def __init__(self, inner: trio.TaskStatus[None]) -> None:
        self._inner = inner
        self._done = False

    def started(self, value: None = None) -> None:
        if not self._done:
            self._done = True
            self._inner.started(value)


# -- build -------------------------------------------------------------------------------------


def load_components(
    config: AgentConfig,
    *,
    plugins: Plugins | None = None,
    reporter: Callable[[ComponentEvent], None] | None = None,
    metrics: PluginMetrics | None = None,
) -> tuple[Plugins, PluginContext, Components]:
    """Load the plugins the config names (and the built-in ones), make the plugin context and
    build every component: what `qkdagent check` validates is what `run` starts with."""
    plugins = plugins or Plugins()
    plugins.load((*BUILTIN_PLUGINS, *config.agent.plugins))
    context = PluginContext(
        config.agent.name,
        config.agent.state_dir,
        config.file,
        reporter=reporter,
        metrics=metrics or PluginMetrics(),
    )
    return plugins, context, build_components(config, plugins, context)


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
    return Components(sources, sinks, build_protocols(config, plugins, context))


def build_protocols(
    config: AgentConfig, plugins: Plugins, context: PluginContext
) -> dict[str, LinkProtocol]:
    """One protocol instance per link of another protocol (options validated, no I/O). A
    protocol that does not authenticate its peer needs the link's explicit `insecure = true`."""
    built: dict[str, LinkProtocol] = {}
    for name, link in config.links.items():
        if link.native:
            continue
        options = link.protocol_options
        assert options is not None  # config.py sets it for every link of another protocol
        entry = plugins.link_protocols.get(link.protocol)
        if entry is None:
            known = ", ".join(sorted(plugins.link_protocols)) or "none"
            raise options.error(
                "protocol",
                f"unknown link protocol {link.protocol!r} (known: native, {known}; is its "
                "plugin listed in [agent] plugins?)",
            )
        cls = entry[0]
        if not cls.authenticated and not link.insecure:
            raise options.error(
                "insecure",
                f"protocol {link.protocol!r} does not authenticate its peer: anyone on the path "
                "can read key IDs and reset or split the chain. Set insecure = true to accept "
                "that while migrating",
            )
        try:
            built[name] = cls(name, options, context)
        except ConfigError:
            raise
        except Exception as exc:  # only the type: the message might quote an option's value
            raise options.error(
                "protocol", f"{cls.__name__} rejected its options ({type(exc).__name__})"
            ) from None
        options.finish()
    return built


def _make(
    component: ComponentConfig, table: dict[str, Any], context: PluginContext, what: str
) -> Any:
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


def assign_links(components: Components, config: AgentConfig) -> None:
    """Tell each component which links use it (set again after every reload)."""
    users: dict[str, list[Link]] = {}
    for cfg in config.links.values():
        link = Link(cfg.name, config.agent.name, cfg.peer, cfg.initiator)
        for cid in (*cfg.sources, *cfg.sinks):
            users.setdefault(cid, []).append(link)
    for handle in components.handles():
        handle.component.links = tuple(users.get(handle.id, ()))


# -- prepare -----------------------------------------------------------------------------------

PREPARE_LIMIT = 64
"""Components prepared at the same time."""


async def prepare_all(handles: list[Handle]) -> None:
    """Prepare every component; raise the first failure in config order (see module doc)."""
    errors: dict[int, Exception] = {}
    scopes = [trio.CancelScope() for _ in handles]
    limiter = trio.CapacityLimiter(PREPARE_LIMIT)

    async def prepare(index: int) -> None:
        handle = handles[index]
        with scopes[index]:
            async with limiter:
                try:
                    with trio.fail_after(handle.timeout):
                        await handle.component.prepare()
                    return
                except trio.TooSlowError:
                    error: Exception = StartupError(
                        f"{handle.kind} {handle.id!r}: prepare() timed out"
                    )
                except QkdAgentError as exc:
                    error = StartupError(named(handle.kind, handle.id, exc))
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

    serial = [i for i, h in enumerate(handles) if not h.component.concurrent_prepare]
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
            handle = handles[index]
            error = StartupError(f"{handle.kind} {handle.id!r}: {type(error).__name__}")
        log.error("also failed to start: %s", error)
    raise errors[first]


# -- close -------------------------------------------------------------------------------------


async def close_all(components: Iterable[Component]) -> None:
    """Close each component; one failing (named by type only) does not stop the others."""
    for component in components:
        try:
            await component.aclose()
        except Exception as exc:
            log.warning("closing %r failed: %s", component, type(exc).__name__)


# -- reload ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReloadPlan:
    """What a new config changes, by name; the agent applies it (`Agent.reload`)."""

    changed_components: frozenset[str]
    """Sources and sinks that are new or configured differently: built and prepared anew."""
    dropped_components: frozenset[str]
    """Sources and sinks no longer in the config: closed once nothing uses them."""
    added_links: tuple[str, ...]
    removed_links: tuple[str, ...]
    """Links gone from the config: stopped, their sinks erased, their state dropped."""
    changed_links: tuple[str, ...]
    """Links configured differently, or using a changed component: restarted (state kept)."""
    agent_settings_changed: bool
    """`[agent]` changes need a restart; they are not applied."""


def component_key(component: ComponentConfig | None) -> object:
    """What identifies a component's configuration (two equal keys: the same component)."""
    if component is None:
        return None
    return (
        component.type,
        component.label,
        component.timeout,
        component.local_only,
        component.options.snapshot(),
    )


def plan_reload(old: AgentConfig, new: AgentConfig) -> ReloadPlan:
    """Compare two configs: which components and links a reload builds, restarts or drops."""
    old_components = {**old.sources, **old.sinks}
    new_components = {**new.sources, **new.sinks}
    changed = frozenset(
        cid
        for cid, component in new_components.items()
        if component_key(component) != component_key(old_components.get(cid))
    )
    dropped = frozenset(cid for cid in old_components if cid not in new_components)
    old_links, new_links = old.links, new.links
    return ReloadPlan(
        changed_components=changed,
        dropped_components=dropped,
        added_links=tuple(n for n in new_links if n not in old_links),
        removed_links=tuple(n for n in old_links if n not in new_links),
        changed_links=tuple(
            n
            for n, cfg in new_links.items()
            if n in old_links
            and (cfg != old_links[n] or any(c in changed for c in (*cfg.sources, *cfg.sinks)))
        ),
        agent_settings_changed=new.agent != old.agent,
    )
