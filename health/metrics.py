"""Prometheus metrics from the latest snapshot (prometheus-client, its own registry).

A custom collector: each scrape reads the current `SwarmSnapshot`, so the metrics are
exactly what the page shows. Label values (model ids come from announcements) are
escaped by prometheus-client's exposition format; peer ids and model ids are cut to
MAX_LABEL characters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .state import HEALTHY, SwarmSnapshot

MAX_LABEL = 128
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(text: str) -> str:
    return text[:MAX_LABEL]


def _float(value: float | int | None) -> float:
    if value is None:
        return float("nan")
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


class SnapshotCollector(Collector):
    def __init__(self, source: Callable[[], SwarmSnapshot | None]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snapshot = self.source()
        if snapshot is None:
            return
        model_labels = ["model"]
        server_labels = ["model", "peer_id"]
        families = {
            "healthy": GaugeMetricFamily(
                "trustswarm_model_healthy",
                "1 if every block has a usable server",
                labels=model_labels,
            ),
            "blocks": GaugeMetricFamily(
                "trustswarm_model_blocks", "blocks of the model", labels=model_labels
            ),
            "min_established": GaugeMetricFamily(
                "trustswarm_model_min_established_servers",
                "least number of established servers over the blocks",
                labels=model_labels,
            ),
            "servers": GaugeMetricFamily(
                "trustswarm_model_servers", "servers by state", labels=["model", "state"]
            ),
            "throughput": GaugeMetricFamily(
                "trustswarm_server_announced_throughput",
                "announced tokens/s",
                labels=server_labels,
            ),
            "measured": GaugeMetricFamily(
                "trustswarm_server_measured_throughput",
                "tokens/s of our last timed forward request, net of the RTT (NaN: none)",
                labels=server_labels,
            ),
            "boasting": GaugeMetricFamily(
                "trustswarm_server_boasting",
                "1 if the server announces far more throughput than we measure",
                labels=server_labels,
            ),
            "rtt": GaugeMetricFamily(
                "trustswarm_server_rtt_seconds", "measured info RTT", labels=server_labels
            ),
            "score": GaugeMetricFamily(
                "trustswarm_server_reputation_score",
                "median score over trusted verifiers",
                labels=server_labels,
            ),
            "banned": GaugeMetricFamily(
                "trustswarm_server_banned", "1 if banned", labels=server_labels
            ),
        }
        for model in snapshot.models:
            name = _label(model.model_id)
            families["healthy"].add_metric([name], float(model.status == HEALTHY))
            families["blocks"].add_metric([name], float(model.num_blocks))
            families["min_established"].add_metric([name], float(min(model.established, default=0)))
            states: dict[str, int] = {}
            for row in model.servers:
                states[row.state] = states.get(row.state, 0) + 1
                labels = [name, _label(row.peer_id)]
                families["throughput"].add_metric(labels, _float(row.throughput))
                families["measured"].add_metric(labels, _float(row.measured_throughput))
                families["boasting"].add_metric(labels, float(row.boasting))
                families["rtt"].add_metric(labels, _float(row.rtt))
                families["score"].add_metric(labels, _float(row.score))
                families["banned"].add_metric(labels, float(row.banned))
            for state, n in sorted(states.items()):
                families["servers"].add_metric([name, _label(state)], float(n))
        yield from families.values()


def metrics_registry(source: Callable[[], SwarmSnapshot | None]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
