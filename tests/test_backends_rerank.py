"""Re-ranking goes through the backend like every other query, on one engine per process.

A pool of two real worker processes scores subsets of a three-chunk catalog; the
front's own engine is made to refuse any scoring, so scores that come back were
computed by the workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from heserve.backends.local import LocalBackend
from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import FloatArray, query_slots, unpack_complex
from heserve_client import SecretContext

SLOTS = DEFAULT_PARAMETERS.slot_count
ITEMS, DIMENSION = 4 * SLOTS + 500, 32


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog("rerank", unit_rows(ITEMS, DIMENSION, 41), tuple(map(str, range(ITEMS))))


@pytest.fixture(scope="module")
def pooled(catalog: Catalog) -> Iterator[Scorer]:
    backend = PoolBackend(DEFAULT_PARAMETERS, workers=2)
    try:
        yield Scorer(DEFAULT_PARAMETERS, [catalog], backend=backend)
    finally:
        backend.close()


def _front_engine_never_scores(scorer: Scorer, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> Iterator[Any]:
        raise AssertionError("the front process scored a query itself")

    monkeypatch.setattr(scorer.engine, "score", refuse)


def _subset_scores(
    scorer: Scorer, secret: SecretContext, key_id: str, vector: FloatArray, ids: list[str]
) -> FloatArray:
    query = secret.encrypt(query_slots(vector, DIMENSION, SLOTS))
    runs = list(scorer.score(key_id, "rerank", query, ids, complex_scores=True))
    assert [(run.offset, run.index) for run in runs] == [
        (i * 2 * SLOTS, i) for i in range(len(runs))
    ]
    return np.concatenate(
        [unpack_complex(secret.decrypt_complex(run.scores, 1 << 22), run.count) for run in runs]
    )


@pytest.mark.parametrize(
    "count",
    # one chunk (one worker idle), two chunks (one each), three chunks (unequal shares)
    [3, 2 * SLOTS + 1, 4 * SLOTS + 17],
)
def test_the_pool_workers_score_re_ranking_subsets(
    pooled: Scorer,
    catalog: Catalog,
    secret: SecretContext,
    monkeypatch: pytest.MonkeyPatch,
    count: int,
) -> None:
    _front_engine_never_scores(pooled, monkeypatch)
    key_id = pooled.register_keys(secret.galois_keys(pooled.galois_steps))
    rows = np.random.default_rng(count).permutation(ITEMS)[:count]
    vector = unit_rows(1, DIMENSION, 42)[0]

    scores = _subset_scores(pooled, secret, key_id, vector, [catalog.ids[r] for r in rows])

    assert scores.shape == (count,)
    assert np.abs(scores - catalog.embeddings[rows] @ vector).max() < 1e-4
    backend = pooled.backend
    assert isinstance(backend, PoolBackend)
    assert backend.pending_requests() == 0
    # worker 1 holds chunks 1, 3, ...: with a one-chunk subset it gets no query, so no keys
    assert [key_id in held for held in backend.worker_keys()] == [True, count > 2 * SLOTS]


def test_re_ranking_in_real_slots_through_the_pool(
    pooled: Scorer, catalog: Catalog, secret: SecretContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    _front_engine_never_scores(pooled, monkeypatch)
    key_id = pooled.register_keys(secret.galois_keys(pooled.galois_steps))
    ids = [catalog.ids[i] for i in (ITEMS - 1, 0, 5000, 17)]
    vector = unit_rows(1, DIMENSION, 43)[0]
    query = secret.encrypt(query_slots(vector, DIMENSION, SLOTS))

    (run,) = pooled.score(key_id, "rerank", query, ids)

    assert (run.offset, run.count, run.index, run.total) == (0, 4, 0, 1)
    expected = catalog.embeddings[[ITEMS - 1, 0, 5000, 17]] @ vector
    assert np.abs(secret.decrypt(run.scores, 1 << 22)[:4] - expected).max() < 1e-4


def test_the_scorer_shares_the_backends_engine(pooled: Scorer, catalog: Catalog) -> None:
    local = LocalBackend(DEFAULT_PARAMETERS)
    assert Scorer(DEFAULT_PARAMETERS, [catalog], backend=local).engine is local.engine
    assert pooled.engine is pooled.backend.engine


def test_a_backend_under_other_parameters_is_refused(catalog: Catalog) -> None:
    other = replace(DEFAULT_PARAMETERS, coeff_modulus_bits=(60, 40, 40, 60))
    with pytest.raises(ValueError, match="other CKKS parameters"):
        Scorer(DEFAULT_PARAMETERS, [catalog], backend=LocalBackend(other))
