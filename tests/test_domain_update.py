"""Upserting and deleting items of a served catalog (issue 11, incremental updates), in
process and over worker processes: the next version scores like a catalog built from
scratch, only the chunks the change touches are encoded again, queries already running
finish on the version they started on, pinned ones are refused, and a change that fails
changes nothing."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import pytest

from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ServiceError,
)
from heserve.domain.scorer import ScoredRun, Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import unpack_complex
from heserve_client import SecretContext

SLOTS = DEFAULT_PARAMETERS.slot_count
CHUNK = 2 * SLOTS  # rows per chunk
ITEMS, DIMENSION = 3 * CHUNK - 100, 16  # three chunks, the last one not full
TOLERANCE = 1e-4


def _catalog() -> Catalog:
    return Catalog("shop", unit_rows(ITEMS, DIMENSION, 1), tuple(f"s{i}" for i in range(ITEMS)))


@pytest.fixture(params=["local", "pool"])
def scorer(request: pytest.FixtureRequest) -> Iterator[Scorer]:
    backend = PoolBackend(DEFAULT_PARAMETERS, workers=2) if request.param == "pool" else None
    served = Scorer(DEFAULT_PARAMETERS, [_catalog()], backend=backend, max_update_items=1_000)
    try:
        yield served
    finally:
        served.backend.close()


def _scores(secret: SecretContext, runs: Iterator[ScoredRun]) -> np.ndarray:
    return np.concatenate(
        [unpack_complex(secret.decrypt_complex(run.scores, 1 << 26), run.count) for run in runs]
    )


def _score(scorer: Scorer, secret: SecretContext, key_id: str, vector: np.ndarray) -> np.ndarray:
    query = secret.encrypt(scorer.catalog("shop").plan.query_slots(vector))
    return _scores(secret, scorer.score(key_id, "shop", query, [], complex_scores=True))


def _expected(catalog: Catalog, vector: np.ndarray) -> dict[str, float]:
    return dict(zip(catalog.ids, (catalog.embeddings @ vector).tolist(), strict=True))


def _assert_scores_by_id(
    scorer: Scorer, secret: SecretContext, key_id: str, expected: dict[str, float]
) -> None:
    vector = unit_rows(1, DIMENSION, 99)[0]
    served = scorer.catalog("shop").catalog
    scores = _score(scorer, secret, key_id, vector)
    assert sorted(served.ids) == sorted(expected)
    got = dict(zip(served.ids, scores.tolist(), strict=True))
    worst = max(abs(got[item] - value) for item, value in expected.items())
    assert worst < TOLERANCE


def test_upserts_and_deletes_score_like_a_catalog_built_from_scratch(
    scorer: Scorer, secret: SecretContext
) -> None:
    base = scorer.catalog("shop").catalog
    key_id = scorer.register_keys(secret.galois_keys(list(scorer.galois_steps)))
    vector = unit_rows(1, DIMENSION, 99)[0]
    replaced = unit_rows(2, DIMENSION, 2)
    fresh = unit_rows(3, DIMENSION, 3)

    change = scorer.update_items(
        "shop",
        ["s5", "s20000", "new-1", "new-2", "new-3"],
        np.vstack([replaced, fresh]),
        ["s7"],
    )

    expected = _expected(base, vector)
    del expected["s7"]
    rows = dict(zip(["s5", "s20000", "new-1", "new-2", "new-3"], [*replaced, *fresh], strict=True))
    expected.update({item: float(row.astype(np.float32) @ vector) for item, row in rows.items()})
    _assert_scores_by_id(scorer, secret, key_id, expected)
    served = scorer.catalog("shop").catalog
    assert change.outcome == "updated" and change.version == served.version != base.version
    assert change.previous_version == base.version
    assert (change.upserted, change.deleted, change.item_count) == (5, 1, ITEMS + 2)
    # s5 and s7 in chunk 0, s20000 in chunk 2, appends and the moved last row in chunk 2
    assert (change.chunks_rewritten, change.chunk_count) == (2, 3)
    assert scorer.change_counts[("shop", "update", "updated")] == 1


def test_an_update_that_touches_one_chunk_rewrites_one(
    scorer: Scorer, secret: SecretContext
) -> None:
    base = scorer.catalog("shop").catalog
    key_id = scorer.register_keys(secret.galois_keys(list(scorer.galois_steps)))
    row = unit_rows(1, DIMENSION, 4)
    change = scorer.update_items("shop", [f"s{CHUNK + 3}"], row)
    assert (change.chunks_rewritten, change.chunk_count) == (1, 3)
    expected = _expected(base, unit_rows(1, DIMENSION, 99)[0])
    expected[f"s{CHUNK + 3}"] = float(row[0].astype(np.float32) @ unit_rows(1, DIMENSION, 99)[0])
    _assert_scores_by_id(scorer, secret, key_id, expected)
    # a second update builds on the first: its chunks are shared again
    second = scorer.update_items(
        "shop", [], np.empty((0, DIMENSION)), ["s1"], if_version=change.version
    )
    assert second.previous_version == change.version and second.chunks_rewritten == 2
    del expected["s1"]
    _assert_scores_by_id(scorer, secret, key_id, expected)


def test_running_queries_finish_on_their_version_and_pinned_ones_are_refused(
    scorer: Scorer, secret: SecretContext
) -> None:
    base = scorer.catalog("shop").catalog
    key_id = scorer.register_keys(secret.galois_keys(list(scorer.galois_steps)))
    vector = unit_rows(1, DIMENSION, 8)[0]
    query = secret.encrypt(scorer.catalog("shop").plan.query_slots(vector))
    running = scorer.score(key_id, "shop", query, [], complex_scores=True)
    first = next(running)  # begun on the base version
    for chunk in range(3):  # every chunk changes under it
        scorer.update_items("shop", [f"s{chunk * CHUNK + 1}"], unit_rows(1, DIMENSION, 10 + chunk))
    finished = _scores(secret, iter([first, *running]))
    np.testing.assert_allclose(finished, base.embeddings @ vector, rtol=0, atol=TOLERANCE)
    with pytest.raises(FailedPreconditionError):
        list(scorer.score(key_id, "shop", query, [], base.version, complex_scores=True))
    with pytest.raises(FailedPreconditionError, match=f"not {base.version!r}"):
        scorer.update_items("shop", ["s1"], unit_rows(1, DIMENSION, 11), if_version=base.version)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (
            {"upsert_ids": ["x"], "upsert_rows": np.full((1, DIMENSION), np.nan)},
            InvalidArgumentError,
        ),
        ({"upsert_ids": ["x"], "upsert_rows": np.ones((1, DIMENSION + 1))}, InvalidArgumentError),
        (
            {"upsert_ids": ["x"], "upsert_rows": np.full((1, DIMENSION), 100.0)},
            InvalidArgumentError,
        ),
        (
            {"upsert_ids": ["x", "x"], "upsert_rows": unit_rows(2, DIMENSION, 5)},
            InvalidArgumentError,
        ),
        (
            {"upsert_ids": ["x" * 300], "upsert_rows": unit_rows(1, DIMENSION, 5)},
            InvalidArgumentError,
        ),
        (
            {"upsert_ids": [], "upsert_rows": np.empty((0, DIMENSION)), "delete_ids": ["nope"]},
            NotFoundError,
        ),
        (
            {
                "upsert_ids": [f"n{i}" for i in range(1_001)],
                "upsert_rows": unit_rows(1_001, DIMENSION, 5),
            },
            ResourceExhaustedError,
        ),
        (
            {
                "upsert_ids": ["x"],
                "upsert_rows": unit_rows(1, DIMENSION, 5),
                "if_version": "0" * 16,
            },
            FailedPreconditionError,
        ),
        (
            {
                "catalog_name": "other",
                "upsert_ids": ["x"],
                "upsert_rows": unit_rows(1, DIMENSION, 5),
            },
            NotFoundError,
        ),
    ],
)
def test_a_refused_update_changes_nothing(
    scorer: Scorer, secret: SecretContext, kwargs: dict[str, object], error: type[ServiceError]
) -> None:
    before = scorer.catalog("shop")
    arguments = {"catalog_name": "shop", **kwargs}
    with pytest.raises(error):
        scorer.update_items(**arguments)  # type: ignore[arg-type]
    assert scorer.catalog("shop") is before and scorer.reloads == 0
    assert (
        sum(n for (_, kind, outcome), n in scorer.change_counts.items() if outcome == "failed") == 1
    )
    key_id = scorer.register_keys(secret.galois_keys(list(scorer.galois_steps)))
    _assert_scores_by_id(
        scorer, secret, key_id, _expected(before.catalog, unit_rows(1, DIMENSION, 99)[0])
    )


def test_an_update_of_every_chunk_reaches_the_workers_in_batches_and_scores_right(
    secret: SecretContext,
) -> None:
    """Eleven chunks over two workers: each worker gets its rewritten chunks a few per
    message (pool._CHUNKS_PER_LOAD), and a new chunk appended past the old end."""
    items = 11 * CHUNK
    base = Catalog("shop", unit_rows(items, DIMENSION, 21), tuple(f"s{i}" for i in range(items)))
    scorer = Scorer(DEFAULT_PARAMETERS, [base], backend=PoolBackend(DEFAULT_PARAMETERS, workers=2))
    try:
        key_id = scorer.register_keys(secret.galois_keys(list(scorer.galois_steps)))
        touched = [f"s{chunk * CHUNK + 7}" for chunk in range(11)]
        fresh = [f"new-{i}" for i in range(5)]
        rows = unit_rows(16, DIMENSION, 22)
        change = scorer.update_items("shop", [*touched, *fresh], rows)
        assert (change.chunks_rewritten, change.chunk_count) == (12, 12)
        vector = unit_rows(1, DIMENSION, 99)[0]
        expected = _expected(base, vector)
        expected.update(
            {
                item: float(row.astype(np.float32) @ vector)
                for item, row in zip([*touched, *fresh], rows, strict=True)
            }
        )
        _assert_scores_by_id(scorer, secret, key_id, expected)
    finally:
        scorer.backend.close()


def test_a_change_encoded_past_the_callers_deadline_is_dropped_not_served(
    scorer: Scorer, secret: SecretContext
) -> None:
    before = scorer.catalog("shop")
    for left in (-1.0, 0.05):  # past, or too close to answer in time
        with pytest.raises(DeadlineExceededError, match="nothing changed"):
            scorer.update_items(
                "shop", ["s1"], unit_rows(1, DIMENSION, 30), deadline=time.monotonic() + left
            )
    assert scorer.catalog("shop") is before and scorer.reloads == 0
    assert scorer.change_counts[("shop", "update", "failed")] == 2
    change = scorer.update_items(
        "shop", ["s1"], unit_rows(1, DIMENSION, 30), deadline=time.monotonic() + 600
    )
    assert change.previous_version == before.catalog.version


def test_a_reload_serves_the_source_and_says_the_updates_since_are_gone(
    scorer: Scorer, caplog: pytest.LogCaptureFixture
) -> None:
    source = scorer.catalog("shop").catalog
    scorer.update_items("shop", ["s1"], unit_rows(1, DIMENSION, 40))
    scorer.update_items("shop", [], np.empty((0, DIMENSION)), ["s2"])
    with caplog.at_level(logging.WARNING, logger="heserve.domain.scorer"):
        change = scorer.reload("shop", lambda: source)
    assert change.outcome == "replaced" and change.version == source.version
    assert "s2" in scorer.catalog("shop").catalog.ids
    assert any("2 update(s)" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="heserve.domain.scorer"):
        assert scorer.reload("shop", lambda: source).outcome == "unchanged"
    assert not caplog.records


def test_a_reload_reports_the_version_it_replaced_even_if_updated_while_it_read(
    scorer: Scorer,
) -> None:
    """A reload reads its file outside the lock; an update made meanwhile is what the
    reload replaces, and drops: the change names that version and counts that update."""
    source = scorer.catalog("shop").catalog
    scorer.update_items("shop", ["s1"], unit_rows(1, DIMENSION, 41))
    made_while_reading: list[str] = []

    def load() -> Catalog:
        change = scorer.update_items("shop", ["s2"], unit_rows(1, DIMENSION, 42))
        made_while_reading.append(change.version)
        return source

    change = scorer.reload("shop", load)
    assert change.outcome == "replaced" and change.version == source.version
    assert change.previous_version == made_while_reading[0]
    assert change.updates_dropped == 2
