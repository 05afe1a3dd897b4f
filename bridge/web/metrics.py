"""Prometheus exposition for a role, with prometheus-client.

A :class:`RoleCollector` asks the role's view (:mod:`bridge.web.roles`) for its
metric families at every scrape; the view builds them from ``statistics()``
snapshots, so a scrape costs one snapshot and nothing is counted twice. Next to it,
prometheus-client's own process collector reports CPU, memory and file descriptors.

Every name starts with ``stratumrm_``. Per-worker series (``stratumrm_worker_*``)
appear only with ``--metrics-per-worker`` and stop at :data:`MAX_WORKER_SERIES`
workers (the busiest); ``stratumrm_worker_series_dropped`` says how many were left
out, so a farm of 50 000 rigs cannot blow up the Prometheus server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE_LATEST",
    "MAX_WORKER_SERIES",
    "Families",
    "RoleCollector",
    "exposition",
    "registry_for",
]

PREFIX = "stratumrm_"
MAX_WORKER_SERIES = 1000


class Families:
    """A small builder of metric families, in the order they are first named.

    ``declare_counter``/``declare_gauge`` name a family and its labels before any series
    (so an empty family still shows in the exposition); ``counter``/``gauge`` add one
    series, declaring the family from the series' labels if it is new.
    """

    def __init__(self) -> None:
        self._families: dict[str, tuple[Metric, tuple[str, ...]]] = {}

    def declare_counter(self, name: str, documentation: str, *labels: str) -> None:
        self._declare(CounterMetricFamily, name, documentation, labels)

    def declare_gauge(self, name: str, documentation: str, *labels: str) -> None:
        self._declare(GaugeMetricFamily, name, documentation, labels)

    def counter(self, name: str, documentation: str, value: float, /, **labels: str) -> None:
        self._add(CounterMetricFamily, name, documentation, value, labels)

    def gauge(self, name: str, documentation: str, value: float, /, **labels: str) -> None:
        self._add(GaugeMetricFamily, name, documentation, value, labels)

    def counters_by(self, name: str, documentation: str, label: str, values: Mapping[str, float]) -> None:
        """One counter family with a series per key of ``values`` (the family even when empty)."""
        self.declare_counter(name, documentation, label)
        for key, value in sorted(values.items()):
            self.counter(name, documentation, value, **{label: key})

    def _declare(self, kind: type, name: str, documentation: str, labels: tuple[str, ...]) -> tuple[Metric, tuple[str, ...]]:
        full = PREFIX + name
        entry = self._families.get(full)
        if entry is None:
            names = tuple(sorted(labels))
            entry = self._families[full] = (kind(full, documentation, labels=list(names)), names)
        elif entry[1] != tuple(sorted(labels)):
            raise ValueError(f"{full}: labels {sorted(labels)} differ from {list(entry[1])}")
        return entry

    def _add(self, kind: type, name: str, documentation: str, value: float, labels: dict[str, str]) -> None:
        family, names = self._declare(kind, name, documentation, tuple(labels))
        family.add_metric([str(labels[key]) for key in names], float(value))

    def __iter__(self) -> Iterator[Metric]:
        return iter(family for family, _names in self._families.values())


class RoleCollector(Collector):
    """prometheus-client collector over a role view's ``metric_families()``."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return list(self._families())


def registry_for(families: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """A registry of its own (not prometheus-client's global one) for one role."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RoleCollector(families))
    ProcessCollector(namespace="stratumrm", registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
