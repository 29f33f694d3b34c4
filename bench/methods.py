"""Workloads and the registry of scoring methods the benchmarks time.

Every method scores the same thing: a catalog W (n × d, unit-norm rows) against a
query u, W·u. A method is a name plus a `setup(workload) -> Runner` callable: setup
does everything that is not per-query work (encoding the catalog, making keys,
encrypting the query) and returns a `Runner` whose `run()` is the timed call and
whose `error(result)` checks that call's output against numpy.

Adding a method is one `register(Method(...))` call; the tiers, the
pytest-benchmark files, the report and the regression gate pick it up by name.
"engine-pool-1" and "engine-pool-2" (the multi-process engine behind a Scorer)
were added that way. A runner that holds processes releases them in `close()`,
which the harness calls after every case.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import tenseal as ts
import tenseal.sealapi as seal

from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog
from heserve.domain.scorer import CONJUGATION_STEP, ScoredRun, Scorer
from heserve.he.engine import Engine, encoded_chunk_bytes
from heserve.he.plan import DiagonalPlan
from heserve.protocol import wire
from heserve.protocol.params import DEFAULT_PARAMETERS, PRESETS, CkksParameters
from heserve.protocol.slots import unpack_complex
from heserve_client._secret import SecretContext

FloatArray = npt.NDArray[np.float64]
Role = Literal["subject", "peer"]
Info = dict[str, float | int | str]

PARAMS: CkksParameters = DEFAULT_PARAMETERS
CATALOG = "bench"
"""The name every benchmark Scorer serves its catalog under."""
CATALOG_SEED = 20261123
QUERY_SEED = 7
_MAX_BLOB_BYTES = 1 << 30


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A catalog W (n × d, unit-norm rows) and a unit-norm query u."""

    catalog: FloatArray
    query: FloatArray

    @property
    def dimension(self) -> int:
        return int(self.catalog.shape[1])

    @property
    def items(self) -> int:
        return int(self.catalog.shape[0])

    def head(self, count: int) -> Workload:
        """The first `count` items (a view, no copy)."""
        return Workload(self.catalog[:count], self.query)

    def expected(self) -> FloatArray:
        """W·u in float64: the reference every method's error is measured against."""
        result: FloatArray = self.catalog @ self.query
        return result


def unit_vectors(
    count: int, dimension: int, seed: int, block: int = 65_536, dtype: type = np.float64
) -> npt.NDArray[Any]:
    """Deterministic unit-norm rows, generated and normalised block by block in place.

    Identical to `heserve.domain.catalog.unit_rows(count, dimension, seed)` (one normal
    stream, consumed in row order) without its temporaries, so a 1M × 512 catalog
    costs its own 4 GiB and no more (`dtype=np.float32`, what a Catalog holds: 2 GiB).
    The first k rows do not depend on `count`.
    """
    rng = np.random.default_rng(seed)
    rows: npt.NDArray[Any] = np.empty((count, dimension), dtype=dtype)
    for start in range(0, count, block):
        part = rng.standard_normal((min(block, count - start), dimension))
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        rows[start : start + len(part)] = part
    return rows


class CatalogSource:
    """Catalogs for every (d, n): for one d, each catalog is a prefix of the largest.

    Holds one dimension's rows at a time (the largest size asked so far), so
    walking the cases d by d keeps at most one big catalog in memory.
    """

    def __init__(self, seed: int = CATALOG_SEED) -> None:
        self.seed = seed
        self._dimension = 0
        self._rows: FloatArray = np.empty((0, 0))

    def workload(self, dimension: int, items: int) -> Workload:
        if dimension != self._dimension or items > self._rows.shape[0]:
            self._rows = np.empty((0, 0))  # drop the old catalog before making the new one
            self._rows = unit_vectors(items, dimension, self.seed + dimension)
            self._dimension = dimension
        query = unit_vectors(1, dimension, QUERY_SEED + dimension)[0]
        return Workload(self._rows[:items], query)


# ------------------------------------------------------------------------ the registry


@dataclass
class Runner:
    """A method set up for one workload: `run()` is the timed call."""

    scored: int
    """Items one call of `run()` scores."""
    run: Callable[[], Any]
    error: Callable[[Any], float]
    """Max |score − W·u| over the scored items, from one result of `run()`."""
    info: Info = field(default_factory=dict)
    """Facts about the setup worth recording (baby step, encoded bytes, ...)."""
    close: Callable[[], None] = lambda: None
    """Release what setup holds (worker processes); the harness calls it after the case."""


