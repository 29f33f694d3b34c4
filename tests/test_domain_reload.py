"""Replacing a served catalog without a restart (issue 11, reload): the new version is
encoded beside the old, swapped in at once, queries already running finish on the old
one, pinned queries are refused, and a refused reload changes nothing. In process and
over worker processes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.errors import FailedPreconditionError
from heserve.domain.scorer import ScoredRun, Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import unpack_complex
from heserve_client import SecretContext

SLOTS = DEFAULT_PARAMETERS.slot_count
ITEMS, DIMENSION = 3 * SLOTS, 16  # two chunks: one per worker


def _catalog(seed: int, items: int = ITEMS, dimension: int = DIMENSION) -> Catalog:
    return Catalog("shop", unit_rows(items, dimension, seed), tuple(f"s{i}" for i in range(items)))


@pytest.fixture(params=["local", "pool"])
def scorer(request: pytest.FixtureRequest) -> Iterator[Scorer]:
    backend = PoolBackend(DEFAULT_PARAMETERS, workers=2) if request.param == "pool" else None
    served = Scorer(DEFAULT_PARAMETERS, [_catalog(1)], backend=backend)
    try:
        yield served
    finally:
        served.backend.close()


def _scores(secret: SecretContext, runs: Iterator[ScoredRun]) -> np.ndarray:
    parts = []
    for run in runs:
        parts.append(unpack_complex(secret.decrypt_complex(run.scores, 1 << 26), run.count))
    return np.concatenate(parts)


def _query(scorer: Scorer, secret: SecretContext, vector: np.ndarray) -> bytes:
    plan = scorer.catalog("shop").plan
    return secret.encrypt(plan.query_slots(vector))


def test_a_replaced_catalog_serves_the_new_version_and_running_queries_finish_on_the_old(
    scorer: Scorer, secret: SecretContext
) -> None:
    old, new = scorer.catalog("shop").catalog, _catalog(2)
    key_id = scorer.register_keys(secret.galois_keys(list(scorer.galois_steps)))
    vector = unit_rows(1, DIMENSION, 3)[0]
    query = _query(scorer, secret, vector)

    running = scorer.score(key_id, "shop", query, [], complex_scores=True)
    first = next(running)  # this query has begun on the old version
    assert scorer.replace_catalog(new) is True
    assert scorer.catalog("shop").catalog.version == new.version
    rest = list(running)  # ... and finishes on it
    finished = _scores(secret, iter([first, *rest]))
    np.testing.assert_allclose(finished, old.embeddings @ vector, rtol=0, atol=1e-4)

    fresh = _scores(secret, scorer.score(key_id, "shop", query, [], complex_scores=True))
    np.testing.assert_allclose(fresh, new.embeddings @ vector, rtol=0, atol=1e-4)
    with pytest.raises(FailedPreconditionError):  # pinned to the version it knew
        list(scorer.score(key_id, "shop", query, [], old.version, complex_scores=True))
    assert scorer.replace_catalog(new) is False  # the same version: nothing to do
    assert scorer.reloads == 1


def test_a_reload_the_keys_cannot_serve_is_refused_and_changes_nothing(
    scorer: Scorer, secret: SecretContext
) -> None:
    before = scorer.catalog("shop")
    wider = _catalog(4, items=64, dimension=128)  # another baby step: new rotation keys
    with pytest.raises(ValueError, match="restart"):
        scorer.replace_catalog(wider)
    with pytest.raises(ValueError, match="no catalog named"):
        scorer.replace_catalog(
            Catalog("other", unit_rows(5, DIMENSION, 5), ("a", "b", "c", "d", "e"))
        )
    assert scorer.catalog("shop") == before and scorer.reloads == 0
    key_id = scorer.register_keys(secret.galois_keys(list(scorer.galois_steps)))
    vector = unit_rows(1, DIMENSION, 6)[0]
    scores = _scores(
        secret,
        scorer.score(key_id, "shop", _query(scorer, secret, vector), [], complex_scores=True),
    )
    np.testing.assert_allclose(scores, before.catalog.embeddings @ vector, rtol=0, atol=1e-4)
