"""The server answers each query in the SEAL 4.x version it carried (issue 9, finding 7):
a client never re-tags bytes, whichever SEAL 4.0-4.3 it links. A version whose layout
the server does not check is refused, naming the versions it accepts."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import TIMEOUT, register_keys

from heserve.domain.catalog import Catalog
from heserve.protocol import wire
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import query_slots
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import SecretContext

SEAL_HEADER = struct.Struct("<HBBBBHQ")


@pytest.fixture(scope="module")
def keyed(stub: pb_grpc.ScoringServiceStub, secret: SecretContext) -> Iterator[str]:
    steps = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT).ckks.galois_steps
    key_id = register_keys(stub, secret.galois_keys(list(steps)))
    yield key_id
    stub.DeleteKeys(pb.DeleteKeysRequest(key_id=key_id), timeout=TIMEOUT)


@pytest.mark.parametrize("minor", [0, 1, 3])
@pytest.mark.parametrize("complex_scores", [False, True])
def test_responses_carry_the_version_of_their_query(
    stub: pb_grpc.ScoringServiceStub,
    secret: SecretContext,
    keyed: str,
    books: Catalog,
    minor: int,
    complex_scores: bool,
) -> None:
    vector = np.ones(books.dimension) / np.sqrt(books.dimension)
    query = wire.ciphertext_to_wire(
        secret.encrypt(query_slots(vector, books.dimension, DEFAULT_PARAMETERS.slot_count)),
        minor,
    )
    assert SEAL_HEADER.unpack_from(query)[3] == minor
    request = pb.ScoreRequest(
        key_id=keyed, catalog="books", query=query, complex_scores=complex_scores
    )
    replies = list(stub.Score(request, timeout=TIMEOUT))
    assert replies
    for reply in replies:
        magic, _, major, reply_minor, mode, _, size = SEAL_HEADER.unpack_from(reply.scores)
        assert (magic, major, reply_minor, mode, size) == (0xA15E, 4, minor, 0, len(reply.scores))
    first = replies[0]
    decoded = (
        secret.decrypt_complex(first.scores, 1 << 24).real
        if complex_scores
        else secret.decrypt(first.scores, 1 << 24)
    )
    covered = min(first.count, len(decoded))  # complex: the real parts hold the first S
    expected = books.embeddings[first.offset : first.offset + covered] @ vector
    assert np.abs(decoded[:covered] - expected).max() < 1e-4


def test_an_unchecked_version_is_refused_naming_the_accepted_ones(
    stub: pb_grpc.ScoringServiceStub, secret: SecretContext, keyed: str, books: Catalog
) -> None:
    query = bytearray(
        wire.ciphertext_to_wire(
            secret.encrypt(
                query_slots(
                    np.ones(books.dimension), books.dimension, DEFAULT_PARAMETERS.slot_count
                )
            )
        )
    )
    query[4] = 4  # SEAL 4.4: no such layout is known
    with pytest.raises(grpc.RpcError) as refused:
        list(
            stub.Score(
                pb.ScoreRequest(key_id=keyed, catalog="books", query=bytes(query)), timeout=TIMEOUT
            )
        )
    error = refused.value
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4.0, 4.1, 4.2, 4.3" in (error.details() or "")