@dataclass(frozen=True)
class Method:
    """One way to compute W·u, as the benchmarks see it.

    `role`: "subject" methods are heserve's own and are what the regression gate
    guards; "peer" methods are the yardsticks. `slice_items`: if set, the method is
    timed on the first `slice_items` items only, because its cost per item does not
    depend on the catalog size (and a whole catalog would take too long); the
    report shows its rate beside every catalog size of the same d.
    `memory_bytes(d, n)` estimates what setup allocates, so oversized cases are
    skipped instead of swapping the machine. A run whose error exceeds
    `max_abs_error` fails.
    """

    name: str
    role: Role
    description: str
    setup: Callable[[Workload], Runner]
    slice_items: int | None = None
    memory_bytes: Callable[[int, int], int] = lambda dimension, items: 0
    max_abs_error: float = 1e-4
    """Largest error the benchmark accepts (unit-norm rows and query); the service
    promises 1e-4 under the default parameters."""
    gated: bool = True
    """Whether the regression gate compares this subject. A method whose rate depends
    on how many cores are free at the moment (the 2-worker pool on a shared 2-core
    machine) would fail the gate for reasons that are not the code's."""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


# ------------------------------------------------------------------- heserve's engine


@functools.cache
def secret_context(params: CkksParameters = PARAMS) -> SecretContext:
    """One client key pair for the whole run (key generation is not what is timed)."""
    return SecretContext(params)


def engine_memory_bytes(dimension: int, items: int, params: CkksParameters = PARAMS) -> int:
    plan = DiagonalPlan.for_catalog(dimension, items, params.slot_count)
    return plan.chunk_count(items) * encoded_chunk_bytes(params, plan)


def decrypt_scores(
    secret: SecretContext, ciphertexts: list[seal.Ciphertext], count: int, slots: int
) -> FloatArray:
    """The first `count` scores held by per-chunk complex score ciphertexts (2 × `slots` each)."""
    per_chunk = 2 * slots
    parts = [
        unpack_complex(
            secret.decrypt_complex(wire.to_bytes(ct), _MAX_BLOB_BYTES),
            min(per_chunk, count - i * per_chunk),
        )
        for i, ct in enumerate(ciphertexts)
    ]
    return np.concatenate(parts) if parts else np.empty(0)


def engine_setup(
    workload: Workload,
    params: CkksParameters = PARAMS,
    native: bool | None = None,
    queries: int = 1,
) -> Runner:
    """heserve's Engine: the catalog encoded once here, `queries` queries scored per call.

    The timed call is `list(engine.score_many(plan, chunks, queries, keys))`, including
    each query's b − 1 baby rotations. `native=False` runs SEAL's own loop instead of
    the native kernel: the kernel's speed-up is the ratio of the two in one run.
    """
    engine = Engine(params, native=native)
    plan = DiagonalPlan.for_catalog(workload.dimension, workload.items, params.slot_count)
    chunks = engine.encode_catalog(plan, workload.catalog)
    secret = secret_context(params)
    keys = wire.load_galois_keys(
        engine.context, secret.galois_keys(plan.rotation_steps), _MAX_BLOB_BYTES
    )
    encrypted = wire.load_ciphertext(
        engine.context, secret.encrypt(plan.query_slots(workload.query)), _MAX_BLOB_BYTES
    )
    batch = [encrypted] * queries  # the same query: the work is the same as distinct ones
    expected = workload.expected()

    def run() -> list[list[seal.Ciphertext]]:
        return list(engine.score_many(plan, chunks, batch, keys))

    def error(result: list[list[seal.Ciphertext]]) -> float:
        worst = 0.0
        for q in range(queries):
            per_query = [per_chunk[q] for per_chunk in result]
            scores = decrypt_scores(secret, per_query, workload.items, params.slot_count)
            worst = max(worst, float(np.abs(scores - expected).max()))
        return worst

    info: Info = {
        "parameters": (
            f"N={params.poly_modulus_degree} q={'/'.join(map(str, params.coeff_modulus_bits))} "
            f"scales 2^{params.scale_bits}/2^{params.catalog_scale_bits}"
        ),
        "baby_step": plan.baby_step,
        "kernel": "native" if engine.native else "seal",
        "queries_per_call": queries,
        "chunks": len(chunks),
        "rotations_per_query": plan.rotations_per_query(len(chunks)),
        "encoded_bytes": engine_memory_bytes(workload.dimension, workload.items, params),
    }
    return Runner(scored=workload.items * queries, run=run, error=error, info=info)


# ------------------------------------------------- heserve's process pool behind a Scorer


