"""A real client against a real server on loopback, with real CKKS encryption."""

from __future__ import annotations

import numpy as np

from heserve.domain.catalog import Catalog
from heserve_client import Client


def test_recommend_equals_plaintext_top_k(client: Client, books: Catalog, user: np.ndarray) -> None:
    expected_scores = books.embeddings @ user
    expected = [books.ids[i] for i in np.argsort(-expected_scores, kind="stable")[:10]]

    top = client.recommend(user, catalog="books", k=10)

    assert [item for item, _ in top] == expected
    assert np.allclose([score for _, score in top], np.sort(expected_scores)[::-1][:10], atol=1e-4)


def test_scores_match_plaintext_within_1e4(
    client: Client, books: Catalog, user: np.ndarray
) -> None:
    scores = client.score(user, catalog="books")

    assert scores.shape == (books.item_count,)
    assert np.abs(scores - books.embeddings @ user).max() < 1e-4
