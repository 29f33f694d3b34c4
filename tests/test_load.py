"""A bounded load test on loopback: `heserve serve` with its default process pool (two
worker processes) and a small catalog, under several concurrent clients for a fixed
time. No call may fail, and the memory of the server and its workers must stay flat.

`pytest -s tests/test_load.py` prints the figures; they also go into the test report
(`record_property`, e.g. in `--junitxml`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from heserve.domain.catalog import unit_rows
from heserve_client import Client

CLIENTS = 4
SECONDS = 15.0
WORKERS = 2
ITEMS, DIMENSION = 2 * 8192, 32  # two output ciphertexts: one per worker
MIB = 1 << 20
# Flat: less than 15% or 50 MiB of growth between the warm-up and the end.
MAX_GROWTH_FRACTION, MAX_GROWTH_BYTES = 0.15, 50 * MIB


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                parent = int(file.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0  # a zombie has no VmRSS


def _footprint(pid: int) -> tuple[int, int, int]:
    """Resident bytes, open file descriptors and process count of `pid` and below it."""
    pids = _descendants(pid)
    return (
        sum(_rss_bytes(p) for p in pids),
        sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids),
        len(pids),
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, np.ndarray]]:
    """A `heserve serve` process with its worker pool, its address and its catalog."""
    embeddings = unit_rows(ITEMS, DIMENSION, seed=91)
    np.save(tmp_path / "small.npy", embeddings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HESERVE_")}
    log = (tmp_path / "serve.log").open("w")
    serve = ["serve", "--catalog", "small=small.npy", "--port", "0", "--workers", str(WORKERS)]
    process = subprocess.Popen(
        [sys.executable, "-m", "heserve.ops.cli", *serve, "--log-level", "WARNING"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r" on 127\.0\.0\.1:(\d+) ", line)
        assert match, (line, (tmp_path / "serve.log").read_text())
        yield process, f"127.0.0.1:{match.group(1)}", embeddings
        process.terminate()
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
        if process.stdout is not None:
            process.stdout.close()
        log.close()
    logged = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in logged and "ERROR" not in logged, logged


def test_load_concurrent_clients_zero_errors_flat_memory(
    served: tuple[subprocess.Popen[str], str, np.ndarray],
    record_property: Callable[[str, object], None],
) -> None:
    process, target, embeddings = served
    vectors = unit_rows(CLIENTS, DIMENSION, seed=92)
    clients = [Client(target, timeout=60) for _ in range(CLIENTS)]
    queries = [0] * CLIENTS
    errors: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    try:
        for client, vector in zip(clients, vectors, strict=True):  # keys and a warm-up
            for _ in range(2):
                assert (
                    np.abs(client.score(vector, catalog="small") - embeddings @ vector).max() < 1e-4
                )
        rss_before, fds_before, processes = _footprint(process.pid)
        assert processes >= 1 + WORKERS  # and multiprocessing's resource tracker

        stop = time.monotonic() + SECONDS

        def run(index: int) -> None:
            client, vector = clients[index], vectors[index]
            expected = embeddings @ vector
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    scores = client.score(vector, catalog="small")
                    assert np.abs(scores - expected).max() < 1e-4, "wrong scores"
                except Exception as error:  # counted, not raised: the run goes on
                    with lock:
                        errors.append(f"{type(error).__name__}: {error}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)
                queries[index] += 1

        began = time.monotonic()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=SECONDS + 120)
        elapsed = time.monotonic() - began
        assert not any(thread.is_alive() for thread in threads), "a client hung"
        rss_after, fds_after, _ = _footprint(process.pid)
    finally:
        for client in clients:
            client.close()

    total = sum(queries)
    growth = rss_after - rss_before
    figures = {
        "clients": CLIENTS,
        "seconds": round(elapsed, 1),
        "queries": total,
        "errors": len(errors),
        "queries_per_second": round(total / elapsed, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1) if latencies else None,
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1) if latencies else None,
        "rss_before_mib": round(rss_before / MIB, 1),
        "rss_after_mib": round(rss_after / MIB, 1),
        "rss_growth_mib": round(growth / MIB, 1),
        "fds_before": fds_before,
        "fds_after": fds_after,
    }
    for name, value in figures.items():
        record_property(name, value)
    print("\nload:", ", ".join(f"{name} {value}" for name, value in figures.items()))

    assert not errors, errors[:5]
    assert all(queries), queries  # every client got through
    assert growth < max(MAX_GROWTH_FRACTION * rss_before, MAX_GROWTH_BYTES), figures
    assert fds_after - fds_before <= 8, figures  # no descriptor (scratch file, pipe) leaks
