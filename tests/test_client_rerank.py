"""Re-ranking in the client: the whole catalog scored, the candidates picked locally,
when that is the cheaper query (and the server then learns no candidate), against
the server's own re-ranking; both through a real server on loopback."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.transport.server import RunningServer
from heserve_client import Client, ClientClosedError, InvalidRequestError, NotFoundError

TOLERANCE = 1e-4


def test_locally_and_on_the_server_the_candidates_get_the_same_scores(
    server: RunningServer, scorer: Scorer, books: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks = [4_999, 7, 2_500, 0, 4_096]
    candidates = [books.ids[i] for i in picks]
    vectors = unit_rows(2, books.dimension, seed=61)
    target = f"127.0.0.1:{server.port}"
    sent_candidates: list[int] = []  # re-rankings the server was asked for
    score_rows = scorer.backend.score_rows

    def counted(call: Any, rows: Any) -> Any:
        sent_candidates.append(len(rows))
        return score_rows(call, rows)

    monkeypatch.setattr(scorer.backend, "score_rows", counted)
    with (
        Client(target, rerank_locally=True) as local,
        Client(target, rerank_locally=False) as remote,
    ):
        mine = local.score_many(vectors, catalog="books", item_ids=candidates)
        assert sent_candidates == []  # the server never saw the candidates
        theirs = remote.score_many(vectors, catalog="books", item_ids=candidates)
        assert sent_candidates == [len(picks)]
    for vector, a, b in zip(vectors, mine, theirs, strict=True):
        expected = books.embeddings[picks] @ vector
        np.testing.assert_allclose(a, expected, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(b, expected, rtol=0, atol=TOLERANCE)


def test_the_default_picks_locally_only_when_the_catalog_is_small_against_the_list(
    server: RunningServer, books: Catalog
) -> None:
    """books: 5,000 items, one chunk; one candidate is one chunk too: local."""
    vector = unit_rows(1, books.dimension, seed=62)[0]
    with Client(f"127.0.0.1:{server.port}") as client:
        info = client.catalog("books")
        assert client._select_locally(info, 1)
        scores = client.score(vector, catalog="books", item_ids=[books.ids[3]])
        assert client.stats.last_response_bytes > 0
    np.testing.assert_allclose(scores, [books.embeddings[3] @ vector], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("locally", [True, False])
def test_unknown_and_repeated_ids_are_refused_alike(
    server: RunningServer, books: Catalog, locally: bool
) -> None:
    vector = unit_rows(1, books.dimension, seed=63)[0]
    with Client(f"127.0.0.1:{server.port}", rerank_locally=locally) as client:
        with pytest.raises(NotFoundError, match="no-such-item"):
            client.score(vector, catalog="books", item_ids=[books.ids[0], "no-such-item"])
        with pytest.raises(InvalidRequestError, match="repeated"):
            client.score(vector, catalog="books", item_ids=[books.ids[0], books.ids[0]])


def test_no_candidates_give_no_scores_and_send_nothing(
    server: RunningServer, books: Catalog, scorer: Scorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app that filtered its candidates down to none gets none back, not the whole
    catalog; the server is not asked."""
    calls: list[int] = []
    monkeypatch.setattr(scorer, "score", lambda *args, **kwargs: calls.append(1))
    vector = unit_rows(1, books.dimension, seed=64)[0]
    with Client(f"127.0.0.1:{server.port}") as client:
        assert client.score(vector, catalog="books", item_ids=[]).shape == (0,)
        assert client.recommend(vector, catalog="books", k=3, item_ids=[]) == []
    assert calls == []


def test_a_closed_client_says_so(server: RunningServer, books: Catalog) -> None:
    vector = unit_rows(1, books.dimension, seed=65)[0]
    client = Client(f"127.0.0.1:{server.port}")
    client.close()
    with pytest.raises(ClientClosedError, match="closed"):
        client.score(vector, catalog="books")
    with pytest.raises(ClientClosedError):
        client.catalogs()
