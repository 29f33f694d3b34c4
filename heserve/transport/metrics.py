"""Prometheus metrics of a server, in a registry of its own, optionally served over HTTP.

Every RPC is counted by service and method, failures by status code, with a latency
histogram and the bytes of the protobuf messages in and out; Score also counts the
items it scored per catalog. Gauges read the key store on each scrape. Labels are
bounded sets (methods, status codes, served catalogs, shard numbers): no caller input
becomes one.

The backend's shards are read on each scrape too, through what a backend may offer
(`restarts`, `shard_memory()`): the shard restarts so far, and each shard's resident
memory, which the process metrics of this (front) process do not include. Key store
evictions and expirations are exported when the key store counts them
(`evictions`, `expirations`). Each served catalog's version and items, and the reloads
and updates by outcome, come from the scorer (`catalogs`, `change_counts`): a failed
reload is `heserve_catalog_changes_total{outcome="failed"}`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from heserve import __version__
from heserve.domain.scorer import Scorer

# Seconds: from a health check (~0.1 ms) to a large catalog scored on a busy host.
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_RPC_LABELS = ("service", "method")
log = logging.getLogger(__name__)


class ShardCollector(Collector):
    """Shard and key store figures read at scrape time from public attributes of the
    scorer's backend and key store; a figure a backend does not offer is left out."""

    def __init__(self, scorer: Scorer) -> None:
        self._scorer = scorer

    def collect(self) -> Iterator[Metric]:
        backend = self._scorer.backend
        shards = GaugeMetricFamily("heserve_shards", "Shards the catalogs are split over")
        shards.add_metric([], backend.shard_count)
        yield shards
        restarts = getattr(backend, "restarts", None)
        if isinstance(restarts, int):
            counter = CounterMetricFamily(
                "heserve_shard_restarts",
                "Shards (worker processes, Ray actors) that died and were replaced",
            )
            counter.add_metric([], restarts)
            yield counter
        shard_memory = getattr(backend, "shard_memory", None)
        if callable(shard_memory):
            memory = GaugeMetricFamily(
                "heserve_shard_resident_memory_bytes",
                "Resident memory of each shard's process (not in process_resident_memory_bytes)",
                labels=("shard",),
            )
            try:
                sizes = list(shard_memory())
            except Exception:  # a scrape never fails for a shard that cannot answer now
                log.debug("shard memory unavailable", exc_info=True)
                sizes = []
            for shard, size in enumerate(sizes):
                if size is not None:
                    memory.add_metric([str(shard)], size)
            yield memory
        keys = self._scorer.keys
        for attribute, name, help_text in (
            ("evictions", "heserve_key_evictions", "Key sets evicted to make room"),
            ("expirations", "heserve_key_expirations", "Key sets forgotten after the idle TTL"),
        ):
            value = getattr(keys, attribute, None)
            if isinstance(value, int):
                family = CounterMetricFamily(name, help_text)
                family.add_metric([], value)
                yield family


class CatalogCollector(Collector):
    """The served catalogs and their changes (reloads, updates), read at scrape time."""

    def __init__(self, scorer: Scorer) -> None:
        self._scorer = scorer

    def collect(self) -> Iterator[Metric]:
        items = GaugeMetricFamily(
            "heserve_catalog_items",
            "Items of each catalog's served version",
            labels=("catalog", "version"),
        )
        for name, entry in self._scorer.catalogs.items():
            items.add_metric([name, entry.catalog.version], entry.catalog.item_count)
        yield items
        changes = CounterMetricFamily(
            "heserve_catalog_changes",
            "Catalog reloads and updates by outcome (replaced, updated, unchanged, failed); "
            "a failed one changed nothing",
            labels=("catalog", "kind", "outcome"),
        )
        for (catalog, kind, outcome), count in sorted(self._scorer.change_counts.items()):
            changes.add_metric([catalog, kind, outcome], count)
        yield changes


class Metrics:
    """The metrics of one server."""

    def __init__(self, scorer: Scorer, max_concurrent_rpcs: int | None = None) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)
        Info("heserve_build", "heserve version and parameter preset", registry=registry).info(
            {"version": __version__, "preset": scorer.preset}
        )
        self.requests = Counter("heserve_requests", "RPCs started", _RPC_LABELS, registry=registry)
        self.errors = Counter(
            "heserve_request_errors",
            "RPCs that ended with a status other than OK",
            (*_RPC_LABELS, "code"),
            registry=registry,
        )
        self.latency = Histogram(
            "heserve_request_duration_seconds",
            "Time from the start of an RPC to its last message",
            _RPC_LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.bytes_received = Counter(
            "heserve_received_bytes",
            "Bytes of request messages received",
            _RPC_LABELS,
            registry=registry,
        )
        self.bytes_sent = Counter(
            "heserve_sent_bytes", "Bytes of response messages sent", _RPC_LABELS, registry=registry
        )
        self.items_scored = Counter(
            "heserve_items_scored",
            "Items whose encrypted scores were sent",
            ("catalog",),
            registry=registry,
        )
        self.in_flight = Gauge("heserve_requests_in_flight", "RPCs running now", registry=registry)
        limit = Gauge(
            "heserve_max_concurrent_rpcs",
            "Most RPCs (health checks included) the server runs at once; 0: no limit",
            registry=registry,
        )
        limit.set(max_concurrent_rpcs or 0)
        Gauge("heserve_keys_held", "Key sets in the key store", registry=registry).set_function(
            lambda: len(scorer.keys)
        )
        Gauge(
            "heserve_key_store_bytes", "Bytes of keys in the key store", registry=registry
        ).set_function(lambda: scorer.keys.bytes_held)
        registry.register(ShardCollector(scorer))
        registry.register(CatalogCollector(scorer))
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on host:port (0: any free port); returns the port."""
        self._http, self._thread = start_http_server(port, host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
