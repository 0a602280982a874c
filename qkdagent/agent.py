"""The running agent: plugins, components, state, the transport's servers and the link tasks.

Structured concurrency: one nursery holds the servers, plugin services and component tasks, an
inner one the links: one `LinkTimers` task wakes every native link and runs each link's due work
in a task of its own; a link of another protocol has its own task. Shutdown stops scheduling,
lets in-flight rotations finish within
`drain_timeout`, then cancels; the peer server stays up meanwhile so the peer can still commit.
A shutdown asked for during start-up (a SIGTERM while components prepare) ends the start-up.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import trio

from . import __version__
from .components import Components
from .config import AgentConfig, LinkConfig
from .errors import ProtocolError, ReloadFailed, raised_at
from .events import ComponentEvent
from .foreignlink import ForeignLinkRuntime, insecure_warning
from .identity import PeerIdentity
from .lifecycle import (
    ComponentTasks,
    assign_links,
    build_components,
    close_all,
    load_components,
    plan_reload,
    prepare_all,
)
from .link import LINK_RESTART_MAX, LINK_RESTART_MIN, BaseLink, LinkRuntime
from .linkenv import LinkEnv
from .observability import Metrics, StatusApp
from .peering import ReplyNow
from .plugins import Plugins
from .responder import NOT_A_PEER
from .services import start_services
from .state import (
    USED_KEY_ID_PRUNE_MAX,
    StateStore,
    used_ids_footprint,
    used_ids_room_warning,
)
from .timers import LinkTimers
from .transport import HttpsTransport, PeerPoster, Transport

log = logging.getLogger(__name__)

LINK_OPEN_LIMIT = 64


@dataclass(frozen=True)
class _Running:
    """What a running agent's links and reloads need."""

    env: LinkEnv
    links: trio.Nursery
    servers: trio.Nursery


