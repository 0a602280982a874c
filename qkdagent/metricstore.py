"""Per-link counters and gauges as plain floats, written into `/metrics` by themselves.

prometheus_client keeps a child object per label set (a value object with its lock, and a
`_created` value for counters): about 600 bytes each, and with eight per-link metrics that was
the largest part of what one link costs at 10,000 links (issue 18). These families keep one
float per label set in a dict and write their lines of the text format themselves when
`/metrics` is scraped: through prometheus_client's metric families and `generate_latest`, one
scrape at 10,000 links (about 40,000 samples) took 0.4 s of CPU, holding the event loop
meanwhile. The lines are the ones `generate_latest` writes for `family()` (tests check it);
counters as `<name>_total`, without the `_created` samples.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class LabelledValues:
    """One counter or gauge family; `labels(...)` gives a cheap handle to one value."""

    def __init__(self, name: str, documentation: str, labelnames: list[str], kind: str) -> None:
        if kind not in ("counter", "gauge"):
            raise ValueError(f"kind must be counter or gauge, not {kind!r}")
        if len(set(labelnames)) != len(labelnames):  # (a scraper refuses the whole text)
            raise ValueError(f"metric {name}: a label name twice in {labelnames}")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.kind = kind
        self.values: dict[tuple[str, ...], float] = {}

    def labels(self, *values: str) -> _Value:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        return _Value(self, tuple(str(v) for v in values))

    def remove(self, *values: str) -> None:
        del self.values[tuple(str(v) for v in values)]

    def discard(self, first_label: str) -> None:
        """Drop every label set whose first label is `first_label` (a link that is gone)."""
        for key in [k for k in self.values if k[0] == first_label]:
            del self.values[key]

    def family(self) -> Metric:
        """The family as prometheus_client's metric object (what `exposition` writes)."""
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = cls(self.name, self.documentation, labels=list(self.labelnames))
        for key, value in list(self.values.items()):
            family.add_metric(list(key), value)
        return family

    def exposition(self) -> str:
        """The family in the Prometheus text format (0.0.4), as `generate_latest` writes it:
        labels sorted by name, values escaped, floats as Go prints them."""
        return "".join(self.exposition_parts(len(self.values) + 1))

    def exposition_parts(self, samples: int) -> Iterator[str]:
        """`exposition()` in pieces of at most `samples` samples each, from the label sets
        there are when it starts: a scrape can give the event loop back between pieces (at
        10,000 links a whole scrape held it for about 0.1 s), and a link added or removed
        meanwhile changes nothing in what is written."""
        name = f"{self.name}_total" if self.kind == "counter" else self.name
        text = self.documentation.replace("\\", r"\\").replace("\n", r"\n")
        head = f"# HELP {name} {text}\n# TYPE {name} {self.kind}\n"
        order = sorted(range(len(self.labelnames)), key=self.labelnames.__getitem__)
        names = [(i, f'{self.labelnames[i]}="') for i in order]
        items = list(self.values.items())
        for start in range(0, max(len(items), 1), samples):
            lines = [head] if start == 0 else []
            for key, value in items[start : start + samples]:
                if names:
                    labels = '",'.join(label + _escaped(key[i]) for i, label in names)
                    lines.append(f'{name}{{{labels}"}} {floatToGoString(value)}\n')
                else:
                    lines.append(f"{name} {floatToGoString(value)}\n")
            yield "".join(lines)


def _escaped(value: str) -> str:
    """A label value as the text format writes it: backslash, line feed and double quote
    escaped (checked first: link names rarely hold any)."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class _Value:
    __slots__ = ("_family", "_key")

    def __init__(self, family: LabelledValues, key: tuple[str, ...]) -> None:
        self._family = family
        self._key = key

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0 and self._family.kind == "counter":
            raise ValueError("counters only go up")
        values = self._family.values
        values[self._key] = values.get(self._key, 0.0) + amount

    def set(self, value: float) -> None:
        if self._family.kind == "counter":
            raise ValueError("a counter is not set")
        self._family.values[self._key] = float(value)

    def get(self) -> float:
        return self._family.values.get(self._key, 0.0)


SAMPLE_SUFFIXES = ("", "_total", "_created", "_count", "_sum", "_bucket", "_info")
"""What prometheus_client's families add to their name in their samples' names."""


class PluginMetrics:
    """Counters and gauges a plugin publishes on its agent's `/metrics` (`context.metrics`):
    a pool's level, a simulated link's rate. Names start with `qkdagent_`; the components of
    one plugin asking for the same name (same kind and labels) share the family, so label it by
    component. Without an agent (`qkdagent check`, unit tests) the values are kept, not shown."""

    NAME = re.compile(r"^qkdagent_[a-z0-9_]{1,100}$")
    LABEL = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")

    def __init__(self) -> None:
        self._families: dict[str, LabelledValues] = {}
        self._reserved: set[str] = set()

    def reserve(self, names: Iterable[str]) -> None:
        """Names the agent itself exposes: a plugin family of that name (or one its samples
        would collide with) would make every scrape of `/metrics` fail."""
        self._reserved.update(names)

    def gauge(
        self, name: str, documentation: str, labelnames: Sequence[str] = ()
    ) -> LabelledValues:
        return self._family(name, documentation, labelnames, "gauge")

    def counter(
        self, name: str, documentation: str, labelnames: Sequence[str] = ()
    ) -> LabelledValues:
        """Exposed as `<name>_total`."""
        return self._family(name, documentation, labelnames, "counter")

    def families(self) -> list[LabelledValues]:
        return list(self._families.values())

    def _family(
        self, name: str, documentation: str, labelnames: Sequence[str], kind: str
    ) -> LabelledValues:
        if not self.NAME.match(name) or name.endswith("_total"):
            raise ValueError(f"metric name {name!r}: qkdagent_ and [a-z0-9_], no _total suffix")
        # a family's samples may add any of these to its name: no two names may meet there
        mine = {name + suffix for suffix in SAMPLE_SUFFIXES}
        if any(
            reserved + suffix in mine for reserved in self._reserved for suffix in SAMPLE_SUFFIXES
        ):
            raise ValueError(f"metric name {name!r} is the agent's own")
        if any(not self.LABEL.match(label) for label in labelnames):
            raise ValueError(f"metric {name}: label names are [a-z_][a-z0-9_]*")
        existing = self._families.get(name)
        if existing is not None:
            if existing.kind != kind or existing.labelnames != tuple(labelnames):
                raise ValueError(
                    f"metric {name} is already a {existing.kind} {existing.labelnames}"
                )
            return existing
        family = LabelledValues(name, documentation, list(labelnames), kind)
        self._families[name] = family
        return family