def decrypt_runs(secret: SecretContext, runs: list[ScoredRun]) -> FloatArray:
    """The scores of complex-score runs (what `Scorer.score(..., complex_scores=True)` yields)."""
    parts = [
        unpack_complex(secret.decrypt_complex(run.scores, _MAX_BLOB_BYTES), run.count)
        for run in runs
    ]
    return np.concatenate(parts) if parts else np.empty(0)


def complex_score_steps(scorer: Scorer) -> list[int]:
    """The rotation steps a complex-score client uploads keys for (no conjugation key)."""
    return [step for step in scorer.galois_steps if step != CONJUGATION_STEP]


def item_ids(count: int) -> tuple[str, ...]:
    return tuple(f"item-{i}" for i in range(count))


def pool_memory_bytes(dimension: int, items: int, params: CkksParameters = PARAMS) -> int:
    """The encoded shards, plus the Scorer's copy of the rows and the copies sent to workers."""
    return engine_memory_bytes(dimension, items, params) + 2 * items * dimension * 8


def pool_setup(workload: Workload, workers: int, params: CkksParameters = PARAMS) -> Runner:
    """A Scorer over a `PoolBackend` of `workers` processes, the catalog encoded in them.

    The timed call is `list(scorer.score(key_id, ..., complex_scores=True))`: the
    query loaded and checked, sent to every worker, each shard scored, the results
    streamed back and put in catalog order, as the service's Score RPC does. Keys
    are registered and shipped to the workers (by the warm-up call) outside the
    timing. `close()` stops the workers.
    """
    backend = PoolBackend(params, workers=workers)
    try:
        catalog = Catalog(CATALOG, np.array(workload.catalog), item_ids(workload.items))
        scorer = Scorer(params, [catalog], backend=backend)
        secret = secret_context(params)
        key_id = scorer.register_keys(secret.galois_keys(complex_score_steps(scorer)))
        plan = scorer.catalog(CATALOG).plan
        query = secret.encrypt(plan.query_slots(workload.query))
    except BaseException:
        backend.close()
        raise
    expected = workload.expected()

    def run() -> list[ScoredRun]:
        return list(scorer.score(key_id, CATALOG, query, [], complex_scores=True))

    def error(result: list[ScoredRun]) -> float:
        return float(np.abs(decrypt_runs(secret, result) - expected).max())

    chunks = -(-workload.items // plan.items_per_chunk)
    info: Info = {
        "workers": workers,
        "baby_step": plan.baby_step,
        "chunks": chunks,
        "rotations_per_query": plan.rotations_per_query(-(-chunks // workers)),
        "encoded_bytes": engine_memory_bytes(workload.dimension, workload.items, params),
    }
    return Runner(scored=workload.items, run=run, error=error, info=info, close=backend.close)


RERANK_CANDIDATES = 100


def rerank_setup(workload: Workload, locally: bool, workers: int = 2) -> Runner:
    """Re-ranking 100 candidates end to end: a real server on loopback (2 workers), the
    Python client's `score(item_ids=...)`, encrypt to decrypt.

    `locally=False`: the server encodes the candidates' diagonals per query and scores
    them; `locally=True`: the client scores the whole catalog (encoded ahead of time)
    and picks the candidates. `scored` counts the candidates.
    """
    from heserve.transport.server import start_server
    from heserve_client import Client

    backend = PoolBackend(PARAMS, workers=workers)
    try:
        ids = item_ids(workload.items)
        catalog = Catalog(CATALOG, np.array(workload.catalog), ids)
        scorer = Scorer(PARAMS, [catalog], backend=backend)
        server = start_server(scorer, "127.0.0.1", 0)
    except BaseException:
        backend.close()
        raise
    client = Client(f"127.0.0.1:{server.port}", rerank_locally=locally)
    rows = np.random.default_rng(QUERY_SEED).choice(workload.items, RERANK_CANDIDATES, False)
    candidates = [ids[row] for row in rows]
    expected = workload.catalog[rows] @ workload.query

    def run() -> FloatArray:
        return client.score(workload.query, catalog=CATALOG, item_ids=candidates)

    def close() -> None:
        client.close()
        server.stop(grace=None)
        backend.close()

    return Runner(
        scored=RERANK_CANDIDATES,
        run=run,
        error=lambda result: float(np.abs(result - expected).max()),
        info={"candidates": RERANK_CANDIDATES, "where": "client" if locally else "server"},
        close=close,
    )


# ------------------------------------------------------------------------------ numpy


def numpy_setup(workload: Workload) -> Runner:
    """Plaintext W @ u (float64, numpy's BLAS): the distance to it is the HE overhead."""
    catalog = np.ascontiguousarray(workload.catalog)
    query = workload.query

    def run() -> FloatArray:
        result: FloatArray = catalog @ query
        return result

    expected = workload.expected()
    return Runner(
        scored=workload.items,
        run=run,
        error=lambda result: float(np.abs(result - expected).max()),
    )


# ---------------------------------------------------------------------------- TenSEAL

TENSEAL_THREADS = 1
"""TenSEAL's own thread pool (matmul uses it); 1 keeps every HE method on one core."""


@functools.cache
def tenseal_context(threads: int = TENSEAL_THREADS, params: CkksParameters = PARAMS) -> Any:
    """A TenSEAL context under heserve's parameters, with TenSEAL's default Galois keys."""
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_modulus_bits),
        n_threads=threads,
    )
    context.global_scale = params.scale
    context.generate_galois_keys()
    return context


def tenseal_dot_setup(workload: Workload, threads: int = TENSEAL_THREADS) -> Runner:
    """TenSEAL CKKSVector.dot, one call per item: log2 rotations per item."""
    context = tenseal_context(threads)
    encrypted = ts.ckks_vector(context, workload.query.tolist())
    rows = [row.tolist() for row in workload.catalog]
    expected = workload.expected()

    def run() -> list[Any]:
        return [encrypted.dot(row) for row in rows]

    def error(result: list[Any]) -> float:
        scores = np.array([vector.decrypt()[0] for vector in result])
        return float(np.abs(scores - expected).max())

    return Runner(scored=workload.items, run=run, error=error, info={"threads": threads})


def tenseal_matmul_setup(workload: Workload, threads: int = TENSEAL_THREADS) -> Runner:
    """TenSEAL CKKSVector.matmul(W.T), up to one slot count of items per call.

    The matrix is converted to a PlainTensor outside the timing; TenSEAL encodes
    its diagonals inside every call (it has no way to keep them).
    """
    context = tenseal_context(threads)
    encrypted = ts.ckks_vector(context, workload.query.tolist())
    slots = PARAMS.slot_count
    matrices = [
        ts.plain_tensor(np.ascontiguousarray(workload.catalog[start : start + slots].T))
        for start in range(0, workload.items, slots)
    ]
    expected = workload.expected()

    def run() -> list[Any]:
        return [encrypted.matmul(matrix) for matrix in matrices]

    def error(result: list[Any]) -> float:
        scores = np.concatenate([np.asarray(vector.decrypt()) for vector in result])
        return float(np.abs(scores - expected).max())

    return Runner(scored=workload.items, run=run, error=error, info={"threads": threads})


register(
    Method(
        name="engine",
        role="subject",
        description="heserve Engine: BSGS diagonals encoded once, one query, native kernel",
        setup=engine_setup,
        memory_bytes=engine_memory_bytes,
    )
)
register(
    Method(
        name="engine-seal",
        role="subject",
        description="heserve Engine on SEAL's own loop (multiply_plain per diagonal): the "
        "reference the native kernel replaces",
        setup=functools.partial(engine_setup, native=False),
        memory_bytes=engine_memory_bytes,
    )
)
register(
    Method(
        name="engine-8-queries",
        role="subject",
        description="heserve Engine: 8 queries in one pass over the catalog (items/s counts "
        "every query's items)",
        setup=functools.partial(engine_setup, queries=8),
        memory_bytes=engine_memory_bytes,
    )
)


def _register_presets() -> None:
    """One more subject per non-default parameter preset: "engine-fast", "engine-compact".

    Their tolerances sit above the errors measured with these unit-norm workloads
    (fast: up to ~4e-4, compact: up to ~1.5e-3, for d = 32 to 512).
    """
    tolerances = {"fast": 1e-3, "compact": 5e-3}

    def method(preset: str, params: CkksParameters) -> Method:
        def setup(workload: Workload) -> Runner:
            return engine_setup(workload, params)

        def memory_bytes(dimension: int, items: int) -> int:
            return engine_memory_bytes(dimension, items, params)

        return Method(
            name=f"engine-{preset}",
            role="subject",
            description=f"heserve Engine under the {preset!r} preset",
            setup=setup,
            memory_bytes=memory_bytes,
            max_abs_error=tolerances.get(preset, 1e-2),
        )

    for preset, params in PRESETS.items():
        if params != PARAMS:
            register(method(preset, params))


_register_presets()
for _workers in (1, 2):
    register(
        Method(
            name=f"engine-pool-{_workers}",
            role="subject",
            description=(
                f"Scorer over a PoolBackend of {_workers} worker process"
                f"{'es' if _workers > 1 else ''}, complex scores, generator consumed"
            ),
            setup=functools.partial(pool_setup, workers=_workers),
            memory_bytes=pool_memory_bytes,
            gated=_workers == 1,
        )
    )
for _locally in (False, True):
    register(
        Method(
            name="rerank-100-" + ("local" if _locally else "server"),
            role="subject",
            description="re-rank 100 candidates end to end over gRPC (2 workers): "
            + (
                "whole catalog scored, candidates picked by the client"
                if _locally
                else "the server encodes the candidates per query"
            ),
            setup=functools.partial(rerank_setup, locally=_locally),
            memory_bytes=pool_memory_bytes,
            gated=False,
        )
    )
register(
    Method(
        name="numpy",
        role="peer",
        description="plaintext numpy W @ u",
        setup=numpy_setup,
    )
)
register(
    Method(
        name="tenseal-dot",
        role="peer",
        description="TenSEAL CKKSVector.dot per item (1 thread)",
        setup=tenseal_dot_setup,
        slice_items=128,
    )
)
DESILOFHE_THREADS = 2
"""desilofhe's own threads: the peers' figures in the issue tracker used both cores."""


def desilofhe_setup(workload: Workload, threads: int = DESILOFHE_THREADS) -> Runner:
    """desilofhe (CKKS, CPU): the same diagonal method, the best we could write on its
    public API (hoisted baby rotations, complex packing, folding; bench/desilo_peer.py).

    Timed: the server's part, from the serialized query to the serialized scores.
    """
    from bench.desilo_peer import DesiloDiagonal

    peer = DesiloDiagonal(workload.catalog, threads=threads)
    query = peer.encrypt_query(workload.query)
    expected = workload.expected()

    def run() -> bytes:
        return peer.serve(query)

    def error(result: bytes) -> float:
        return float(np.abs(peer.decrypt_scores(result) - expected).max())

    return Runner(
        scored=workload.items,
        run=run,
        error=error,
        info={
            "threads": threads,
            "key_bytes": peer.key_bytes,
            "query_bytes": len(query),
            "baby_step": peer.plan.baby,
        },
    )


register(
    Method(
        name="desilofhe",
        role="peer",
        description="desilofhe diagonal BSGS, hoisted baby rotations, complex packing (2 threads)",
        setup=desilofhe_setup,
    )
)
register(
    Method(
        name="tenseal-matmul",
        role="peer",
        description="TenSEAL CKKSVector.matmul(W.T), matrix encoded per call (1 thread)",
        setup=tenseal_matmul_setup,
        slice_items=PARAMS.slot_count,
    )
)


# ------------------------------------------------------------------------ measuring


def memory_budget_bytes() -> int:
    """What a case may allocate: BENCH_MAX_GIB (default 8) GiB, at most 70% of MemAvailable."""
    cap = int(float(os.environ.get("BENCH_MAX_GIB", "8")) * (1 << 30))
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    cap = min(cap, int(int(line.split()[1]) * 1024 * 0.7))
    except OSError:
        pass
    return cap


def resident_bytes() -> int:
    """This process's resident set size now (Linux), 0 if unknown."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def choose_rounds(
    first_call_seconds: float, budget_seconds: float, min_rounds: int = 3, max_rounds: int = 200
) -> tuple[int, int]:
    """(rounds, iterations) so that the timing takes about `budget_seconds`.

    Calls shorter than a millisecond are batched into iterations, so the timer's
    own cost stays negligible.
    """
    call = max(first_call_seconds, 1e-7)
    iterations = max(1, min(1000, int(1e-3 / call)))
    rounds = int(budget_seconds / (call * iterations))
    return max(min_rounds, min(max_rounds, rounds)), iterations


@dataclass(frozen=True)
class Prepared:
    """A method set up for one case, with its warm-up call done."""

    method: Method
    workload: Workload
    runner: Runner
    setup_seconds: float
    first_call_seconds: float
    first_result: Any
    resident_bytes: int


def prepare(method: Method, workload: Workload) -> Prepared:
    """Set the method up on `workload` (already sliced) and make one warm-up call.

    The caller owns `prepared.runner.close()`; if the warm-up call fails, it is
    closed here.
    """
    started = time.perf_counter()
    runner = method.setup(workload)
    setup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    try:
        result = runner.run()
    except BaseException:
        runner.close()
        raise
    first = time.perf_counter() - started
    return Prepared(method, workload, runner, setup_seconds, first, result, resident_bytes())


def time_calls(run: Callable[[], Any], rounds: int, iterations: int) -> tuple[float, float, Any]:
    """Median and fastest seconds per call over `rounds` rounds of `iterations` calls,
    and a result."""
    samples = []
    result: Any = None
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(iterations):
            result = run()
        samples.append((time.perf_counter() - started) / iterations)
    return statistics.median(samples), min(samples), result
