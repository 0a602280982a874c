"""Per-link metric families kept as plain floats, exposed like prometheus_client's."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from qkdagent.metricstore import LabelledCollector, LabelledValues
from qkdagent.observability import Metrics


def test_counters_and_gauges_expose_as_prometheus_client_does() -> None:
    counter = LabelledValues("x_rotations", "Rotations", ["link"], "counter")
    gauge = LabelledValues("x_epoch", "Epoch", ["link", "peer"], "gauge")
    registry = CollectorRegistry(auto_describe=True)
    registry.register(LabelledCollector([counter, gauge]))
    counter.labels("a").inc()
    counter.labels("a").inc(2)
    gauge.labels("a", "bob").set(7)
    text = generate_latest(registry).decode()
    assert 'x_rotations_total{link="a"} 3.0' in text
    assert "# TYPE x_rotations_total counter" in text
    assert 'x_epoch{link="a",peer="bob"} 7.0' in text
    assert registry.get_sample_value("x_rotations_total", {"link": "a"}) == 3.0
    with pytest.raises(ValueError):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("a").set(1)
    with pytest.raises(ValueError):
        gauge.labels("a")  # a label missing


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
    ):
        with pytest.raises(ValueError, match="the agent's own"):
            metrics.plugins.gauge(name, "x")
    metrics.plugins.gauge("qkdagent_acme_pool_bits", "fine")
