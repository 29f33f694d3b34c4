"""End to end: a real heserve server on loopback under concurrent clients, and the
server-side "Apple PNNS" case.

The load run times what a user sees (encrypt, gRPC, score, decrypt); the
server-side case times what Apple's PNNS benchmark times: deserialising the key
and the query, computing, and serialising the response.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from bench.methods import (
    CATALOG,
    METHODS,
    PARAMS,
    FloatArray,
    Workload,
    complex_score_steps,
    decrypt_runs,
    item_ids,
)
from bench.results import LoadRecord, ServerSideRecord
from heserve.domain.catalog import Catalog
from heserve.domain.scorer import ScoredRun, Scorer
from heserve.protocol.params import DEFAULT_PRESET, PRESETS, CkksParameters
from heserve.transport.server import RunningServer, start_server
from heserve_client import Client
from heserve_client._secret import SecretContext

# Apple swift-homomorphic-encryption, PNNS benchmark, 4,096 items × 128 dimensions
# (as quoted in the brief): time range, and key / query / response sizes in bytes.
APPLE_SECONDS = (10.4e-3, 12.5e-3)
APPLE_KEY_BYTES = 170_000
APPLE_QUERY_BYTES = 28_000
APPLE_RESPONSE_BYTES = 52_000


def make_scorer(workload: Workload, params: CkksParameters = PARAMS) -> Scorer:
    """A Scorer serving the workload's catalog as `bench` (encoding happens here)."""
    catalog = Catalog(CATALOG, np.array(workload.catalog), item_ids(workload.items))
    return Scorer(params, [catalog])


def preset_tolerance(preset: str) -> float:
    """The error a preset is held to: its inner-loop method's tolerance."""
    name = "engine" if preset == DEFAULT_PRESET else f"engine-{preset}"
    return METHODS[name].max_abs_error


@contextmanager
def running_server(workload: Workload) -> Iterator[tuple[Scorer, RunningServer]]:
    scorer = make_scorer(workload)
    running = start_server(scorer, "127.0.0.1", 0)
    try:
        yield scorer, running
    finally:
        running.stop(grace=None)


def run_load(target: str, workload: Workload, clients: int, queries: int) -> LoadRecord:
    """`clients` threads, each with its own Client, each sending `queries` queries.

    Keys are generated and registered, and one warm-up query made, per client
    before the clock starts; then all clients start together and the wall time
    runs until the last one finishes.
    """
    expected = workload.expected()
    sessions = [Client(target, timeout=600.0) for _ in range(clients)]
    try:
        registering = []
        for client in sessions:
            started = time.perf_counter()
            client.register_keys()
            registering.append(time.perf_counter() - started)
        errors = [
            float(np.abs(client.score(workload.query, catalog=CATALOG) - expected).max())
            for client in sessions
        ]
        latencies: list[list[float]] = [[] for _ in sessions]
        crypto: list[list[tuple[float, float]]] = [[] for _ in sessions]
        failures: list[BaseException] = []
        start = threading.Barrier(clients + 1)

        def worker(index: int) -> None:
            client = sessions[index]
            try:
                start.wait()
                for _ in range(queries):
                    began = time.perf_counter()
                    scores = client.score(workload.query, catalog=CATALOG)
                    latencies[index].append(time.perf_counter() - began)
                    stats = client.stats
                    crypto[index].append((stats.last_encrypt_seconds, stats.last_decrypt_seconds))
                errors[index] = max(errors[index], float(np.abs(scores - expected).max()))
            except BaseException as exc:  # reported after join
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        start.wait()
        began = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        if failures:
            raise failures[0]
        flat = np.array([sample for per_client in latencies for sample in per_client])
        pairs = [pair for per_client in crypto for pair in per_client]
        stats = sessions[0].stats
        total = clients * queries
        return LoadRecord(
            d=workload.dimension,
            items=workload.items,
            clients=clients,
            queries=total,
            wall_seconds=wall,
            queries_per_second=total / wall,
            items_per_second=total * workload.items / wall,
            p50_ms=float(np.percentile(flat, 50)) * 1e3,
            p99_ms=float(np.percentile(flat, 99)) * 1e3,
            max_ms=float(flat.max()) * 1e3,
            key_bytes=stats.key_bytes_sent // max(1, stats.registrations),
            query_bytes=stats.last_query_bytes,
            response_bytes=stats.last_response_bytes,
            register_seconds=statistics.median(registering),
            encrypt_ms=statistics.median(p[0] for p in pairs) * 1e3,
            decrypt_ms=statistics.median(p[1] for p in pairs) * 1e3,
            max_abs_error=max(errors),
        )
    finally:
        for client in sessions:
            client.close()


@dataclass
class ServerSideCase:
    """The server's whole part of one query, from bytes in to bytes out, under one preset.

    `run()` is `register_keys(key blob)` plus the `score(..., complex_scores=True)`
    generator fully consumed (which loads and checks the query, scores, and
    serialises each response ciphertext); `reset()` forgets the keys so the next run
    loads them again. The key blob is what the Python client uploads: the rotation
    steps without the conjugation key, which complex scores do not need.
    """

    preset: str
    scorer: Scorer
    secret: SecretContext
    expected: FloatArray
    key_blob: bytes
    query_blob: bytes
    key_id: str = ""

    @classmethod
    def build(cls, workload: Workload, preset: str = DEFAULT_PRESET) -> ServerSideCase:
        params = PRESETS[preset]
        scorer = make_scorer(workload, params)
        secret = SecretContext(params)
        plan = scorer.catalog(CATALOG).plan
        return cls(
            preset=preset,
            scorer=scorer,
            secret=secret,
            expected=workload.expected(),
            key_blob=secret.galois_keys(complex_score_steps(scorer)),
            query_blob=secret.encrypt(plan.query_slots(workload.query)),
        )

    def reset(self) -> None:
        if self.key_id:
            self.scorer.delete_keys(self.key_id)

    def register(self) -> str:
        self.key_id = self.scorer.register_keys(self.key_blob)
        return self.key_id

    def score(self) -> list[ScoredRun]:
        return list(
            self.scorer.score(self.key_id, CATALOG, self.query_blob, [], complex_scores=True)
        )

    def run(self) -> list[ScoredRun]:
        self.register()
        return self.score()

    def error(self, responses: list[ScoredRun]) -> float:
        return float(np.abs(decrypt_runs(self.secret, responses) - self.expected).max())

    def breakdown(self, rounds: int) -> tuple[float, float]:
        """Median seconds of the key registration and of the scoring, timed apart."""
        registering, scoring = [], []
        for _ in range(rounds):
            self.reset()
            began = time.perf_counter()
            self.register()
            registering.append(time.perf_counter() - began)
            began = time.perf_counter()
            self.score()
            scoring.append(time.perf_counter() - began)
        return statistics.median(registering), statistics.median(scoring)

    def record(self, seconds: float, rounds: int, responses: list[ScoredRun]) -> ServerSideRecord:
        register, score = self.breakdown(rounds)
        items, d = self.scorer.catalog(CATALOG).catalog.embeddings.shape
        params = self.scorer.params
        return ServerSideRecord(
            d=int(d),
            items=int(items),
            rounds=rounds,
            seconds=seconds,
            register_seconds=register,
            score_seconds=score,
            key_bytes=len(self.key_blob),
            query_bytes=len(self.query_blob),
            response_bytes=sum(len(run.scores) for run in responses),
            max_abs_error=self.error(responses),
            preset=self.preset,
            poly_modulus_degree=params.poly_modulus_degree,
            responses=len(responses),
        )
