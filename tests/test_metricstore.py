"""Per-link metric families kept as plain floats, exposed like prometheus_client's."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from qkdagent.metricstore import LabelledValues
from qkdagent.observability import Metrics


class _Reference(Collector):
    """The families through prometheus_client: what `generate_latest` writes for them."""

    def __init__(self, families: list[LabelledValues]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.family()


def _reference(families: list[LabelledValues]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reference(families))
    return generate_latest(registry).decode()


def test_counters_and_gauges_expose_as_prometheus_client_does() -> None:
    counter = LabelledValues("x_rotations", "Rotations", ["link"], "counter")
    gauge = LabelledValues("x_epoch", "Epoch", ["link", "peer"], "gauge")
    counter.labels("a").inc()
    counter.labels("a").inc(2)
    gauge.labels("a", "bob").set(7)
    text = counter.exposition() + gauge.exposition()
    assert 'x_rotations_total{link="a"} 3.0' in text
    assert "# TYPE x_rotations_total counter" in text
    assert 'x_epoch{link="a",peer="bob"} 7.0' in text
    assert text == _reference([counter, gauge])
    with pytest.raises(ValueError):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("a").set(1)
    with pytest.raises(ValueError):
        gauge.labels("a")  # a label missing


def test_the_text_is_byte_for_byte_what_prometheus_client_writes() -> None:
    """Label values with every character the format escapes (and others), label names out of
    order, no labels, values Go prints in its own way (exponents, infinities, NaN)."""
    rng = random.Random(18)
    alphabet = ['"', "\\", "\n", "a", "-", ".", "é", "{", "}", "=", ",", " ", "\t", "0"]
    values = [0.0, 1.0, -2.5, 1e-9, 123456789.0, 1e21, 3.14159, float("inf"), float("-inf")]
    families = [
        LabelledValues("x_c", 'help with \\ and \n and "', ["link", "stage"], "counter"),
        LabelledValues("x_g", "gauge", ["link", "sink", "result"], "gauge"),
        LabelledValues("x_n", "no labels", [], "gauge"),
        LabelledValues("x_empty", "no samples", ["link"], "counter"),
    ]
    for family in families[:2]:
        for _ in range(300):
            key = ["".join(rng.choices(alphabet, k=rng.randrange(0, 8))) for _ in family.labelnames]
            family.values[tuple(key)] = rng.choice(values)
    families[2].labels().set(float("nan"))
    text = "".join(family.exposition() for family in families)
    assert text == _reference(families)
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert len(parsed["x_c"].samples) == len(families[0].values)


def test_the_agents_metrics_parse_with_one_family_per_name() -> None:
    metrics = Metrics()
    metrics.rotation_done("a", 1, 0.01)
    metrics.installs.labels("a", "psk", "ok").inc()
    metrics.plugins.gauge("qkdagent_acme_pool_bits", "bits", ["source"]).labels("s").set(5)
    text = metrics.exposition().decode()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["qkdagent_sink_installs"].samples[0].labels == {
        "link": "a",
        "sink": "psk",
        "result": "ok",
    }
    assert families["qkdagent_acme_pool_bits"].samples[0].value == 5.0


def test_a_forgotten_link_leaves_no_sample() -> None:
    metrics = Metrics()
    for link in ("a", "ab"):
        metrics.rotation_done(link, 1, 0.01)
        metrics.failures.labels(link, "peer").inc()
        metrics.installs.labels(link, "psk", "ok").inc()
        metrics.mark_insecure(link, "qupskd")
    metrics.forget("a")
    text = metrics.exposition().decode()
    assert 'link="a"' not in text
    assert text.count('link="ab"') == 6  # rotations, failures, installs, epoch, last, insecure
    metrics.mark_insecure("ab", None)
    assert "qkdagent_link_insecure{" not in metrics.exposition().decode()


async def test_a_plugin_publishes_gauges_on_its_agents_metrics(tmp_path: Path) -> None:
    from qkdagent.testing import open_agent_pair

    async with open_agent_pair(tmp_path, local=True) as pair:
        metrics = pair.alice.context.metrics
        level = metrics.gauge("qkdagent_test_pool_bits", "Bits in the pool", ["source"])
        assert metrics.gauge("qkdagent_test_pool_bits", "again", ["source"]) is level
        level.labels("sim").set(4096)
        assert 'qkdagent_test_pool_bits{source="sim"} 4096.0' in (
            pair.alice.metrics.exposition().decode()
        )
        assert "qkdagent_test_pool_bits" not in pair.bob.metrics.exposition().decode()
        with pytest.raises(ValueError, match="already a gauge"):
            metrics.counter("qkdagent_test_pool_bits", "x", ["source"])
        for bad in ("pool_bits", "qkdagent_x_total", "qkdagent_Bad"):
            with pytest.raises(ValueError):
                metrics.gauge(bad, "x")


def test_a_plugin_cannot_take_a_name_the_agent_exposes() -> None:
    metrics = Metrics()
    for name in (
        "qkdagent_link_epoch",  # a per-link family
        "qkdagent_rotations",  # exposed as qkdagent_rotations_total
        "qkdagent_rotation_duration_seconds",  # a histogram
        "qkdagent_component_events",  # a prometheus_client counter
        "qkdagent_component_events_created",  # ... and its samples
        "qkdagent_rotation_duration_seconds_count",
        "qkdagent_blocking_calls",  # the event loop's (a collector of the agent's own)
        "qkdagent_blocking_call_cooldowns_created",  # (its samples too)
    ):
        with pytest.raises(ValueError, match="the agent's own"):
            metrics.plugins.gauge(name, "x")
    metrics.plugins.gauge("qkdagent_acme_pool_bits", "fine")
    with pytest.raises(ValueError, match="a label name twice"):  # the scrape would fail whole
        metrics.plugins.gauge("qkdagent_acme_level", "x", ["source", "source"])


def test_the_event_loops_blocking_calls_are_on_the_metrics() -> None:
    """Where the loop's commits and small writes ran (`inline.loop_gate`): an operator sees
    calls sent to threads, and the cooldowns that sent them, at each scrape."""
    import trio

    from qkdagent.inline import CACHE, DISK, loop_gate

    metrics = Metrics()

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        found = {}
        for family in text_string_to_metric_families(metrics.exposition().decode()):
            if family.name.startswith("qkdagent_blocking_call"):
                assert family.type == "counter"
                for s in family.samples:
                    found[s.name, tuple(sorted(s.labels.items()))] = s.value
        return found

    def calls(kind: str, where: str) -> float:
        return samples()[("qkdagent_blocking_calls_total", (("kind", kind), ("where", where)))]

    def cooldowns(kind: str) -> float:
        return samples()[("qkdagent_blocking_call_cooldowns_total", (("kind", kind),))]

    assert samples() == {}  # outside any event loop: nothing to count

    async def run() -> None:
        assert calls(DISK, "loop") == calls(CACHE, "thread") == cooldowns(DISK) == 0  # from 0
        disk, cache = loop_gate(DISK), loop_gate(CACHE)
        disk.first_cooldown = disk.cooldown  # (no real second may end it meanwhile)
        for _ in range(3):
            await disk.run(lambda: None)
        disk.measured(disk.limit * 2)  # a slow fsync: fsyncs to threads for a while
        await disk.run(lambda: None)
        await cache.run(lambda: None)
        assert (calls(DISK, "loop"), calls(DISK, "thread")) == (3, 1)
        assert (calls(CACHE, "loop"), calls(CACHE, "thread")) == (1, 0)
        assert (cooldowns(DISK), cooldowns(CACHE)) == (1, 0)
        cache.measured(cache.stall * 2)  # a stall: every kind to threads; the fsyncs were
        assert (cooldowns(DISK), cooldowns(CACHE)) == (1, 1)
        cache.measured(cache.stall * 2)  # already there: no cooldown started
        assert (cooldowns(DISK), cooldowns(CACHE)) == (1, 1)

    trio.run(run)
