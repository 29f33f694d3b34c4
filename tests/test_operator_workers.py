"""Worker processes as an operator sees them (issue 12, items 4 and 6): named in `ps`,
their death logged at WARNING even when idle, counted in /metrics with their memory.
Real worker processes, a real server on loopback, the JSON log stream parsed line by line."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import TIMEOUT, make_catalog

from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.ops.logs import JsonFormatter
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.transport.server import RunningServer, start_server
from heserve_client import Client


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return make_catalog("shop", 3 * DEFAULT_PARAMETERS.slot_count, 16, seed=141)


@pytest.fixture(scope="module")
def scorer(catalog: Catalog) -> Iterator[Scorer]:
    backend = PoolBackend(DEFAULT_PARAMETERS, workers=2)
    yield Scorer(DEFAULT_PARAMETERS, [catalog], backend=backend)
    backend.close()


@pytest.fixture(scope="module")
def pool(scorer: Scorer) -> Iterator[tuple[RunningServer, PoolBackend]]:
    server = start_server(scorer, "127.0.0.1", 0)
    assert isinstance(scorer.backend, PoolBackend)
    yield server, scorer.backend
    server.stop(grace=None)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The pool's log records as the server writes them with --log-format json."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("heserve.backends.pool")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def _wait_for(condition: object, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_workers_are_named_in_ps_and_their_memory_is_exported(
    pool: tuple[RunningServer, PoolBackend],
) -> None:
    server, backend = pool
    for shard, pid in enumerate(backend.worker_pids()):
        with open(f"/proc/{pid}/comm") as comm:
            assert comm.read().strip() == f"heserve-shard{shard}"
    registry = server.metrics.registry
    assert registry.get_sample_value("heserve_shards") == 2
    for shard, pid in enumerate(backend.worker_pids()):
        exported = registry.get_sample_value(
            "heserve_shard_resident_memory_bytes", {"shard": str(shard)}
        )
        with open(f"/proc/{pid}/status") as status:
            rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        assert exported is not None and exported > 20 << 20  # a SEAL context and a shard
        assert abs(exported - rss_kib * 1024) < 0.2 * exported + (8 << 20)


def test_a_worker_killed_while_idle_is_logged_at_warning_and_counted(
    pool: tuple[RunningServer, PoolBackend], catalog: Catalog, json_log: io.StringIO
) -> None:
    server, backend = pool
    registry = server.metrics.registry
    restarts = registry.get_sample_value("heserve_shard_restarts_total")
    assert restarts == backend.restarts
    victim = backend.worker_pids()[1]

    os.kill(victim, signal.SIGKILL)  # no query in flight: only the route thread notices
    _wait_for(lambda: backend.restarts == restarts + 1)

    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    died = [r for r in records if r.get("event") == "shard_died"]
    assert len(died) == 1, records
    assert died[0]["level"] == "WARNING"
    assert (died[0]["shard"], died[0]["pid"]) == (1, victim)
    assert died[0]["exit"] == "killed by SIGKILL"
    assert "SIGKILL" in died[0]["msg"] and "heserve-worker-1" in died[0]["msg"]
    back = [r for r in records if r.get("event") == "shard_restarted"]
    assert len(back) == 1 and back[0]["level"] == "WARNING" and back[0]["shard"] == 1
    assert back[0]["pid"] == backend.worker_pids()[1] != victim
    assert registry.get_sample_value("heserve_shard_restarts_total") == restarts + 1
    with open(f"/proc/{backend.worker_pids()[1]}/comm") as comm:
        assert comm.read().strip() == "heserve-shard1"  # the replacement is named too

    vector = unit_rows(1, catalog.dimension, seed=142)[0]
    with Client(f"127.0.0.1:{server.port}", timeout=TIMEOUT) as client:
        scores = client.score(vector, catalog="shop")
    assert np.abs(scores - catalog.embeddings @ vector).max() < 1e-4


def test_key_store_evictions_are_exported_once_the_key_store_counts_them(
    pool: tuple[RunningServer, PoolBackend], scorer: Scorer
) -> None:
    """The exporter's half: a key store with `evictions` and `expirations` counters (ints)
    has them scraped as heserve_key_evictions_total and heserve_key_expirations_total."""
    server, _ = pool
    registry = server.metrics.registry
    store = scorer.keys
    counted = {name: getattr(store, name, None) for name in ("evictions", "expirations")}
    try:
        setattr(store, "evictions", 3)  # noqa: B010 - whatever the class declares
        setattr(store, "expirations", 5)  # noqa: B010
        assert registry.get_sample_value("heserve_key_evictions_total") == 3
        assert registry.get_sample_value("heserve_key_expirations_total") == 5
    finally:
        for name, value in counted.items():
            if value is None:
                delattr(store, name)
            else:
                setattr(store, name, value)
