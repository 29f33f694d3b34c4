"""The cost of distribution: the same query on the local process pool and on Ray.

    python -m bench.ray_bench [--ray both|cluster|init] [--items 65536] [--dimension 128]
                              [--queries 10] [--preset precise] [--no-grpc]

One catalog (d = 128, 65,536 unit-norm rows by default) is served, twice:

- `cluster` pass: `heserve.backends.pool.PoolBackend` with 2 worker processes
  ("pool") beside `heserve.backends.ray_cluster.RayBackend` on a local
  `ray.cluster_utils.Cluster` of two nodes of 1 CPU each (two raylets and two
  object stores on loopback: keys and rows cross between nodes as on a real
  cluster);
- `init` pass: the pool beside `RayBackend` on `ray.init(num_cpus=2)` (one node).

In a pass both backends serve at once, and the same query (complex scores, as
the Python client asks) goes to each in turn, round by round (`--queries`
rounds, the order alternating), timed as `list(Scorer.score(...))` and, unless
`--no-grpc`, as `Client.score` through a gRPC server on loopback per backend.
On a shared machine the other work then weighs on both alike; the ratio to the
pool is the median of the per-round ratios. Then, per backend:

- key shipping: a second catalog with one chunk per shard, on the same shards
  behind a second Scorer, is queried with a new key_id and then again with it;
  the difference is what shipping the keys to the shards costs (each shard gets
  the whole key, in parallel, so this is the cost per shard), median of 5 fresh
  key pairs;
- a shard restart: one shard is killed (`ray.kill(actor, no_restart=False)`, or
  SIGKILL to a pool worker) and the time until a query next succeeds is measured;
  the restarted shard re-encodes its part of the catalog (Ray: lazily, on that
  query; the pool: at once, then the waiting query runs).

Prints a table and saves JSON under bench/results/ (`<stamp>-ray.json`).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from bench.methods import (
    CATALOG,
    CatalogSource,
    Workload,
    complex_score_steps,
    decrypt_runs,
    item_ids,
    unit_vectors,
)
from bench.report import _table
from bench.results import save_run
from heserve.backends.base import Backend
from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog
from heserve.domain.errors import UnavailableError
from heserve.domain.scorer import ScoredRun, Scorer
from heserve.protocol.params import DEFAULT_PRESET, PRESETS, CkksParameters
from heserve.transport.server import start_server
from heserve_client import Client
from heserve_client._secret import SecretContext

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
SMALL = "one-chunk-per-shard"
SHARDS = 2
KEY_TRIALS = 5
RESTART_DEADLINE_SECONDS = 300.0
OBJECT_STORE_BYTES = 300 << 20


@dataclass
class BackendRecord:
    """One backend's figures, all in seconds unless named otherwise."""

    run: str
    """Which pass: the pool and one Ray setup are served at once and measured side by side."""
    backend: str
    shards: int
    start_seconds: float
    """Backend start: worker processes spawned, or Ray started and actors created."""
    encode_seconds: float
    """Scorer construction: the catalog sent to the shards and encoded there."""
    first_query_seconds: float
    """The first query, which also ships the keys to every shard."""
    query_seconds: float
    """Median `list(Scorer.score(...))`, keys already held by the shards."""
    query_samples: list[float]
    query_ratio: float
    """Median over rounds of this backend's Scorer.score time ÷ the pool's, same round."""
    max_abs_error: float
    client_seconds: float | None
    """Median `Client.score` through a gRPC server on loopback (None: --no-grpc)."""
    client_samples: list[float]
    client_ratio: float | None
    """As `query_ratio`, for Client.score over gRPC."""
    key_bytes: int
    """Bytes of the key upload; every shard gets all of them once per key_id."""
    key_register_seconds: float
    """Scorer.register_keys (front end: deserialise and check), median."""
    key_first_query_seconds: float
    key_known_query_seconds: float
    key_shipping_seconds: float
    """Median over fresh key pairs of (first query with the key_id − later query)."""
    restart_seconds: float
    """From killing one shard until a query next succeeded (including that query)."""
    restart_failed_queries: int
    restart_success_query_seconds: float
    """The successful query alone (the restarted shard re-encodes in it, on Ray)."""
    restart_error: float
    ray_start_seconds: float | None = None
    """Ray itself started (nodes and ray.init); None for the pool."""
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------ backends