@dataclass
class _Retiring:
    """A link runtime that no longer runs but still retries erasing some of its sinks."""

    runtime: BaseLink
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass
class _LinkTask:
    """A link with a task of its own (another protocol's; native links have none: the agent's
    `LinkTimers` wakes them)."""

    runtime: BaseLink
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        plugins: Plugins | None = None,
        transport: Transport | None = None,
    ) -> None:
        """`transport` defaults to HTTPS with mutual TLS; the test kit passes an in-process one
        (`qkdagent.testing.LocalNetwork`) for virtual-clock tests."""
        self.config = config
        self.settings = config.agent
        self.name = config.agent.name
        self.metrics = Metrics()
        self.recent_events: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        self.plugins, self.context, self.components = load_components(
            config, plugins=plugins, reporter=self.report, metrics=self.metrics.plugins
        )
        self.hooks = self.plugins.hooks
        self.transport: Transport = transport or HttpsTransport(self.settings)
        self.tasks = ComponentTasks(self.report)
        """The components' background tasks (`run()`)."""
        self.links: dict[str, BaseLink] = {}
        self._tasks: dict[str, _LinkTask] = {}
        """The links that run a task of their own (`BaseLink.timed_by_agent` false)."""
        self._erasing: dict[int, _Retiring] = {}
        """Retired link runtimes (by id) whose fail-closed erase failed and is retried."""
        self.peer_urls: list[str] = []
        self.status_urls: list[str] = []
        self._stopping = False
        self._peer_calls = 0
        """Peer requests being handled; shutdown waits for them (bounded by drain_timeout)."""
        self._peer_idle = trio.Event()
        self._closed = False
        self._running: _Running | None = None
        self._reconfiguring: frozenset[str] = frozenset()
        """Links a reload is restarting: between the old runtime and the new, their peer gets
        a 503 (try again), not a 404 (a commit it would not resend)."""

    # -- running -----------------------------------------------------------------------------

    async def run(
        self,
        *,
        shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
        task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        stop = trio.Event()
        store = StateStore(
            self.settings.state_dir,
            threaded=self.transport.threaded_state,
            keep_used_ids=self.settings.used_key_ids_kept,
        )
        client: PeerPoster | None = None
        try:
            async with trio.open_nursery() as servers:
                starting = trio.CancelScope()

                async def watch_shutdown() -> None:
                    await (shutdown_trigger or trio.sleep_forever)()
                    stop.set()
                    starting.cancel()  # a SIGTERM during start-up ends the start-up

                servers.start_soon(watch_shutdown)
                with starting:
                    await self._prepare(self.components, self.config)
                    client = self.transport.client()
                    await servers.start(client.run)
                    env = self._env(store, client)
                    if store.threaded:  # checkpoints run in the background
                        await servers.start(store.scrub_log)
                    await self.tasks.start(servers, self.components.all())
                    await self._start_services(servers)
                    self.peer_urls = await servers.start(
                        self.transport.serve_peers,
                        self._handle_peer,
                        self.metrics,
                        self._is_peer,
                        self._serves,
                    )
                    self.status_urls = await servers.start(
                        self.transport.serve_status, StatusApp(self._status, self.metrics)
                    )
                if not starting.cancelled_caught:
                    await self._run_links(servers, env, stop, task_status)
                servers.cancel_scope.cancel()
        finally:
            self._closed = True
            with trio.move_on_after(5, shield=True):
                await close_all(self.components.all())
                if client is not None:
                    await client.aclose()
            store.close()
        log.info("agent %s stopped", self.name)

    async def _run_links(
        self,
        servers: trio.Nursery,
        env: LinkEnv,
        stop: trio.Event,
        task_status: trio.TaskStatus[Agent],
    ) -> None:
        drained_by = trio.current_time()
        async with trio.open_nursery() as links:
            self._running = _Running(env, links, servers)
            await links.start(env.timers.run)
            await self._start_links(list(self.config.links.values()))
            await self._check_state_room()
            log.info(
                "agent %s ready: %d links, peer API %s",
                self.name,
                len(self.links),
                ", ".join(self.peer_urls),
            )
            task_status.started(self)
            await stop.wait()
            log.info("agent %s stopping: draining in-flight rotations", self.name)
            self._stopping = True
            drained_by = trio.current_time() + self.settings.drain_timeout
            for runtime in self.links.values():
                runtime.stop()
            env.timers.stop()
            links.cancel_scope.deadline = drained_by
        # Responder work too: a commit being installed finishes (same deadline).
        with trio.move_on_at(drained_by):
            while self._peer_calls:
                await self._peer_idle.wait()

    @property
    def store(self) -> StateStore:
        """The running agent's state store (tests inspect it)."""
        return self._state().env.store

    @property
    def client(self) -> PeerPoster:
        """The running agent's client to its peers."""
        return self._state().env.client

    def _state(self) -> _Running:
        if self._running is None:
            raise RuntimeError("the agent is not running")
        return self._running

    def _env(self, store: StateStore, client: PeerPoster) -> LinkEnv:
        return LinkEnv(
            agent_name=self.name,
            store=store,
            client=client,
            metrics=self.metrics,
            observers=self.hooks,
            report=self.report,
            # Bounds concurrent initiator rotations, so 10,000 links due at once do not open
            # 10,000 connections and requests to the peer and the sources.
            rotation_slots=trio.CapacityLimiter(self.settings.max_parallel_rotations),
            rotation_timeout=self.settings.rotation_timeout,
            timers=LinkTimers(self.settings.max_parallel_rotations),
        )

    async def _prepare(self, components: Components, config: AgentConfig) -> None:
        assign_links(components, config)
        await prepare_all(components.handles())

    async def _start_services(self, nursery: trio.Nursery) -> None:
        await start_services(nursery, self.hooks.register_services(self.context))

    def _is_peer(self, identity: PeerIdentity) -> bool:
        """Whether a client certificate names the peer of one of the configured links."""
        return any(self._serves(identity, name) for name in self.config.links)

    def _serves(self, identity: PeerIdentity, link: str) -> bool:
        """Whether a client certificate names the peer of `link`, a native link (a link of
        another protocol admits nobody to the peer API)."""
        config = self.config.links.get(link)
        return config is not None and config.native and identity.matches(config.peer_identity)

    async def _handle_peer(
        self,
        link: str,
        action: str,
        body: bytes,
        identity: PeerIdentity,
        reply_now: ReplyNow | None = None,
    ) -> bytes:
        runtime = self.links.get(link)
        if runtime is not None and not runtime.config.native:
            runtime = None  # served by its own protocol: to the peer API it does not exist
        if self._closed or (self._stopping and action != "commit"):
            # While draining only commits are taken: they finish rotations already under way.
            raise ProtocolError("agent is shutting down", status=503)
        if runtime is None:
            # Only a configured peer may learn which link names exist here: anyone else gets
            # the answer a link with another peer would give.
            if not self._is_peer(identity):
                raise ProtocolError(
                    f"client certificate names {identity.describe()}, no peer of this agent",
                    status=403,
                    body=NOT_A_PEER,
                )
            if link in self._reconfiguring:
                raise ProtocolError("link is being reconfigured", status=503)
            raise ProtocolError("unknown link", status=404)
        if not self._peer_calls:
            self._peer_idle = trio.Event()
        self._peer_calls += 1
        try:
            return await runtime.handle(action, body, identity, reply_now)
        finally:
            self._peer_calls -= 1
            if not self._peer_calls:
                self._peer_idle.set()

    # -- links -------------------------------------------------------------------------------

    async def _start_links(self, configs: list[LinkConfig]) -> None:
        """Open links concurrently (their state writes share group commits), then start them."""
        env, links = self._state().env, self._state().links
        runtimes: list[BaseLink] = []
        limiter = trio.CapacityLimiter(LINK_OPEN_LIMIT)

        for config in configs:
            self._take_over_retired(config)

        async def open_one(config: LinkConfig) -> None:
            async with limiter:
                sources = [self.components.sources[s] for s in config.sources]
                sinks = [self.components.sinks[s] for s in config.sinks]
                self.metrics.mark_insecure(
                    config.name, config.protocol if config.insecure else None
                )
                if config.native:
                    runtimes.append(await LinkRuntime.open(env, config, sources, sinks))
                else:
                    runner = self.components.protocols[config.name]
                    runtimes.append(
                        await ForeignLinkRuntime.open(env, config, sources, sinks, runner)
                    )

        async with trio.open_nursery() as nursery:
            for config in configs:
                nursery.start_soon(open_one, config)
        for runtime in sorted(runtimes, key=lambda r: r.name):
            self.links[runtime.name] = runtime
            if runtime.timed_by_agent:
                runtime.poke()  # looks at its timer at once
            else:
                task = _LinkTask(runtime)
                self._tasks[runtime.name] = task
                await links.start(_run_isolated, task)

    async def _check_state_room(self) -> None:
        """Warn when the used key IDs the links will remember would crowd the state's disk:
        at 10,000 links the default retention comes to about 160 GB (README, `[agent]`)."""
        keep = self.settings.used_key_ids_kept
        need = used_ids_footprint(((c.name, c.sources) for c in self.config.links.values()), keep)
        store = self._state().env.store

        def room() -> tuple[int, int]:
            return disk_free(store.state_dir), store.path.stat().st_size

        try:
            # system calls on a disk that may be slow: on a thread, as the store's writes go
            # (inline only for an unthreaded store: under a virtual clock a thread lets it leap)
            free, held = await trio.to_thread.run_sync(room) if store.threaded else room()
        except OSError as exc:  # nothing to compare with: no warning
            log.info(
                "state: the links' used key IDs will take about %d MB (no free-space figure "
                "for %s: %s)",
                need // 10**6,
                store.state_dir,
                exc.strerror,
            )
            return
        warning = used_ids_room_warning(need, free, held, keep)
        if warning is not None:
            log.warning("state: %s", warning)

    async def _stop_link(self, name: str) -> BaseLink:
        """Stop a link's timer (after any exchange under way) and forget it; returns it."""
        runtime = self.links.pop(name)
        task = self._tasks.pop(name, None)
        if task is None:
            await runtime.halt(retire=True)
            return runtime
        runtime.stop()
        async with runtime.lock:  # a request queued ahead of this finishes first
            runtime.retired = True
            task.scope.cancel()
        await task.done.wait()
        return runtime

    async def _retire(
        self, runtime: BaseLink, sink_ids: frozenset[str], *, drop_state: bool
    ) -> None:
        """Fail closed for sinks a link no longer feeds (the link removed, or the sink dropped
        from it or reconfigured): erase them; a failed erase is retried in the background
        until it succeeds, and the sink instance closed only then."""
        if drop_state:
            await runtime.erase("removed")
            store = runtime.env.store
            # the used key IDs first, a bounded transaction at a time (each may be lost to a
            # power loss: the link is stopped, and the drop that follows is durable)
            chunk = partial(store.forget_used_ids, runtime.name, USED_KEY_ID_PRUNE_MAX)
            while await store.run(chunk, durable=False) == USED_KEY_ID_PRUNE_MAX:
                pass
            await store.run(store.drop, runtime.name)
            if runtime.name not in self.links:
                self.metrics.forget(runtime.name)
        elif sink_ids:
            await runtime.sinks.erase("removed", runtime.record.epoch, only=sink_ids)
        if runtime.erase_failed:
            retiring = _Retiring(runtime)
            self._erasing[id(runtime)] = retiring
            self._state().servers.start_soon(self._retry_retired_erase, retiring)

    async def _retry_retired_erase(self, retiring: _Retiring) -> None:
        """Retry a retired link's failed erase with its backoff until it succeeds (or a new
        link of that name takes the sinks over); then close the sink instances nothing else
        holds (a reload leaves them open meanwhile)."""
        runtime = retiring.runtime
        timing = runtime.config.timing
        delay = timing.backoff_min
        try:
            with retiring.scope:
                while runtime.erase_failed:
                    await trio.sleep(delay)
                    delay = min(delay * 2, timing.backoff_max)
                    await runtime.sinks.retry_erase(runtime.record.epoch)
                if runtime.name not in self.links:
                    self.metrics.forget(runtime.name)
        finally:
            self._erasing.pop(id(runtime), None)
            live = {id(h.sink) for h in self.components.sinks.values()}
            held = {id(h.sink) for r in self._erasing.values() for h in r.runtime.sinks.handles}
            orphans = [h.sink for h in runtime.sinks.handles if id(h.sink) not in live | held]
            with trio.move_on_after(5, shield=True):
                await self.tasks.stop(orphans)
                await close_all(orphans)

    def _take_over_retired(self, config: LinkConfig) -> None:
        """A link starting under a name whose old runtime still retries erases: the sinks it
        uses are the new runtime's now (its start-up installs or erases them), so the old one
        stops touching them; with nothing left to erase, its retry ends."""
        for retiring in list(self._erasing.values()):
            runtime = retiring.runtime
            if runtime.name != config.name:
                continue
            for sink_id in config.sinks:
                if self.components.sinks[sink_id].sink is runtime.sinks.handle(sink_id).sink:
                    runtime.erase_failed.pop(sink_id, None)
            if not runtime.erase_failed:
                retiring.scope.cancel()

    # -- reload ------------------------------------------------------------------------------

    async def reload(self, new: AgentConfig) -> dict[str, list[str]]:
        """Apply a new config (`lifecycle.plan_reload`): links added, removed or changed and
        their components built, prepared and closed without a restart.

        `[agent]` settings (name, listener, TLS, state dir, plugins) need a restart and are
        kept as they are; a warning says so. A sink that a link no longer feeds is erased
        (fail closed) like the sinks of a removed link. If applying fails half-way, the links
        it stopped and could not restart are erased, and `ReloadFailed` says which.
        """
        plan = plan_reload(self.config, new)
        native = [name for name, link in new.links.items() if link.native]
        if self.settings.tls is None and native:
            raise ReloadFailed(
                f"config reload refused: link {native[0]!r} uses qkdagent's own protocol, and "
                "this agent started without [agent.tls]; add it and restart the agent"
            )
        if plan.agent_settings_changed:
            log.warning("config reload: [agent] changes need a restart; they are not applied")
        built = build_components(new, self.plugins, self.context)
        keep = self.components

        def pick(cid: str, fresh: Any, kept: dict[str, Any]) -> Any:
            return fresh if cid in plan.changed_components else kept[cid]

        restarted = {*plan.changed_links, *plan.added_links}
        components = Components(
            {cid: pick(cid, h, keep.sources) for cid, h in built.sources.items()},
            {cid: pick(cid, h, keep.sinks) for cid, h in built.sinks.items()},
            {
                name: protocol if name in restarted else keep.protocols[name]
                for name, protocol in built.protocols.items()
            },
        )
        new_only = Components(
            {c: h for c, h in components.sources.items() if c in plan.changed_components},
            {c: h for c, h in components.sinks.items() if c in plan.changed_components},
        )
        servers = self._state().servers
        try:
            await self._prepare(new_only, new)
            await self.tasks.start(servers, new_only.all())
        except BaseException:  # the reload is refused: nothing new stays open
            with trio.move_on_after(5, shield=True):
                await self.tasks.stop(new_only.all())
                await close_all(new_only.all())
            raise
        old_config = self.config
        stopped: list[BaseLink] = []
        self._reconfiguring = frozenset(plan.changed_links)
        try:
            for name in plan.removed_links:
                await self._retire(await self._stop_link(name), frozenset(), drop_state=True)
            for name in plan.changed_links:
                runtime = await self._stop_link(name)
                stopped.append(runtime)
                kept_sinks = set(new.links[name].sinks) - plan.changed_components
                dropped = frozenset(set(old_config.links[name].sinks) - kept_sinks)
                await self._retire(runtime, dropped, drop_state=False)
            self.components = components
            self.config = AgentConfig(new.file, self.settings, new.links, new.sources, new.sinks)
            assign_links(components, self.config)
            await self._start_links(
                [new.links[n] for n in (*plan.changed_links, *plan.added_links)]
            )
        except trio.Cancelled:
            raise
        except BaseException as exc:
            await self._reload_failed(stopped, new_only, exc)
        finally:
            self._reconfiguring = frozenset()
        erasing = {id(h.sink) for r in self._erasing.values() for h in r.runtime.sinks.handles}
        stale = [
            h.component
            for h in keep.handles()
            if (h.id in plan.changed_components or h.id in plan.dropped_components)
            and id(h.component) not in erasing  # closed once their erase is done
        ]
        await self.tasks.stop(stale)
        await close_all(stale)
        summary = {
            "added": list(plan.added_links),
            "removed": list(plan.removed_links),
            "changed": list(plan.changed_links),
        }
        log.info("config reloaded: %s", summary)
        if plan.added_links:
            await self._check_state_room()
        for config in self.config.links.values():
            if config.insecure and config.name not in restarted:  # those said so as they opened
                log.warning(insecure_warning(config), extra={"link": config.name})
        return summary

    async def _reload_failed(
        self, stopped: list[BaseLink], new_only: Components, exc: BaseException
    ) -> NoReturn:
        """Applying a reload failed after links were stopped: those not running again hold a
        key nothing will rotate or erase on time any more, so erase them now (fail closed)."""
        stranded = [r for r in stopped if r.name not in self.links]
        with trio.move_on_after(30, shield=True):
            for runtime in stranded:
                await runtime.erase("reload-failed")
            # new components nothing uses or holds: stopped and closed (those already swapped
            # in are closed with the others when the agent stops)
            held = {id(h.component) for h in self.components.handles()}
            unused = [c for c in new_only.all() if id(c) not in held and not self._in_use(c)]
            await self.tasks.stop(unused)
            await close_all(unused)
        names = ", ".join(r.name for r in stranded) or "none"
        raise ReloadFailed(
            f"config reload failed while applying ({type(exc).__name__}); links stopped and "
            f"erased: {names}; restart the agent to recover them"
        ) from None

    def _in_use(self, component: Any) -> bool:
        for runtime in self.links.values():
            if any(component is h.source for h in runtime.sources):
                return True
            if any(component is h.sink for h in runtime.sinks.handles):
                return True
        return False

    # -- observation -------------------------------------------------------------------------

    def report(self, event: ComponentEvent) -> None:
        """A component's out-of-rotation event: log, count, hook (never key bytes)."""
        where = f" (link {event.link})" if event.link else ""
        log.warning(
            "%s: %s%s: %s", event.component, event.kind, where, event.detail,
            extra={"component": event.component, "kind": event.kind, "link": event.link},
        )  # fmt: skip
        self.metrics.component_events.labels(event.component, event.kind).inc()
        self.recent_events.append({"time": time.time(), **dataclasses.asdict(event)})
        self.hooks.on_component_event(event)

    def link(self, name: str) -> Any:
        """A running link's runtime (`LinkRuntime`, or `ForeignLinkRuntime` for a link of
        another protocol); typed loosely for tests, which reach into either."""
        return self.links[name]

    def describe(self) -> dict[str, Any]:
        return {**self._status(), "links": [r.describe() for r in self.links.values()]}

    def _status(self) -> dict[str, Any]:
        """The status document for /status: its links described one at a time as they are
        encoded (`observability.status_json`)."""
        return {
            "agent": self.name,
            "version": __version__,
            "time": time.time(),
            "peer_api": self.peer_urls,
            "links": (r.describe() for r in list(self.links.values())),
            "removed_links_erase_failed": {
                r.runtime.name: sorted(r.runtime.erase_failed) for r in self._erasing.values()
            },
            "recent_component_events": list(self.recent_events),
        }


def disk_free(path: Path) -> int:
    """Bytes free for the agent on the filesystem holding `path` (a seam for tests)."""
    return shutil.disk_usage(path).free


async def _run_isolated(
    task: _LinkTask, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a link's own task (another protocol's) so that nothing it raises stops the agent or
    the other links.

    An exception here is a bug (the loop handles every expected failure itself): it is logged
    by type and place (its message might quote a key), and the loop restarts after a backoff.
    """
    runtime = task.runtime
    try:
        with task.scope:
            task_status.started()
            delay = LINK_RESTART_MIN
            while True:
                try:
                    await runtime.run()
                    return
                except Exception as exc:
                    where = raised_at(exc)
                    log.error(
                        "link %s: unexpected %s%s; the link restarts in %g s (a bug)",
                        runtime.name, type(exc).__name__, where, delay,
                        extra={"link": runtime.name, "stage": "internal"},
                    )  # fmt: skip
                    runtime.status.last_error = f"internal: unexpected {type(exc).__name__}"
                    runtime.status.last_error_at = time.time()
                await trio.sleep(delay)
                delay = min(delay * 2, LINK_RESTART_MAX)
    finally:
        task.done.set()
