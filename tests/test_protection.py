"""Catalog protection: noise flooding and Gaussian score noise on a real server."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from heserve.domain.catalog import Catalog
from heserve.domain.protection import MEASURED_NOISE_STD, ScoreProtection
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.transport.server import start_server
from heserve_client import Client


def _client_scores(scorer: Scorer, vector: np.ndarray, repeats: int) -> list[np.ndarray]:
    running = start_server(scorer, "127.0.0.1", 0)
    try:
        with Client(f"127.0.0.1:{running.port}") as client:
            return [client.score(vector, catalog="books") for _ in range(repeats)]
    finally:
        running.stop(grace=None)


@pytest.fixture(scope="module")
def plain_error(books: Catalog) -> Iterator[float]:
    scorer = Scorer(DEFAULT_PARAMETERS, [books])
    vector = np.ones(books.dimension) / np.sqrt(books.dimension)
    (scores,) = _client_scores(scorer, vector, 1)
    yield float(np.abs(scores - books.embeddings @ vector).max())


def test_score_noise_has_the_configured_spread_and_is_fresh_per_query(
    books: Catalog, user: np.ndarray
) -> None:
    std = 1e-2
    scorer = Scorer(DEFAULT_PARAMETERS, [books], protection=ScoreProtection(score_noise_std=std))
    first, second = _client_scores(scorer, user, 2)
    plain = books.embeddings @ user

    for scores in (first, second):
        assert 0.9 * std < float(np.std(scores - plain)) < 1.1 * std
        assert abs(float(np.mean(scores - plain))) < 5 * std / np.sqrt(books.item_count)
    assert float(np.abs(first - second).min()) > 0  # fresh noise, not a fixed offset


def test_flooding_drowns_the_ciphertext_noise_at_the_documented_cost(
    books: Catalog, user: np.ndarray, plain_error: float
) -> None:
    bits = 12
    scorer = Scorer(DEFAULT_PARAMETERS, [books], protection=ScoreProtection(flood_bits=bits))
    (scores,) = _client_scores(scorer, user, 1)
    error = scores - books.embeddings @ user

    expected_std = MEASURED_NOISE_STD["precise"] * 2**bits
    assert 0.7 * expected_std < float(np.std(error)) < 1.3 * expected_std
    assert float(np.abs(error).max()) > 10 * plain_error  # the flood, not the scheme's noise
    top = np.argsort(-scores)[:10]
    assert len(set(top) & set(np.argsort(-(books.embeddings @ user))[:10])) >= 8


@pytest.mark.parametrize(
    "settings",
    [
        {"flood_bits": -1},
        {"flood_bits": 41},
        {"score_noise_std": -0.1},
        {"score_noise_std": float("nan")},
    ],
)
def test_invalid_protection_settings_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ScoreProtection(**settings)  # type: ignore[arg-type]