@contextmanager
def ray_cluster(mode: str) -> Iterator[tuple[str, float]]:
    """Start Ray (two 1-CPU nodes, or one 2-CPU node); yield (description, seconds it
    took to start); shut it down."""
    import ray

    started = time.perf_counter()
    if mode == "cluster":
        from ray.cluster_utils import Cluster

        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES},
        )
        try:
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
            ray.init(address=cluster.address, log_to_driver=False, include_dashboard=False)
            try:
                where = "local Ray cluster, 2 nodes × 1 CPU (ray.cluster_utils.Cluster)"
                yield where, time.perf_counter() - started
            finally:
                ray.shutdown()
        finally:
            cluster.shutdown()
    else:
        ray.init(
            num_cpus=SHARDS,
            object_store_memory=OBJECT_STORE_BYTES,
            log_to_driver=False,
            include_dashboard=False,
        )
        try:
            yield f"ray.init(num_cpus={SHARDS}), one node", time.perf_counter() - started
        finally:
            ray.shutdown()


def kill_pool_worker(backend: Backend) -> None:
    assert isinstance(backend, PoolBackend)
    os.kill(backend.worker_pids()[1], signal.SIGKILL)


def kill_ray_actor(backend: Backend) -> None:
    from heserve.backends.ray_cluster import RayBackend

    assert isinstance(backend, RayBackend)
    backend.kill_actor(1)  # Ray restarts it


# ------------------------------------------------------------------------- measuring


def _timed(call: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, T]:
    """Seconds `call(*args, **kwargs)` took, and its result."""
    started = time.perf_counter()
    result = call(*args, **kwargs)
    return time.perf_counter() - started, result


def _score(scorer: Scorer, key_id: str, catalog: str, query: bytes) -> list[ScoredRun]:
    return list(scorer.score(key_id, catalog, query, [], complex_scores=True))


def key_shipping(
    scorer: Scorer, params: CkksParameters, small: Workload
) -> tuple[int, float, float, float, float]:
    """(key bytes, register s, first query s, known-key query s, shipping s), medians."""
    registering, firsts, knowns, shipping = [], [], [], []
    size = 0
    plan = scorer.catalog(SMALL).plan
    for _ in range(KEY_TRIALS):
        secret = SecretContext(params)
        blob = secret.galois_keys(complex_score_steps(scorer))
        size = len(blob)
        query = secret.encrypt(plan.query_slots(small.query))
        seconds, key_id = _timed(scorer.register_keys, blob)
        registering.append(seconds)
        first, _ = _timed(_score, scorer, key_id, SMALL, query)
        later = [_timed(_score, scorer, key_id, SMALL, query)[0] for _ in range(3)]
        known = statistics.median(later)
        firsts.append(first)
        knowns.append(known)
        shipping.append(first - known)
        scorer.delete_keys(key_id)
    return (
        size,
        statistics.median(registering),
        statistics.median(firsts),
        statistics.median(knowns),
        statistics.median(shipping),
    )


def restart(
    scorer: Scorer,
    kill: Callable[[Backend], None],
    key_id: str,
    query: bytes,
) -> tuple[float, int, float, list[ScoredRun]]:
    """Kill shard 1, then query until a query succeeds: (seconds, failures, last query s, runs)."""
    kill(scorer.backend)
    started = time.perf_counter()
    failures = 0
    while True:
        try:
            seconds, runs = _timed(lambda: _score(scorer, key_id, CATALOG, query))
            return time.perf_counter() - started, failures, seconds, runs
        except UnavailableError:
            failures += 1
            if time.perf_counter() - started > RESTART_DEADLINE_SECONDS:
                raise
            time.sleep(0.01)


@dataclass
class Served:
    """One backend set up: its Scorers, a registered key, a query, and what it took."""

    name: str
    backend: Backend
    kill: Callable[[Backend], None]
    scorer: Scorer
    small_scorer: Scorer
    small: Workload
    secret: SecretContext
    key_id: str
    query: bytes
    start_seconds: float
    encode_seconds: float
    first_query_seconds: float


def serve(
    name: str,
    make_backend: Callable[[], Backend],
    kill: Callable[[Backend], None],
    params: CkksParameters,
    workload: Workload,
) -> Served:
    """Start a backend, encode the catalog on it, register keys and make the first query."""
    start, backend = _timed(make_backend)
    try:
        small = Workload(
            unit_vectors(2 * params.slot_count * backend.shard_count, workload.dimension, 99),
            workload.query,
        )
        catalog = Catalog(CATALOG, np.array(workload.catalog), item_ids(workload.items))
        encode, scorer = _timed(lambda: Scorer(params, [catalog], backend=backend))
        # The small catalog on the same shards, behind its own Scorer so that each
        # Scorer asks for the keys of its own plan only (two rotation steps each).
        small_scorer = Scorer(
            params, [Catalog(SMALL, small.catalog, item_ids(small.items))], backend=backend
        )
        secret = SecretContext(params)
        key_id = scorer.register_keys(secret.galois_keys(complex_score_steps(scorer)))
        query = secret.encrypt(scorer.catalog(CATALOG).plan.query_slots(workload.query))
        first, _ = _timed(_score, scorer, key_id, CATALOG, query)
    except BaseException:
        backend.close()
        raise
    return Served(
        name,
        backend,
        kill,
        scorer,
        small_scorer,
        small,
        secret,
        key_id,
        query,
        start,
        encode,
        first,
    )


