"""The process pool backend: shards in worker processes score like the local backend."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.errors import UnavailableError
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import query_slots, unpack_complex
from heserve_client import SecretContext

SLOTS = DEFAULT_PARAMETERS.slot_count
# 3 chunks of 2 x 4,096 items, so two workers hold unequal shards (chunks 0, 2 and 1).
ITEMS, DIMENSION = 4 * SLOTS + 808, 48


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog("pool", unit_rows(ITEMS, DIMENSION, 5), tuple(str(i) for i in range(ITEMS)))


@pytest.fixture(scope="module")
def pooled(catalog: Catalog) -> Iterator[Scorer]:
    # A memory budget of one encoded chunk per worker: the rest is encoded per query.
    backend = PoolBackend(DEFAULT_PARAMETERS, workers=2, memory_budget=2 * 48 * 8192 * 16 * 2)
    scorer = Scorer(DEFAULT_PARAMETERS, [catalog], backend=backend)
    yield scorer
    backend.close()


def _scores(
    scorer: Scorer,
    secret: SecretContext,
    key_id: str,
    vector: np.ndarray,
    complex_scores: bool = False,
) -> np.ndarray:
    query = secret.encrypt(query_slots(vector, DIMENSION, SLOTS))
    runs = list(scorer.score(key_id, "pool", query, [], complex_scores=complex_scores))
    layout = [(r.offset, r.count, r.index, r.total) for r in runs]
    if complex_scores:  # one run per chunk
        assert layout == [
            (0, 2 * SLOTS, 0, 3),
            (2 * SLOTS, 2 * SLOTS, 1, 3),
            (4 * SLOTS, ITEMS - 4 * SLOTS, 2, 3),
        ]
        return np.concatenate(
            [unpack_complex(secret.decrypt_complex(r.scores, 1 << 22), r.count) for r in runs]
        )
    assert layout == [  # each chunk split in two: its real parts, then its imaginary parts
        (0, SLOTS, 0, 5),
        (SLOTS, SLOTS, 1, 5),
        (2 * SLOTS, SLOTS, 2, 5),
        (3 * SLOTS, SLOTS, 3, 5),
        (4 * SLOTS, ITEMS - 4 * SLOTS, 4, 5),
    ]
    return np.concatenate([secret.decrypt(r.scores, 1 << 22)[: r.count] for r in runs])


def test_pool_scores_equal_plaintext_and_local(
    pooled: Scorer, catalog: Catalog, secret: SecretContext
) -> None:
    local = Scorer(DEFAULT_PARAMETERS, [catalog])
    vector = unit_rows(1, DIMENSION, 6)[0]
    pooled_scores = _scores(
        pooled, secret, pooled.register_keys(secret_keys(pooled, secret)), vector
    )
    local_key_id = local.register_keys(secret_keys(local, secret))
    local_scores = _scores(local, secret, local_key_id, vector)
    pooled_complex = _scores(
        pooled, secret, pooled.register_keys(secret_keys(pooled, secret)), vector, True
    )
    local_complex = _scores(local, secret, local_key_id, vector, complex_scores=True)

    expected = catalog.embeddings @ vector
    for scores in (pooled_scores, local_scores, pooled_complex, local_complex):
        assert np.abs(scores - expected).max() < 1e-4
    assert np.abs(pooled_scores - local_scores).max() < 1e-4
    assert np.abs(pooled_complex - local_complex).max() < 1e-4


def secret_keys(scorer: Scorer, secret: SecretContext) -> bytes:
    return secret.galois_keys(scorer.galois_steps)


def test_concurrent_queries_each_get_their_own_scores(
    pooled: Scorer, catalog: Catalog, secret: SecretContext
) -> None:
    key_id = pooled.register_keys(secret_keys(pooled, secret))
    vectors = unit_rows(4, DIMENSION, 8)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda v: _scores(pooled, secret, key_id, v), vectors))

    for vector, scores in zip(vectors, results, strict=True):
        assert np.abs(scores - catalog.embeddings @ vector).max() < 1e-4


def test_deleted_keys_leave_the_workers(pooled: Scorer, secret: SecretContext) -> None:
    key_id = pooled.register_keys(secret_keys(pooled, secret))
    _scores(pooled, secret, key_id, unit_rows(1, DIMENSION, 9)[0])
    backend = pooled.backend
    assert isinstance(backend, PoolBackend)
    assert all(key_id in held for held in backend.worker_keys())

    pooled.delete_keys(key_id)

    assert not any(key_id in held for held in backend.worker_keys())


def test_a_killed_worker_fails_the_query_cleanly_and_is_replaced(
    catalog: Catalog, secret: SecretContext
) -> None:
    # 16 chunks of 128 dimensions: after the first result, the victim still has
    # several chunks (tens of milliseconds) of the query to go.
    size = 16 * 2 * SLOTS
    large = Catalog("large", unit_rows(size, 128, 11), tuple(map(str, range(size))))
    backend = PoolBackend(DEFAULT_PARAMETERS, workers=2)
    try:
        scorer = Scorer(DEFAULT_PARAMETERS, [catalog, large], backend=backend)
        key_id = scorer.register_keys(secret_keys(scorer, secret))
        vector = unit_rows(1, DIMENSION, 10)[0]
        wide = unit_rows(1, 128, 12)[0]
        wide_query = secret.encrypt(query_slots(wide, 128, SLOTS))
        runs = scorer.score(key_id, "large", wide_query, [])
        next(runs)  # the query is in flight in both workers

        victim = backend.worker_pids()[1]
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(UnavailableError):
            list(runs)

        # The next query waits for the replacement, which re-encoded its shard.
        scores = _scores(scorer, secret, key_id, vector)
        assert np.abs(scores - catalog.embeddings @ vector).max() < 1e-4
        assert backend.restarts == 1
        assert backend.worker_pids()[1] != victim
        assert not os.path.exists(f"/proc/{victim}")  # dead and reaped
    finally:
        backend.close()
