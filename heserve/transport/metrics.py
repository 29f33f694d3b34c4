"""Prometheus metrics of a server, in a registry of its own, optionally served over HTTP.

Every RPC is counted by service and method, failures by status code, with a latency
histogram and the bytes of the protobuf messages in and out; Score also counts the
items it scored per catalog. Gauges read the key store on each scrape. Labels are
bounded sets (methods, status codes, served catalogs): no caller input becomes one.
"""

from __future__ import annotations

import threading
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