def interleaved_queries(
    served: list[Served], workload: Workload, queries: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """`queries` rounds, each one Scorer.score per backend (order alternating per round),
    so that every backend meets the same contention from other work on the machine."""
    expected = workload.expected()
    samples: dict[str, list[float]] = {entry.name: [] for entry in served}
    errors = {entry.name: 0.0 for entry in served}
    for round_ in range(queries):
        for entry in served if round_ % 2 == 0 else served[::-1]:
            seconds, runs = _timed(_score, entry.scorer, entry.key_id, CATALOG, entry.query)
            samples[entry.name].append(seconds)
            error = float(np.abs(decrypt_runs(entry.secret, runs) - expected).max())
            errors[entry.name] = max(errors[entry.name], error)
    return samples, errors


def interleaved_clients(
    served: list[Served], workload: Workload, queries: int
) -> dict[str, list[float]]:
    """Client.score through a gRPC server on loopback per backend, rounds interleaved
    (keys registered and one warm-up query per client first)."""
    servers = []
    clients: dict[str, Client] = {}
    try:
        for entry in served:
            running = start_server(entry.scorer, "127.0.0.1", 0)
            servers.append(running)
            client = Client(f"127.0.0.1:{running.port}", timeout=600.0)
            clients[entry.name] = client
            client.register_keys()
            client.score(workload.query, catalog=CATALOG)
        samples: dict[str, list[float]] = {entry.name: [] for entry in served}
        for round_ in range(queries):
            for entry in served if round_ % 2 == 0 else served[::-1]:
                seconds, _ = _timed(clients[entry.name].score, workload.query, catalog=CATALOG)
                samples[entry.name].append(seconds)
        return samples
    finally:
        for client in clients.values():
            client.close()
        for running in servers:
            running.stop(grace=None)


def _paired_ratio(samples: list[float], reference: list[float]) -> float:
    """Median over rounds of this backend's time ÷ the reference's in the same round."""
    return statistics.median(a / b for a, b in zip(samples, reference, strict=True))


def measure_pass(
    run: str,
    backends: list[tuple[str, Callable[[], Backend], Callable[[Backend], None]]],
    params: CkksParameters,
    workload: Workload,
    queries: int,
    grpc: bool,
) -> list[BackendRecord]:
    """Serve the catalog on every backend at once and measure them side by side.

    Ratios are to the first backend (the local pool), round by round.
    """
    served: list[Served] = []
    try:
        for name, make_backend, kill in backends:
            served.append(serve(name, make_backend, kill, params, workload))
        samples, errors = interleaved_queries(served, workload, queries)
        client_samples = interleaved_clients(served, workload, queries) if grpc else {}
        base = served[0].name
        records = []
        for entry in served:
            key_bytes, register, key_first, key_known, shipping = key_shipping(
                entry.small_scorer, params, entry.small
            )
            restarted, failures, success, runs = restart(
                entry.scorer, entry.kill, entry.key_id, entry.query
            )
            restart_error = float(
                np.abs(decrypt_runs(entry.secret, runs) - workload.expected()).max()
            )
            through_grpc = client_samples.get(entry.name)
            records.append(
                BackendRecord(
                    run=run,
                    backend=entry.name,
                    shards=entry.backend.shard_count,
                    start_seconds=entry.start_seconds,
                    encode_seconds=entry.encode_seconds,
                    first_query_seconds=entry.first_query_seconds,
                    query_seconds=statistics.median(samples[entry.name]),
                    query_samples=samples[entry.name],
                    query_ratio=_paired_ratio(samples[entry.name], samples[base]),
                    max_abs_error=errors[entry.name],
                    client_seconds=None
                    if through_grpc is None
                    else statistics.median(through_grpc),
                    client_samples=through_grpc or [],
                    client_ratio=(
                        None
                        if through_grpc is None
                        else _paired_ratio(through_grpc, client_samples[base])
                    ),
                    key_bytes=key_bytes,
                    key_register_seconds=register,
                    key_first_query_seconds=key_first,
                    key_known_query_seconds=key_known,
                    key_shipping_seconds=shipping,
                    restart_seconds=restarted,
                    restart_failed_queries=failures,
                    restart_success_query_seconds=success,
                    restart_error=restart_error,
                )
            )
        return records
    finally:
        for entry in served:
            entry.backend.close()


# --------------------------------------------------------------------------- report


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.0f}"


