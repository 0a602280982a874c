"""Prometheus metrics and the local status endpoint (`GET /status`, `GET /metrics`).

The status listener is plain HTTP meant for loopback: it shows link names, epochs, times and
errors, never key material. Each agent has its own registry, so several agents in one process
(tests, the demo) keep separate figures.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .asgi import lifespan, respond
from .inline import loop_gate_counts
from .metricstore import LabelledValues, PluginMetrics

SCRAPE_SAMPLES = 500
"""Samples written between two schedule points of a `/metrics` scrape (a few ms at most)."""
STATUS_LINKS = 100
"""Links described between two schedule points of a `/status` document (a few ms at most)."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def per_link(name: str, doc: str, labels: list[str], kind: str) -> LabelledValues:
            return LabelledValues(name, doc, ["link", *labels], kind)

        # Per-link families: plain floats (`metricstore.py`); at 10,000 links prometheus_client's
        # child objects were the largest part of the agent's memory.
        self.rotations = per_link("qkdagent_rotations", "Committed rotations", [], "counter")
        self.failures = per_link(
            "qkdagent_rotation_failures", "Failed rotation attempts", ["stage"], "counter"
        )
        self.installs = per_link(
            "qkdagent_sink_installs", "Sink installs", ["sink", "result"], "counter"
        )
        self.erasures = per_link(
            "qkdagent_erasures", "Fail-closed erasures of a link's sinks", ["reason"], "counter"
        )
        self.epoch = per_link("qkdagent_link_epoch", "Committed epoch", [], "gauge")
        self.erase_failed = per_link(
            "qkdagent_link_erase_failed_sinks",
            "Sinks of a link whose fail-closed erase failed and is being retried",
            [],
            "gauge",
        )
        self.unauthenticated_refusals = per_link(
            "qkdagent_unauthenticated_refusals",
            "Peer refusals whose MAC did not verify (ignored: possible man in the middle)",
            [],
            "counter",
        )
        self.fetched_ahead = per_link(
            "qkdagent_keys_fetched_ahead",
            "Source keys a responder fetched on an announce: used by the rotate naming them, "
            "or dropped (another rotate came first, the link failed closed or they expired)",
            ["result"],
            "counter",
        )
        self.last_success = per_link(
            "qkdagent_link_last_success_timestamp_seconds",
            "Unix time of the last committed rotation",
            [],
            "gauge",
        )
        self.insecure = per_link(
            "qkdagent_link_insecure",
            "1 for a link whose peer protocol is unauthenticated (insecure = true; migration)",
            ["protocol"],
            "gauge",
        )
        self._per_link = [
            self.rotations,
            self.failures,
            self.installs,
            self.erasures,
            self.epoch,
            self.erase_failed,
            self.unauthenticated_refusals,
            self.fetched_ahead,
            self.last_success,
            self.insecure,
        ]
        self.plugins = PluginMetrics()
        """What plugins publish (`PluginContext.metrics`)."""
        self.component_events = Counter(
            "qkdagent_component_events",
            "Events sources and sinks reported outside rotations (e.g. a repaired credential)",
            ["component", "kind"],
            registry=r,
        )
        self.peer_connections_refused = Counter(
            "qkdagent_peer_connections_refused",
            "Peer API connections refused or closed early (caps, handshake, slow senders)",
            ["reason"],
            registry=r,
        )
        self.peer_requests_refused = Counter(
            "qkdagent_peer_requests_refused",
            "Peer API requests answered with an error status",
            ["status"],
            registry=r,
        )
        self.peer_batches = Counter(
            "qkdagent_peer_batches_received",
            "Batches of several links' requests received from peers (issue 18)",
            registry=r,
        )
        self.peer_batched_requests = Counter(
            "qkdagent_peer_batched_requests_received",
            "Requests that came in those batches",
            registry=r,
        )
        self.duration = Histogram(
            "qkdagent_rotation_duration_seconds",
            "Rotation time on this side, from start to its sinks installed",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        r.register(_BlockingCalls())
        own = [f.name for f in self._per_link]
        # prometheus_client's (counters without _total; what samples add: SAMPLE_SUFFIXES)
        own += [m.name for m in r.collect()]
        self.plugins.reserve(own)

    def rotation_done(self, link: str, epoch: int, duration: float) -> None:
        self.rotations.labels(link).inc()
        self.epoch.labels(link).set(epoch)
        self.last_success.labels(link).set(time.time())
        self.duration.observe(duration)

    def forget(self, link: str) -> None:
        """A removed link's per-link figures go (its failures, installs and erasures too)."""
        for family in self._per_link:
            family.discard(link)

    def mark_insecure(self, link: str, protocol: str | None) -> None:
        """`qkdagent_link_insecure` is 1 for a link running an unauthenticated protocol
        (`protocol`), and absent for any other link."""
        self.insecure.discard(link)
        if protocol is not None:
            self.insecure.labels(link, protocol).set(1)

    def exposition(self) -> bytes:
        """prometheus_client's metrics, then the per-link and the plugins' families (written
        by `metricstore`: three to five times faster at 10,000 links)."""
        return b"".join(self._exposition_parts(math.inf))

    async def scrape(self) -> bytes:
        """`exposition()` for `/metrics`, giving the event loop back every `SCRAPE_SAMPLES`
        samples (at 10,000 links a scrape in one go held every link's timers and the peer API
        for about 0.1 s)."""
        parts = []
        for part in self._exposition_parts(SCRAPE_SAMPLES):
            parts.append(part)
            await trio.lowlevel.checkpoint()
        return b"".join(parts)

    def _exposition_parts(self, samples: float) -> Iterator[bytes]:
        yield generate_latest(self.registry)  # the agent's own few, not per link
        for family in [*self._per_link, *self.plugins.families()]:
            count = len(family.values) + 1 if samples == math.inf else int(samples)
            for part in family.exposition_parts(count):
                yield part.encode()


class _BlockingCalls(Collector):
    """Where the blocking calls the event loop may run itself went (`inline.loop_gate`: the
    state's commits, non-durable file sink writes, keydir files), read at each scrape. They go
    to threads after a slow call or a stall (a cooldown) and once the loop has spent the
    second's budget in them; cooldowns mean a disk slow at times; each hop to a thread costs CPU
    (0.2-0.35 ms on this project's VM: `contrib/bench/bench_thread_hop.py`). Writes that always
    run on threads (checkpoints, durable sink writes, deferred fsyncs) are not counted. The
    figures are the event loop's, shared by the agents on it (one per `qkdagent run`
    process)."""

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "qkdagent_blocking_calls",
            "Short blocking calls the event loop may run itself (commits, small file writes) "
            "by kind, run on the loop or on a worker thread",
            labels=["kind", "where"],
        )
        cooldowns = CounterMetricFamily(
            "qkdagent_blocking_call_cooldowns",
            "Times a slow call or a stall sent a kind of blocking call from the event loop "
            "to worker threads",
            labels=["kind"],
        )
        for kind, (on_loop, on_threads, cooled) in sorted(loop_gate_counts().items()):
            calls.add_metric([kind, "loop"], on_loop)
            calls.add_metric([kind, "thread"], on_threads)
            cooldowns.add_metric([kind], cooled)
        yield calls
        yield cooldowns


