"""Prometheus metrics of the cloud, computed from the registry at every scrape.

The ServerApp (rounds, versions, publishes), the fleet monitor (device status) and the
web UI run in different processes; all of them write the registry, so the web UI's
``/metrics`` reads its figures from there (:meth:`cloud.registry.Registry.stats`, one
read transaction) rather than from counters of one process. Counters and histograms
are therefore totals over the registry's whole history: they only grow while it does.

Metric names (all start with ``edgefl_``; the client's standard ``process_*`` of the
web process come along)::

    edgefl_rounds_completed_total                 counter    finished rounds, all runs
    edgefl_rounds_running                         gauge      started, not finished
    edgefl_round_duration_seconds                 histogram  start to finish of each round
    edgefl_latest_round                           gauge      number of the newest round
    edgefl_round_participants                     gauge      devices sampled for the newest round
    edgefl_round_replies_total{outcome}           counter    ok / failed / dropped device answers
    edgefl_runs{status}                           gauge      runs by status (failed runs included)
    edgefl_fleet_target_version                   gauge      the version the fleet should serve
    edgefl_devices{state}                         gauge      devices by last reported state
    edgefl_devices_serving{version}               gauge      online devices by served version
    edgefl_fleet_version_spread_ratio             gauge      online devices on the target version
    edgefl_releases_published_total               counter    releases published
    edgefl_release_publish_duration_seconds       histogram  first chunk to acknowledged manifest
    edgefl_registry_versions                      gauge      model versions stored
    edgefl_registry_artifacts                     gauge      distinct artifacts stored
    edgefl_registry_artifact_bytes                gauge      bytes of stored artifacts
    edgefl_registry_events                        gauge      device events stored
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from cloud.registry import Registry, RegistryStats
from protos.codec import DEVICE_STATES

logger = logging.getLogger(__name__)

#: Round duration buckets (seconds): a demo round takes 10-60 s.
ROUND_BUCKETS = (1.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Publish duration buckets (seconds): one ~60 KB release on loopback takes milliseconds.
PUBLISH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: The ``Content-Type`` of the text format served at ``/metrics``.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _histogram(
    name: str, documentation: str, values: Sequence[float], buckets: Sequence[float]
) -> HistogramMetricFamily:
    """A histogram family from raw observations (cumulative bucket counts, +Inf last)."""
    ordered = sorted(values)
    counts = [(_le(b), float(bisect.bisect_right(ordered, b))) for b in buckets]
    counts.append(("+Inf", float(len(ordered))))
    return HistogramMetricFamily(name, documentation, buckets=counts, sum_value=sum(ordered))


def _le(bound: float) -> str:
    return repr(float(bound))


def families(stats: RegistryStats) -> Iterable[Metric]:
    """The cloud's metric families for one registry snapshot."""
    yield CounterMetricFamily(
        "edgefl_rounds_completed", "Finished federated rounds, all runs.", stats.rounds_finished
    )
    yield GaugeMetricFamily(
        "edgefl_rounds_running", "Rounds started and not finished.", stats.rounds_running
    )
    yield _histogram(
        "edgefl_round_duration_seconds",
        "Time from a round's start to its end (aggregation done).",
        stats.round_durations,
        ROUND_BUCKETS,
    )
    yield GaugeMetricFamily(
        "edgefl_latest_round", "Number of the newest round (0 before any).", stats.latest_round
    )
    yield GaugeMetricFamily(
        "edgefl_round_participants",
        "Devices sampled for the newest round.",
        stats.latest_round_sampled,
    )
    replies = CounterMetricFamily(
        "edgefl_round_replies",
        "Device answers in rounds: ok, failed (an error reply) or dropped (timed out).",
        labels=["outcome"],
    )
    for outcome in ("ok", "failed", "dropped"):
        replies.add_metric([outcome], stats.replies.get(outcome, 0))
    yield replies
    runs = GaugeMetricFamily("edgefl_runs", "Federated runs by status.", labels=["status"])
    for status in ("running", "completed", "failed", "stopped"):
        runs.add_metric([status], stats.runs_by_status.get(status, 0))
    yield runs
    yield GaugeMetricFamily(
        "edgefl_fleet_target_version",
        "Model version the fleet should serve (0 before the first release).",
        stats.current_version,
    )
    devices = GaugeMetricFamily(
        "edgefl_devices", "Devices by the state of their last status.", labels=["state"]
    )
    for state in DEVICE_STATES:
        devices.add_metric([state], stats.devices_by_state.get(state, 0))
    yield devices
    serving = GaugeMetricFamily(
        "edgefl_devices_serving",
        "Online devices by the model version they serve.",
        labels=["version"],
    )
    for version, n in sorted(stats.online_by_version.items()):
        serving.add_metric([str(version)], n)
    yield serving
    online = sum(stats.online_by_version.values())
    on_target = stats.online_by_version.get(stats.current_version, 0)
    yield GaugeMetricFamily(
        "edgefl_fleet_version_spread_ratio",
        "Share of online devices serving the target version (0 with no online device).",
        on_target / online if online else 0.0,
    )
    yield CounterMetricFamily(
        "edgefl_releases_published",
        "Releases published to the fleet (rounds and pins).",
        len(stats.publish_durations),
    )
    yield _histogram(
        "edgefl_release_publish_duration_seconds",
        "Time to publish one release: first chunk sent to manifest acknowledged.",
        stats.publish_durations,
        PUBLISH_BUCKETS,
    )
    yield GaugeMetricFamily(
        "edgefl_registry_versions", "Model versions in the registry.", stats.versions
    )
    yield GaugeMetricFamily(
        "edgefl_registry_artifacts", "Distinct artifacts in the registry.", stats.artifacts
    )
    yield GaugeMetricFamily(
        "edgefl_registry_artifact_bytes",
        "Bytes of the artifacts stored in the registry.",
        stats.artifact_bytes,
    )
    yield GaugeMetricFamily(
        "edgefl_registry_events", "Device events in the registry.", stats.events
    )


class RegistryCollector(Collector):
    """Collects :func:`families` from a registry at every scrape."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return list(families(self._registry.stats()))


def cloud_collectors(registry: Registry) -> CollectorRegistry:
    """The collector registry the web UI's ``/metrics`` renders."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(RegistryCollector(registry))
    ProcessCollector(registry=collectors)
    return collectors


def render(collectors: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``collectors``."""
    return generate_latest(collectors)
