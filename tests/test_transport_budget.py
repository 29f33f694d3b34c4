"""The query budget per query, not per call, and no charge for a call that failed on
keys the server no longer holds (issue 10, finding 2): a real server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from conftest import TIMEOUT, register_keys, serving

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import query_slots
from heserve.transport.auth import Authenticator, QueryBudget
from heserve.transport.server import RunningServer
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import SecretContext

TOKEN = "budgeted-token-0123456789abcdef"
ALICE = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
def budgeted(films: Catalog) -> Iterator[tuple[RunningServer, pb_grpc.ScoringServiceStub]]:
    scorer = Scorer(DEFAULT_PARAMETERS, [films])
    authenticator = Authenticator([("alice", TOKEN)])
    with (
        serving(scorer, authenticator=authenticator, query_budget=QueryBudget(4)) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        yield running, pb_grpc.ScoringServiceStub(channel)


def _code(stub: pb_grpc.ScoringServiceStub, request: pb.ScoreRequest) -> grpc.StatusCode:
    try:
        list(stub.Score(request, timeout=TIMEOUT, metadata=ALICE))
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def _alice_with_a_query(
    stub: pb_grpc.ScoringServiceStub, films: Catalog, seed: int
) -> tuple[bytes, str, bytes]:
    """A key pair's Galois keys registered as alice, their key_id, and a query of it."""
    secret = SecretContext(DEFAULT_PARAMETERS)
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT, metadata=ALICE)
    keys = secret.galois_keys(list(info.ckks.galois_steps))
    key_id = register_keys(stub, keys, metadata=ALICE)
    vector = unit_rows(1, films.dimension, seed=seed)[0]
    query = secret.encrypt(query_slots(vector, films.dimension, DEFAULT_PARAMETERS.slot_count))
    return keys, key_id, query


def test_each_query_of_a_call_is_charged_and_a_call_past_the_budget_is_refused_whole(
    budgeted: tuple[RunningServer, pb_grpc.ScoringServiceStub], films: Catalog
) -> None:
    _, stub = budgeted
    _, key_id, query = _alice_with_a_query(stub, films, seed=5)

    def request(queries: int) -> pb.ScoreRequest:
        return pb.ScoreRequest(
            key_id=key_id,
            catalog="films",
            query=query,
            more_queries=[query] * (queries - 1),
            complex_scores=True,
        )

    assert _code(stub, request(3)) == grpc.StatusCode.OK  # 3 of 4 spent
    assert _code(stub, request(2)) == grpc.StatusCode.RESOURCE_EXHAUSTED  # would be 5
    assert _code(stub, request(1)) == grpc.StatusCode.OK  # the refused call cost nothing
    assert _code(stub, request(1)) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_call_whose_keys_are_gone_is_not_charged(
    budgeted: tuple[RunningServer, pb_grpc.ScoringServiceStub], films: Catalog
) -> None:
    _, stub = budgeted
    keys, key_id, query = _alice_with_a_query(stub, films, seed=6)
    stub.DeleteKeys(pb.DeleteKeysRequest(key_id=key_id), timeout=TIMEOUT, metadata=ALICE)
    gone = pb.ScoreRequest(key_id=key_id, catalog="films", query=query, complex_scores=True)
    for _ in range(6):  # more than the budget of 4: none of them is charged
        assert _code(stub, gone) == grpc.StatusCode.NOT_FOUND
    key_id = register_keys(stub, keys, metadata=ALICE)
    again = pb.ScoreRequest(key_id=key_id, catalog="films", query=query, complex_scores=True)
    assert [_code(stub, again) for _ in range(5)] == [grpc.StatusCode.OK] * 4 + [
        grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