def status_json(document: dict[str, Any]) -> bytes:
    """The status document as JSON, its `links` (any iterable) encoded one at a time: at
    10,000 links the descriptions of all links at once, indented, and a str copy of the whole
    body made /status cost about 40 MB (issue 18)."""
    return b"".join(part for part, _ in _status_parts(document))


async def status_body(document: dict[str, Any]) -> bytes:
    """`status_json` for `/status`, giving the event loop back every `STATUS_LINKS` links
    (at 10,000 links the whole document held it for about 0.11 s). Each link is described
    when its turn comes: as it is then."""
    parts = []
    for part, link_count in _status_parts(document):
        parts.append(part)
        if link_count % STATUS_LINKS == 0 and link_count:
            await trio.lowlevel.checkpoint()
    return b"".join(parts)


def _status_parts(document: dict[str, Any]) -> Iterator[tuple[bytes, int]]:
    """The document's JSON in pieces, each with how many links were written so far."""
    links = document.pop("links", ())
    head = json.dumps(document).encode()
    yield head[:-1] + (b", " if document else b"") + b'"links": [', 0
    for i, link in enumerate(links):
        yield (b",\n" if i else b"\n") + json.dumps(link).encode(), i + 1
    yield b"]}\n", 0


class StatusApp:
    """ASGI app serving the status document and the metrics of one agent."""

    def __init__(self, status: Callable[[], dict[str, Any]], metrics: Metrics) -> None:
        self.status = status
        self.metrics = metrics
        self._writing = trio.Lock()
        """One body is written at a time (each gives the loop back as it goes): concurrent
        requests wait their turn rather than each hold a whole body of 3 MB or so."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] != "GET":
            status, ctype, body = 405, "text/plain", b"GET only\n"
        elif scope["path"] == "/status":
            status, ctype = 200, "application/json"
            async with self._writing:
                body = await status_body(self.status())
        elif scope["path"] == "/metrics":
            status, ctype = 200, CONTENT_TYPE_LATEST
            async with self._writing:
                body = await self.metrics.scrape()
        else:
            status, ctype, body = 404, "text/plain", b"try /status or /metrics\n"
        await respond(send, status, ctype, body)
