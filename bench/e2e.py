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

from bench.methods import PARAMS, FloatArray, Workload, decrypt_scores
from bench.results import LoadRecord, ServerSideRecord
from heserve import seal_io
from heserve.catalog import Catalog
from heserve.scoring import Scorer
from heserve.server import RunningServer, start_server
from heserve_client import Client
from heserve_client._secret import SecretContext

CATALOG = "bench"

# Apple swift-homomorphic-encryption, PNNS benchmark, 4,096 items × 128 dimensions
# (as quoted in the brief): time range, and key / query / response sizes in bytes.
APPLE_SECONDS = (10.4e-3, 12.5e-3)
APPLE_KEY_BYTES = 170_000
APPLE_QUERY_BYTES = 28_000
APPLE_RESPONSE_BYTES = 52_000


def make_scorer(workload: Workload) -> Scorer:
    """A Scorer serving the workload's catalog as `bench` (encoding happens here)."""
    ids = tuple(f"item-{i}" for i in range(workload.items))
    return Scorer(PARAMS, [Catalog(CATALOG, np.array(workload.catalog), ids)])


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
    """The server's whole part of one query, from bytes in to bytes out.

    `run()` is `register_keys(key blob)` plus the `score(...)` generator fully
    consumed (which loads the query, scores, and serialises each response
    ciphertext); `reset()` forgets the keys so the next run loads them again.
    """

    scorer: Scorer
    secret: SecretContext
    expected: FloatArray
    key_blob: bytes
    query_blob: bytes
    key_id: str = ""

    @classmethod
    def build(cls, workload: Workload) -> ServerSideCase:
        scorer = make_scorer(workload)
        secret = SecretContext(PARAMS)
        plan = scorer.catalog(CATALOG).plan
        return cls(
            scorer=scorer,
            secret=secret,
            expected=workload.expected(),
            key_blob=secret.galois_keys(scorer.galois_steps),
            query_blob=secret.encrypt(plan.query_slots(workload.query)),
        )

    def reset(self) -> None:
        if self.key_id:
            self.scorer.delete_keys(self.key_id)

    def register(self) -> str:
        self.key_id = self.scorer.register_keys(self.key_blob)
        return self.key_id

    def score(self) -> list[bytes]:
        return [run.scores for run in self.scorer.score(self.key_id, CATALOG, self.query_blob, [])]

    def run(self) -> list[bytes]:
        self.register()
        return self.score()

    def error(self, responses: list[bytes]) -> float:
        max_bytes = self.scorer.limits.max_message_bytes
        ciphertexts = [
            seal_io.load_ciphertext(self.scorer.engine.context, blob, max_bytes)
            for blob in responses
        ]
        scores = decrypt_scores(self.secret, ciphertexts, len(self.expected), PARAMS.slot_count)
        return float(np.abs(scores - self.expected).max())

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

    def record(self, seconds: float, rounds: int, responses: list[bytes]) -> ServerSideRecord:
        register, score = self.breakdown(rounds)
        items, d = self.scorer.catalog(CATALOG).catalog.embeddings.shape
        return ServerSideRecord(
            d=int(d),
            items=int(items),
            rounds=rounds,
            seconds=seconds,
            register_seconds=register,
            score_seconds=score,
            key_bytes=len(self.key_blob),
            query_bytes=len(self.query_blob),
            response_bytes=sum(len(blob) for blob in responses),
            max_abs_error=self.error(responses),
        )
