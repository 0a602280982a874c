"""The running agent: plugins, components, state, peer server, status server and link tasks.

Structured concurrency: one nursery holds the servers and plugin services, an inner one the link
loops. Shutdown stops scheduling, lets in-flight rotations finish within `drain_timeout`, then
cancels; the peer server stays up meanwhile so the peer can still commit.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from . import __version__
from .components import Components, build_components
from .config import BUILTIN_PLUGINS, AgentConfig, LinkConfig, load_config
from .errors import ProtocolError
from .events import ComponentEvent
from .identity import PeerIdentity
from .interfaces import Link, PluginContext, Sink, Source
from .lifecycle import ComponentTasks
from .link import LinkRuntime
from .observability import Metrics, StatusApp
from .peering import PeerClient
from .peerserver import ServerLimits, serve_peers
from .plugins import Plugins
from .preparing import prepare_all
from .services import Service, start_services
from .state import StateStore

log = logging.getLogger(__name__)


@dataclass
class _LinkTask:
    runtime: LinkRuntime
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class Agent:
    def __init__(
        self, config: AgentConfig, *, plugins: Plugins | None = None, network: Any = None
    ) -> None:
        """`network` (a `qkdagent.testing.LocalNetwork`) replaces HTTPS for virtual-clock tests."""
        self.config = config
        self.settings = config.agent
        self.name = config.agent.name
        self.plugins = plugins or Plugins()
        self.plugins.load((*BUILTIN_PLUGINS, *self.settings.plugins))
        self.metrics = Metrics()
        self.recent_events: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        self.context = PluginContext(
            self.name, self.settings.state_dir, config.file, reporter=self.report
        )
        self.components: Components = build_components(config, self.plugins, self.context)
        self.rotation_slots = trio.CapacityLimiter(self.settings.max_parallel_rotations)
        """Bounds concurrent initiator rotations, so 10,000 links due at once do not open
        10,000 connections and requests to the peer and the sources."""
        self.links: dict[str, _LinkTask] = {}
        self._erasing: dict[str, LinkRuntime] = {}
        """Links a reload removed whose fail-closed erase failed and is being retried."""
        self.store: StateStore | None = None  # type: ignore[assignment]
        self.client: PeerClient | None = None  # type: ignore[assignment]
        self.peer_urls: list[str] = []
        self.status_urls: list[str] = []
        self._links_nursery: trio.Nursery | None = None
        self._stopping = False
        self._peer_calls = 0
        """Peer requests being handled; shutdown waits for them (bounded by drain_timeout)."""
        self._peer_idle = trio.Event()
        self.tasks = ComponentTasks(self.report)
        """The components' background tasks (`run()`)."""
        self._servers: trio.Nursery | None = None
        self.network = network
        self._closed = False

    @classmethod
    def from_file(cls, path: str) -> Agent:
        return cls(load_config(path))

    # -- running -----------------------------------------------------------------------------

    async def run(
        self,
        *,
        shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
        task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.store = StateStore(self.settings.state_dir, threaded=self.network is None)
        try:
            await self._prepare_components(self.components)
            self.client = (
                self.network.client(PeerIdentity(dns=(self.name,)))
                if self.network
                else PeerClient(self.settings.tls, connections=self.settings.max_parallel_rotations)
            )
            async with trio.open_nursery() as servers:
                self._servers = servers
                if self.network is None:  # threaded store: checkpoints run in the background
                    await servers.start(self.store.scrub_log)
                await self.tasks.start(servers, self.components.all())
                services: list[Service] = []
                self.plugins.hook.qkdagent_register_services(
                    register=services.append, context=self.context
                )
                await start_services(servers, services)
                if self.network is not None:
                    self.peer_urls = [f"https://{self.settings.listen}"]
                    self.network.attach(
                        self.peer_urls[0], self._handle_peer, PeerIdentity(dns=(self.name,))
                    )
                else:
                    self.peer_urls = await servers.start(self._serve_peers)
                if self.settings.status_listen is not None and self.network is None:
                    self.status_urls = await servers.start(self._serve_status)
                drained_by = trio.current_time()
                async with trio.open_nursery() as links:
                    self._links_nursery = links
                    await self._start_links(list(self.config.links.values()))
                    log.info(
                        "agent %s ready: %d links, peer API %s",
                        self.name,
                        len(self.links),
                        ", ".join(self.peer_urls),
                    )
                    task_status.started(self)
                    await (shutdown_trigger or trio.sleep_forever)()
                    log.info("agent %s stopping: draining in-flight rotations", self.name)
                    self._stopping = True
                    drained_by = trio.current_time() + self.settings.drain_timeout
                    for task in self.links.values():
                        task.runtime.stop()
                    links.cancel_scope.deadline = drained_by
                # Responder work too: a commit being installed finishes (same deadline).
                with trio.move_on_at(drained_by):
                    while self._peer_calls:
                        await self._peer_idle.wait()
                servers.cancel_scope.cancel()
        finally:
            self._closed = True
            if self.network is not None:
                self.network.detach(f"https://{self.settings.listen}")
            with trio.move_on_after(5, shield=True):
                await self._close_components(self.components)
                if self.client is not None:
                    await self.client.aclose()
            self.store.close()
        log.info("agent %s stopped", self.name)

    async def _prepare_components(
        self, components: Components, config: AgentConfig | None = None
    ) -> None:
        self._assign_links(components, config or self.config)
        await prepare_all([*components.sources.values(), *components.sinks.values()])

    def _assign_links(self, components: Components, config: AgentConfig) -> None:
        users: dict[str, list[Link]] = {}
        for cfg in config.links.values():
            link = Link(cfg.name, self.name, cfg.peer, cfg.initiator)
            for cid in (*cfg.sources, *cfg.sinks):
                users.setdefault(cid, []).append(link)
        for cid, handle in components.sources.items():
            handle.source.links = tuple(users.get(cid, ()))
        for cid, sink_handle in components.sinks.items():
            sink_handle.sink.links = tuple(users.get(cid, ()))

    async def _close_components(self, components: Components) -> None:
        await _close_all(components.all())

    async def _serve_peers(self, task_status: trio.TaskStatus[list[str]]) -> None:
        settings = self.settings
        limits = ServerLimits(
            max_connections=settings.max_connections,
            max_per_address=settings.max_connections_per_address,
            handshake_timeout=settings.handshake_timeout,
            request_timeout=settings.request_timeout,
        )
        await serve_peers(
            self._handle_peer,
            listen=settings.listen,
            tls=settings.tls,
            limits=limits,
            metrics=self.metrics,
            task_status=task_status,
        )

    async def _serve_status(self, task_status: trio.TaskStatus[list[str]]) -> None:
        assert self.settings.status_listen is not None
        config = HypercornConfig()
        config.bind = [str(self.settings.status_listen)]
        config.errorlog = logging.getLogger("qkdagent.http")
        config.graceful_timeout = 0.5
        await serve(
            StatusApp(self.describe, self.metrics),  # type: ignore[arg-type]
            config,
            shutdown_trigger=trio.sleep_forever,
            task_status=task_status,
        )

    async def _handle_peer(
        self, link: str, action: str, body: bytes, identity: PeerIdentity
    ) -> bytes:
        task = self.links.get(link)
        if self._closed or (self._stopping and action != "commit"):
            # While draining only commits are taken: they finish rotations already under way.
            raise ProtocolError("agent is shutting down", status=503)
        if task is None:
            raise ProtocolError("unknown link", status=404)
        if not self._peer_calls:
            self._peer_idle = trio.Event()
        self._peer_calls += 1
        try:
            return await task.runtime.handle(action, body, identity)
        finally:
            self._peer_calls -= 1
            if not self._peer_calls:
                self._peer_idle.set()

    async def _start_links(self, configs: list[LinkConfig]) -> None:
        """Open links concurrently (their state writes share group commits), then start them."""
        runtimes: list[LinkRuntime] = []
        limiter = trio.CapacityLimiter(64)

        async def open_one(config: LinkConfig) -> None:
            async with limiter:
                runtime = LinkRuntime(self, config)
                await runtime.open()
                runtimes.append(runtime)

        async with trio.open_nursery() as nursery:
            for config in configs:
                nursery.start_soon(open_one, config)
        for runtime in sorted(runtimes, key=lambda r: r.name):
            await self._run_link(runtime)

    async def _run_link(self, runtime: LinkRuntime) -> None:
        assert self._links_nursery is not None
        task = _LinkTask(runtime)
        self.links[runtime.name] = task

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with task.scope:
                    await _isolated(runtime, task_status)
            finally:
                task.done.set()

        await self._links_nursery.start(run)

    async def _stop_link(self, name: str, *, erase: bool) -> None:
        task = self.links.pop(name)
        task.runtime.stop()
        async with task.runtime.lock:
            task.scope.cancel()
        await task.done.wait()
        if erase:
            runtime = task.runtime
            await runtime.erase_sinks("removed")
            assert self.store is not None
            await self.store.run(self.store.drop, name)
            self.metrics.forget(name)
            if runtime.erase_failed and self._links_nursery is not None:
                # The link is gone from the config, not its old key from the consumer.
                self._erasing[name] = runtime
                self._links_nursery.start_soon(self._retry_removed_erase, runtime)

    async def _retry_removed_erase(self, runtime: LinkRuntime) -> None:
        """Retry a removed link's failed erase with its backoff until it succeeds; then close
        the sinks that only it still held (a reload leaves them open meanwhile)."""
        timing = runtime.config.timing
        delay = timing.backoff_min
        try:
            while runtime.erase_failed:
                await trio.sleep(delay)
                delay = min(delay * 2, timing.backoff_max)
                await runtime.retry_erase()
            self.metrics.forget(runtime.name)
        finally:
            if self._erasing.get(runtime.name) is runtime:
                del self._erasing[runtime.name]
            live = {id(h.sink) for h in self.components.sinks.values()}
            held = {id(h.sink) for r in self._erasing.values() for h in r.sinks}
            orphans = [h.sink for h in runtime.sinks if id(h.sink) not in live | held]
            with trio.move_on_after(5, shield=True):
                await self.tasks.stop(orphans)
                await _close_all(orphans)

    # -- reload ------------------------------------------------------------------------------

    async def reload(self, new: AgentConfig) -> dict[str, list[str]]:
        """Apply a new config: links added, removed or changed without a restart.

        `[agent]` settings (name, listener, TLS, state dir, plugins) need a restart and are
        kept as they are; a warning says so.
        """
        if new.agent != self.settings:
            log.warning("config reload: [agent] changes need a restart; they are not applied")
        plugins = self.plugins
        components = build_components(new, plugins, self.context)
        changed_components = {
            cid
            for cid, c in {**new.sources, **new.sinks}.items()
            if _component_key(c)
            != _component_key(self.config.sources.get(cid) or self.config.sinks.get(cid))
        }
        # keep the live instances of unchanged components, prepare the new ones
        fresh = Components(
            {
                cid: (self.components.sources[cid] if cid not in changed_components else h)
                for cid, h in components.sources.items()
            },
            {
                cid: (self.components.sinks[cid] if cid not in changed_components else h)
                for cid, h in components.sinks.items()
            },
        )
        new_only = Components(
            {c: h for c, h in fresh.sources.items() if c in changed_components},
            {c: h for c, h in fresh.sinks.items() if c in changed_components},
        )
        try:
            await self._prepare_components(new_only, new)
            if self._servers is not None:
                await self.tasks.start(self._servers, new_only.all())
        except BaseException:  # the reload is refused: nothing new stays open
            with trio.move_on_after(5, shield=True):
                await self.tasks.stop(new_only.all())
            with trio.move_on_after(5, shield=True):
                await self._close_components(new_only)
            raise
        old_links, new_links = self.config.links, new.links
        removed = [n for n in old_links if n not in new_links]
        added = [n for n in new_links if n not in old_links]
        changed = [
            n
            for n in new_links
            if n in old_links
            and (
                new_links[n] != old_links[n]
                or any(
                    c in changed_components for c in (*new_links[n].sources, *new_links[n].sinks)
                )
            )
        ]
        for name in removed:
            await self._stop_link(name, erase=True)
        for name in changed:
            await self._stop_link(name, erase=False)
        old_components = self.components
        self.components = fresh
        self.config = AgentConfig(new.file, self.settings, new.links, new.sources, new.sinks)
        self._assign_links(fresh, self.config)
        await self._start_links([new_links[name] for name in [*changed, *added]])
        erasing = {id(h.sink) for r in self._erasing.values() for h in r.sinks}
        stale = [
            h.source if hasattr(h, "source") else h.sink
            for cid, h in {**old_components.sources, **old_components.sinks}.items()
            if (cid in changed_components or cid not in {**fresh.sources, **fresh.sinks})
            and id(getattr(h, "sink", None)) not in erasing  # closed once their erase is done
        ]
        await self.tasks.stop(stale)
        await _close_all(stale)
        summary = {"added": added, "removed": removed, "changed": changed}
        log.info("config reloaded: %s", summary)
        return summary

    # -- observation -------------------------------------------------------------------------

    def notify(self, hook: str, event: object) -> None:
        try:
            getattr(self.plugins.hook, hook)(event=event)
        except Exception:
            log.exception("a %s hook implementation failed", hook)

    def report(self, event: ComponentEvent) -> None:
        """A component's out-of-rotation event: log, count, hook (never key bytes)."""
        where = f" (link {event.link})" if event.link else ""
        log.warning(
            "%s: %s%s: %s", event.component, event.kind, where, event.detail,
            extra={"component": event.component, "kind": event.kind, "link": event.link},
        )  # fmt: skip
        self.metrics.component_events.labels(event.component, event.kind).inc()
        self.recent_events.append({"time": time.time(), **dataclasses.asdict(event)})
        self.notify("qkdagent_on_component_event", event)

    def link(self, name: str) -> LinkRuntime:
        return self.links[name].runtime

    def describe(self) -> dict[str, Any]:
        return {
            "agent": self.name,
            "version": __version__,
            "time": time.time(),
            "peer_api": self.peer_urls,
            "links": [t.runtime.describe() for t in self.links.values()],
            "removed_links_erase_failed": {
                name: sorted(r.erase_failed) for name, r in self._erasing.items()
            },
            "recent_component_events": list(self.recent_events),
        }


LINK_RESTART_MIN = 1.0
LINK_RESTART_MAX = 60.0


async def _isolated(runtime: LinkRuntime, task_status: trio.TaskStatus[None]) -> None:
    """Run a link's loop so that nothing it raises stops the agent or the other links.

    An exception here is a bug (the loop handles every expected failure itself): it is logged
    by type and place (its message might quote a key), and the loop restarts after a backoff.
    """
    task_status.started()
    delay = LINK_RESTART_MIN
    while True:
        try:
            await runtime.run()
            return
        except Exception as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
            log.error(
                "link %s: unexpected %s%s; the link restarts in %g s (a bug)",
                runtime.name, type(exc).__name__, where, delay,
                extra={"link": runtime.name, "stage": "internal"},
            )  # fmt: skip
            runtime.status.last_error = f"internal: unexpected {type(exc).__name__}"
            runtime.status.last_error_at = time.time()
        await trio.sleep(delay)
        delay = min(delay * 2, LINK_RESTART_MAX)


def _component_key(component: Any) -> Any:
    if component is None:
        return None
    return (
        component.type,
        component.label,
        component.timeout,
        component.local_only,
        component.options.snapshot(),
    )


async def _close_all(objects: Iterable[Source | Sink]) -> None:
    """Close each component; one failing (named by type only) does not stop the others."""
    for obj in objects:
        try:
            await obj.aclose()
        except Exception as exc:
            log.warning("closing %r failed: %s", obj, type(exc).__name__)