def render(records: list[BackendRecord], items: int, dimension: int, preset: str) -> str:
    """One table per pass: the pool beside one Ray setup, measured at the same time."""
    tables = []
    for run in dict.fromkeys(record.run for record in records):
        tables.append(_render_pass([r for r in records if r.run == run], items, dimension, preset))
    return "\n\n".join(tables)


def _render_pass(records: list[BackendRecord], items: int, dimension: int, preset: str) -> str:
    base = records[0]

    def ratio(value: float | None, reference: float | None) -> str:
        if value is None or reference is None or reference <= 0:
            return "-"
        return f"{value / reference:.2f}×"

    def paired(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}×"

    rows = [
        ["Ray start (nodes + ray.init)", *(_ms(r.ray_start_seconds) for r in records)],
        ["backend start (processes/actors)", *(_ms(r.start_seconds) for r in records)],
        ["catalog encode", *(_ms(r.encode_seconds) for r in records)],
        ["first query (ships keys)", *(_ms(r.first_query_seconds) for r in records)],
        ["Scorer.score, median", *(_ms(r.query_seconds) for r in records)],
        ["  ÷ pool, round by round (median)", *(paired(r.query_ratio) for r in records)],
        ["Client.score over gRPC, median", *(_ms(r.client_seconds) for r in records)],
        ["  ÷ pool, round by round (median)", *(paired(r.client_ratio) for r in records)],
        ["key bytes per shard", *(f"{r.key_bytes / 1000:,.0f} KB" for r in records)],
        ["key register (front end)", *(_ms(r.key_register_seconds) for r in records)],
        ["query, new key_id (1 chunk/shard)", *(_ms(r.key_first_query_seconds) for r in records)],
        ["query, known key_id", *(_ms(r.key_known_query_seconds) for r in records)],
        [
            "  ÷ pool",
            *(ratio(r.key_known_query_seconds, base.key_known_query_seconds) for r in records),
        ],
        ["key shipping per shard", *(_ms(r.key_shipping_seconds) for r in records)],
        ["shard restart → next query ok", *(_ms(r.restart_seconds) for r in records)],
        [
            "  of which the successful query",
            *(_ms(r.restart_success_query_seconds) for r in records),
        ],
        ["  queries failed meanwhile", *(str(r.restart_failed_queries) for r in records)],
        [
            "max abs error (after restart)",
            *(f"{max(r.max_abs_error, r.restart_error):.1e}" for r in records),
        ],
    ]
    header = [f"{items:,} × {dimension}, {preset}, ms", *(r.backend for r in records)]
    notes = [f"  {r.backend}: {note}" for r in records for note in r.notes]
    return "\n".join([_table(header, rows), *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ray_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ray", choices=("both", "cluster", "init"), default="both")
    parser.add_argument("--items", type=int, default=65_536)
    parser.add_argument("--dimension", type=int, default=128)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC Client timing")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)

    try:
        import ray  # noqa: F401
    except ImportError:
        print("bench.ray_bench needs Ray: pip install 'heserve[ray]'", file=sys.stderr)
        return 2
    from heserve.backends.ray_cluster import RayBackend

    params = PRESETS[args.preset]
    workload = CatalogSource().workload(args.dimension, args.items)
    records: list[BackendRecord] = []
    for mode in ("cluster", "init") if args.ray == "both" else (args.ray,):
        with ray_cluster(mode) as (where, ray_start):
            measured = measure_pass(
                mode,
                [
                    ("pool", lambda: PoolBackend(params, workers=SHARDS), kill_pool_worker),
                    (f"ray-{mode}", lambda: RayBackend(params, shards=SHARDS), kill_ray_actor),
                ],
                params,
                workload,
                args.queries,
                grpc=not args.no_grpc,
            )
        measured[0].notes.append(f"PoolBackend({SHARDS} workers), Ray idle beside it")
        measured[1].notes.append(where)
        measured[1].ray_start_seconds = ray_start
        records += measured
        print(
            f"{mode}: pool {measured[0].query_seconds * 1e3:.0f} ms, "
            f"ray {measured[1].query_seconds * 1e3:.0f} ms per query",
            flush=True,
        )

    print()
    print(render(records, workload.items, workload.dimension, args.preset))
    save_run(
        args.out_dir,
        "ray",
        {
            "items": workload.items,
            "dimension": workload.dimension,
            "preset": args.preset,
            "queries": args.queries,
            "records": [asdict(record) for record in records],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
