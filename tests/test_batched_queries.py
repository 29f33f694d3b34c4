"""Several encrypted queries in one Score call (ScoreRequest.more_queries): one pass
over the catalog for all of them, through a real server on loopback, with the local
backend and with worker processes, from the client and from a raw stub."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import TIMEOUT, raw_scores, register_keys, serving

from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer, SizeLimits
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import FloatArray, query_slots, unpack_complex
from heserve.transport.server import RunningServer
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import Client, SecretContext

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["local", "pool"])
def batched(request: pytest.FixtureRequest, books: Catalog) -> Iterator[RunningServer]:
    """A server whose catalog spans two chunks, limited to 3 queries per call."""
    backend = PoolBackend(DEFAULT_PARAMETERS, workers=2) if request.param == "pool" else None
    limits = SizeLimits(max_queries_per_request=3)
    scorer = Scorer(DEFAULT_PARAMETERS, [books], limits=limits, backend=backend)
    try:
        with serving(scorer) as running:
            yield running
    finally:
        scorer.backend.close()


def test_the_server_announces_its_limit(batched: RunningServer) -> None:
    with Client(f"127.0.0.1:{batched.port}") as client:
        assert client.server_info.limits.max_queries_per_request == 3


def test_score_many_equals_each_vector_scored_alone(batched: RunningServer, books: Catalog) -> None:
    vectors = unit_rows(5, books.dimension, seed=41)  # two calls: 3 queries, then 2
    with Client(f"127.0.0.1:{batched.port}") as client:
        together = client.score_many(vectors, catalog="books")
        alone = [client.score(vector, catalog="books") for vector in vectors[:2]]
        ranked = client.recommend_many(vectors, catalog="books", k=5)
    assert len(together) == 5
    for vector, scores in zip(vectors, together, strict=True):
        np.testing.assert_allclose(scores, books.embeddings @ vector, rtol=0, atol=TOLERANCE)
    for mine, theirs in zip(together, alone, strict=False):
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=2 * TOLERANCE)
    for vector, ranking in zip(vectors, ranked, strict=True):
        best = np.argsort(-(books.embeddings @ vector), kind="stable")[:5]
        assert [item for item, _ in ranking] == [books.ids[i] for i in best]


def test_re_ranking_several_vectors_keeps_the_candidates_order(
    batched: RunningServer, books: Catalog
) -> None:
    vectors = unit_rows(3, books.dimension, seed=42)
    candidates = [books.ids[i] for i in (4_999, 7, 2_500, 0)]
    rows = books.embeddings[[4_999, 7, 2_500, 0]]
    with Client(f"127.0.0.1:{batched.port}") as client:
        results = client.score_many(vectors, catalog="books", item_ids=candidates)
    for vector, scores in zip(vectors, results, strict=True):
        np.testing.assert_allclose(scores, rows @ vector, rtol=0, atol=TOLERANCE)


def _stub(server: RunningServer) -> Iterator[pb_grpc.ScoringServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ScoringServiceStub(channel)


def test_responses_come_chunk_by_chunk_then_query_by_query(
    batched: RunningServer, books: Catalog, secret: SecretContext
) -> None:
    for stub in _stub(batched):
        key_id = register_keys(stub, secret.galois_keys(_steps(stub)))
        vectors = unit_rows(3, books.dimension, seed=43)
        plan_slots = DEFAULT_PARAMETERS.slot_count
        queries = [secret.encrypt(_slots(vector, plan_slots)) for vector in vectors]
        request = pb.ScoreRequest(
            key_id=key_id,
            catalog="books",
            query=queries[0],
            more_queries=queries[1:],
            complex_scores=True,
        )
        replies = list(stub.Score(request, timeout=TIMEOUT))
        order = [(reply.chunk_index, reply.query_index) for reply in replies]
        assert order == [(0, 0), (0, 1), (0, 2)]  # 5,000 items: one complex chunk
        assert {reply.chunk_count for reply in replies} == {1}
        for reply in replies:
            values = unpack_complex(secret.decrypt_complex(reply.scores, 1 << 24), reply.count)
            expected = books.embeddings @ vectors[reply.query_index]
            np.testing.assert_allclose(values, expected, rtol=0, atol=TOLERANCE)
        # real-slot scores: each chunk splits in two, each half for every query in turn
        request.complex_scores = False
        real = [
            (reply.chunk_index, reply.query_index, reply.offset)
            for reply in stub.Score(request, timeout=TIMEOUT)
        ]
        half = DEFAULT_PARAMETERS.slot_count
        assert real == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, half), (1, 1, half), (1, 2, half)]
        single = pb.ScoreRequest(
            key_id=key_id, catalog="books", query=queries[1], complex_scores=True
        )
        scores = raw_scores(stub, secret, single, books.item_count)
        np.testing.assert_allclose(scores, books.embeddings @ vectors[1], rtol=0, atol=TOLERANCE)


def test_too_many_or_broken_queries_are_refused_before_any_work(
    batched: RunningServer, books: Catalog, secret: SecretContext
) -> None:
    for stub in _stub(batched):
        key_id = register_keys(stub, secret.galois_keys(_steps(stub)))
        query = secret.encrypt(_slots(unit_rows(1, books.dimension, seed=44)[0], 4096))
        too_many = pb.ScoreRequest(
            key_id=key_id, catalog="books", query=query, more_queries=[query] * 3
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Score(too_many, timeout=TIMEOUT))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 per request" in str(refused.value.details())
        broken = pb.ScoreRequest(
            key_id=key_id, catalog="books", query=query, more_queries=[query, b"not a query"]
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Score(broken, timeout=TIMEOUT))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _slots(vector: FloatArray, slot_count: int) -> FloatArray:
    return query_slots(vector, vector.shape[0], slot_count)


def _steps(stub: pb_grpc.ScoringServiceStub) -> list[int]:
    """The rotation steps the server asks keys for (GetServerInfo)."""
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT)
    return list(info.ckks.galois_steps)
