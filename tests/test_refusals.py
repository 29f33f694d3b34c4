"""Malformed, hostile and out-of-bounds requests against a real server on loopback.

Each refusal is sent through the raw generated stub so the exact gRPC status can
be asserted, and after each one the server must still answer. Keys and
ciphertexts are made with real SEAL (tenseal.sealapi), including ones that are
valid SEAL objects of the wrong kind, under the wrong parameters, at the wrong
level or scale.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import replace

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tenseal.sealapi as seal
import zstandard
from conftest import TIMEOUT, key_chunks, raw_scores, register_keys, serving
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer, SizeLimits
from heserve.protocol import wire
from heserve.protocol.params import DEFAULT_PARAMETERS, CkksParameters
from heserve.protocol.reasons import CATALOG_VERSION_CHANGED, ERROR_DOMAIN, KEY_NOT_FOUND
from heserve.protocol.slots import query_slots
from heserve.transport.server import RunningServer, start_server
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import (
    Client,
    HeserveError,
    InvalidRequestError,
    LimitExceededError,
    NotFoundError,
    SecretContext,
)

FloatArray = npt.NDArray[np.float64]


def _reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a refusal ("" if it has none)."""
    assert isinstance(error, grpc.Call)
    status = rpc_status.from_call(error)
    for detail in [] if status is None else status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


SEAL_HEADER = struct.Struct("<HBBBBHQ")
# Valid 128-bit parameters that are not the server's: one more data prime, and a
# larger ring. Derived from the defaults so every other setting matches.
OTHER_PARAMETERS = replace(DEFAULT_PARAMETERS, coeff_modulus_bits=(60, 40, 40, 60))
LARGER_RING = replace(OTHER_PARAMETERS, poly_modulus_degree=16384)


class Party:
    """A key pair under some parameters, built straight on SEAL, able to make bad inputs."""

    def __init__(self, params: CkksParameters) -> None:
        self.params = params
        self.context = params.seal_context()
        self.keygen = seal.KeyGenerator(self.context)
        secret = self.keygen.secret_key()
        self.encryptor = seal.Encryptor(self.context, secret)
        self.decryptor = seal.Decryptor(self.context, secret)
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        # the client library's own decryption, under this party's secret key
        self.decrypting = SecretContext(params, secret)

    def galois_keys(self, steps: list[int]) -> bytes:
        n = self.params.poly_modulus_degree
        elements = sorted({wire.galois_element(step, n) for step in steps})
        return wire.to_bytes(self.keygen.create_galois_keys(elements))

    def query(
        self,
        vector: FloatArray,
        *,
        scale_bits: int | None = None,
        lower_level: bool = False,
    ) -> bytes:
        slots = query_slots(vector, vector.shape[0], self.params.slot_count)
        plaintext = seal.Plaintext()
        bits = self.params.scale_bits if scale_bits is None else scale_bits
        self.encoder.encode(slots.tolist(), float(2**bits), plaintext)
        if not lower_level:
            # seeded symmetric encryption, as the client sends: half the size
            return wire.to_bytes(self.encryptor.encrypt_symmetric(plaintext))
        ciphertext = seal.Ciphertext()
        self.encryptor.encrypt_symmetric(plaintext, ciphertext)
        lowered = seal.Ciphertext()
        self.evaluator.mod_switch_to_next(ciphertext, lowered)
        return wire.to_bytes(lowered)

    def decrypt(self, blob: bytes, max_bytes: int) -> FloatArray:
        return self.decrypting.decrypt(blob, max_bytes)

    def decrypt_complex(self, blob: bytes, max_bytes: int) -> npt.NDArray[np.complex128]:
        return self.decrypting.decrypt_complex(blob, max_bytes)


def code_of(error: grpc.RpcError) -> grpc.StatusCode:
    assert isinstance(error, grpc.Call)
    return error.code()


def register_code(
    stub: pb_grpc.ScoringServiceStub, requests: list[pb.RegisterKeysRequest]
) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterKeys(iter(requests), timeout=TIMEOUT)
    return code_of(info.value)


def score_error(stub: pb_grpc.ScoringServiceStub, request: pb.ScoreRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Score(request, timeout=TIMEOUT))
    return info.value


def assert_alive(stub: pb_grpc.ScoringServiceStub) -> None:
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT)
    assert info.ckks.poly_modulus_degree == DEFAULT_PARAMETERS.poly_modulus_degree


def seal_bomb(inflated_size: int, mode: int, template: bytes) -> bytes:
    """A valid SEAL header (copied from `template`) over compressed zeros."""
    zeros = b"\0" * inflated_size
    body = zstandard.ZstdCompressor().compress(zeros) if mode == 2 else zlib.compress(zeros, 9)
    magic, header_size, major, minor, _, reserved, _ = SEAL_HEADER.unpack_from(template)
    header = SEAL_HEADER.pack(
        magic, header_size, major, minor, mode, reserved, SEAL_HEADER.size + len(body)
    )
    return header + body


@pytest.fixture(scope="module")
def info(stub: pb_grpc.ScoringServiceStub) -> pb.GetServerInfoResponse:
    reply: pb.GetServerInfoResponse = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT)
    return reply


@pytest.fixture(scope="module")
def party() -> Party:
    return Party(DEFAULT_PARAMETERS)


@pytest.fixture(scope="module")
def key_id(stub: pb_grpc.ScoringServiceStub, party: Party, info: pb.GetServerInfoResponse) -> str:
    return register_keys(stub, party.galois_keys(list(info.ckks.galois_steps)))


@pytest.fixture
def films_user(films: Catalog) -> FloatArray:
    vector: FloatArray = unit_rows(1, films.dimension, seed=7)[0]
    return vector


@pytest.fixture
def good_request(key_id: str, party: Party, films_user: FloatArray) -> pb.ScoreRequest:
    return pb.ScoreRequest(key_id=key_id, catalog="films", query=party.query(films_user))


def assert_scores_right(
    stub: pb_grpc.ScoringServiceStub,
    party: Party,
    request: pb.ScoreRequest,
    films: Catalog,
    user: FloatArray,
) -> None:
    scores = raw_scores(stub, party, request, films.item_count)
    assert np.abs(scores - films.embeddings @ user).max() < 1e-4


# --- the baseline the refusals are variations of ------------------------------------


def test_party_queries_score_correctly(
    stub: pb_grpc.ScoringServiceStub,
    party: Party,
    good_request: pb.ScoreRequest,
    films: Catalog,
    films_user: FloatArray,
) -> None:
    assert_scores_right(stub, party, good_request, films, films_user)


# --- RegisterKeys ------------------------------------------------------------------


def test_secret_key_is_refused_and_not_stored(
    stub: pb_grpc.ScoringServiceStub, scorer: Scorer, party: Party
) -> None:
    blob = wire.to_bytes(party.keygen.secret_key())
    before = len(scorer.keys)

    assert register_code(stub, list(key_chunks(blob))) == grpc.StatusCode.INVALID_ARGUMENT

    assert len(scorer.keys) == before
    assert_alive(stub)


def test_public_key_is_refused(
    stub: pb_grpc.ScoringServiceStub, scorer: Scorer, party: Party
) -> None:
    public_key = seal.PublicKey()
    party.keygen.create_public_key(public_key)
    before = len(scorer.keys)

    code = register_code(stub, list(key_chunks(wire.to_bytes(public_key))))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(scorer.keys) == before
    assert_alive(stub)


def test_relin_keys_are_refused(
    stub: pb_grpc.ScoringServiceStub, scorer: Scorer, party: Party
) -> None:
    before = len(scorer.keys)

    code = register_code(stub, list(key_chunks(wire.to_bytes(party.keygen.create_relin_keys()))))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(scorer.keys) == before
    assert_alive(stub)


def test_galois_keys_missing_a_step_are_refused(
    stub: pb_grpc.ScoringServiceStub,
    scorer: Scorer,
    party: Party,
    info: pb.GetServerInfoResponse,
) -> None:
    steps = list(info.ckks.galois_steps)
    assert steps[0] == 0  # the conjugation key: optional, see the test below
    assert len(steps) >= 3
    before = len(scorer.keys)

    for missing in steps[1:]:
        blob = party.galois_keys([step for step in steps if step != missing])
        code = register_code(stub, list(key_chunks(blob)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"keys without step {missing}"
        blob = party.galois_keys([step for step in steps if step not in (0, missing)])
        code = register_code(stub, list(key_chunks(blob)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"keys without steps 0 and {missing}"

    assert len(scorer.keys) == before
    assert_alive(stub)


def test_keys_without_the_conjugation_key_score_complex_only(
    stub: pb_grpc.ScoringServiceStub,
    scorer: Scorer,
    party: Party,
    info: pb.GetServerInfoResponse,
    films: Catalog,
    films_user: FloatArray,
) -> None:
    steps = list(info.ckks.galois_steps)
    assert steps[0] == 0
    before = len(scorer.keys)
    key_id = register_keys(stub, party.galois_keys(steps[1:]))  # accepted without step 0
    assert len(scorer.keys) == before + 1
    request = pb.ScoreRequest(key_id=key_id, catalog="films", query=party.query(films_user))

    # real scores need the conjugation key: refused before anything is computed
    error = score_error(stub, request)
    assert code_of(error) == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(error, grpc.Call)
    assert "conjugation" in (error.details() or "")
    request.item_ids.extend(["films-3", "films-1"])
    assert code_of(score_error(stub, request)) == grpc.StatusCode.FAILED_PRECONDITION
    del request.item_ids[:]

    # the same keys serve complex scores, for the whole catalog and for a subset
    request.complex_scores = True
    assert_scores_right(stub, party, request, films, films_user)
    request.item_ids.extend(["films-3", "films-1"])
    scores = raw_scores(stub, party, request, 2)
    assert np.abs(scores - films.embeddings[[3, 1]] @ films_user).max() < 1e-4

    # with the conjugation key added, the same request in real slots scores too
    full = register_keys(stub, party.galois_keys(steps))
    real = pb.ScoreRequest(key_id=full, catalog="films", query=request.query)
    assert_scores_right(stub, party, real, films, films_user)
    for held in (key_id, full):
        assert stub.DeleteKeys(pb.DeleteKeysRequest(key_id=held), timeout=TIMEOUT).deleted
    assert len(scorer.keys) == before


@pytest.mark.parametrize("params", [OTHER_PARAMETERS, LARGER_RING], ids=["more-primes", "N16384"])
def test_galois_keys_under_other_parameters_are_refused(
    stub: pb_grpc.ScoringServiceStub,
    scorer: Scorer,
    info: pb.GetServerInfoResponse,
    params: CkksParameters,
) -> None:
    blob = Party(params).galois_keys(list(info.ckks.galois_steps))
    assert len(blob) <= info.limits.max_key_bytes  # refused for what it is, not its size
    before = len(scorer.keys)

    assert register_code(stub, list(key_chunks(blob))) == grpc.StatusCode.INVALID_ARGUMENT

    assert len(scorer.keys) == before
    assert_alive(stub)


@pytest.mark.parametrize("length", [1, 15, 16, 4096, 100_000])
def test_random_bytes_are_refused(
    stub: pb_grpc.ScoringServiceStub, scorer: Scorer, length: int
) -> None:
    before = len(scorer.keys)

    code = register_code(stub, [pb.RegisterKeysRequest(galois_keys_chunk=os.urandom(length))])

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(scorer.keys) == before
    assert_alive(stub)


def test_truncated_galois_keys_are_refused(
    stub: pb_grpc.ScoringServiceStub, party: Party, info: pb.GetServerInfoResponse
) -> None:
    blob = party.galois_keys(list(info.ckks.galois_steps))

    code = register_code(stub, list(key_chunks(blob[: len(blob) // 2])))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert_alive(stub)


def with_seal_header(body: bytes, template: bytes) -> bytes:
    """`body` behind a valid, uncompressed SEAL header copied from `template`."""
    magic, header_size, major, minor, _, reserved, _ = SEAL_HEADER.unpack_from(template)
    size = SEAL_HEADER.size + len(body)
    return SEAL_HEADER.pack(magic, header_size, major, minor, 0, reserved, size) + body


@pytest.mark.parametrize("length", [8, 4096, 300_000])
def test_random_body_under_a_valid_seal_header_is_refused(
    stub: pb_grpc.ScoringServiceStub, scorer: Scorer, party: Party, length: int
) -> None:
    blob = with_seal_header(os.urandom(length), party.galois_keys([1]))
    before = len(scorer.keys)

    assert register_code(stub, list(key_chunks(blob))) == grpc.StatusCode.INVALID_ARGUMENT

    assert len(scorer.keys) == before
    assert_alive(stub)


def test_galois_keys_cut_short_under_a_patched_header_are_refused(
    stub: pb_grpc.ScoringServiceStub, party: Party, info: pb.GetServerInfoResponse
) -> None:
    blob = bytearray(party.galois_keys(list(info.ckks.galois_steps))[:200_000])
    struct.pack_into("<Q", blob, 8, len(blob))  # the header now agrees with the length

    assert register_code(stub, list(key_chunks(bytes(blob)))) == grpc.StatusCode.INVALID_ARGUMENT
    assert_alive(stub)


def test_chunk_over_one_mebibyte_is_refused(
    stub: pb_grpc.ScoringServiceStub, info: pb.GetServerInfoResponse
) -> None:
    assert info.limits.max_key_chunk_bytes == 1 << 20
    chunk = b"\0" * (info.limits.max_key_chunk_bytes + 1)

    code = register_code(stub, [pb.RegisterKeysRequest(galois_keys_chunk=chunk)])

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert_alive(stub)


def test_empty_stream_is_refused(stub: pb_grpc.ScoringServiceStub) -> None:
    assert register_code(stub, []) == grpc.StatusCode.INVALID_ARGUMENT
    empty_chunks = [pb.RegisterKeysRequest(), pb.RegisterKeysRequest()]
    assert register_code(stub, empty_chunks) == grpc.StatusCode.INVALID_ARGUMENT
    assert_alive(stub)


@pytest.mark.parametrize("mode", [2, 1], ids=["zstd", "zlib"])
def test_key_decompression_bomb_is_refused(
    stub: pb_grpc.ScoringServiceStub,
    scorer: Scorer,
    party: Party,
    info: pb.GetServerInfoResponse,
    mode: int,
) -> None:
    template = party.galois_keys([1])
    bomb = seal_bomb(info.limits.max_key_bytes + (1 << 20), mode, template)
    assert len(bomb) < 64 << 10  # small on the wire, huge when inflated
    before = len(scorer.keys)

    code = register_code(stub, list(key_chunks(bomb)))

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(scorer.keys) == before
    assert_alive(stub)


def test_compressed_zeros_within_the_limit_are_invalid_not_exhausted(
    stub: pb_grpc.ScoringServiceStub, party: Party
) -> None:
    # The same construction below the limit inflates fine and is then refused as
    # not being keys: the bomb above was refused for its inflated size.
    template = party.galois_keys([1])

    code = register_code(stub, list(key_chunks(seal_bomb(1 << 20, 2, template))))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert_alive(stub)


def test_registering_the_same_bytes_twice_returns_the_same_key_id(
    stub: pb_grpc.ScoringServiceStub,
    scorer: Scorer,
    party: Party,
    info: pb.GetServerInfoResponse,
) -> None:
    blob = party.galois_keys(list(info.ckks.galois_steps))
    before = len(scorer.keys)

    first = register_keys(stub, blob)
    second = register_keys(stub, blob, size=100_000)  # other chunking, same bytes

    assert first == second
    assert len(scorer.keys) == before + 1
    other = register_keys(stub, party.galois_keys(list(info.ckks.galois_steps)))
    assert other != first  # fresh keys (new randomness) are other bytes
    assert stub.DeleteKeys(pb.DeleteKeysRequest(key_id=first), timeout=TIMEOUT).deleted
    assert stub.DeleteKeys(pb.DeleteKeysRequest(key_id=other), timeout=TIMEOUT).deleted


@pytest.fixture(scope="module")
def small_key_limit_server(films: Catalog) -> Iterator[RunningServer]:
    scorer = Scorer(DEFAULT_PARAMETERS, [films], limits=SizeLimits(max_key_bytes=256 << 10))
    with serving(scorer) as running:
        yield running


def test_key_upload_over_max_key_bytes_is_exhausted(
    small_key_limit_server: RunningServer, party: Party
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{small_key_limit_server.port}") as channel:
        small = pb_grpc.ScoringServiceStub(channel)
        limits = small.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT).limits
        steps = list(small.GetServerInfo(pb.GetServerInfoRequest()).ckks.galois_steps)
        blob = party.galois_keys(steps)  # real keys, just larger than this server allows
        assert len(blob) > limits.max_key_bytes

        code = register_code(small, list(key_chunks(blob, 64 << 10)))

        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_alive(small)


# --- Score -------------------------------------------------------------------------


def test_unknown_catalog_is_not_found(
    stub: pb_grpc.ScoringServiceStub, good_request: pb.ScoreRequest
) -> None:
    good_request.catalog = "no-such-catalog"

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.NOT_FOUND
    assert_alive(stub)


def test_unknown_item_id_is_not_found(
    stub: pb_grpc.ScoringServiceStub, good_request: pb.ScoreRequest
) -> None:
    good_request.item_ids.extend(["films-1", "films-300"])  # films-299 is the last

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.NOT_FOUND
    assert_alive(stub)


def test_repeated_item_ids_are_invalid(
    stub: pb_grpc.ScoringServiceStub, good_request: pb.ScoreRequest
) -> None:
    good_request.item_ids.extend(["films-1", "films-2", "films-1"])

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.INVALID_ARGUMENT
    assert_alive(stub)


def test_more_item_ids_than_the_limit_are_exhausted(
    stub: pb_grpc.ScoringServiceStub,
    good_request: pb.ScoreRequest,
    info: pb.GetServerInfoResponse,
) -> None:
    good_request.item_ids.extend(f"x{i}" for i in range(info.limits.max_item_ids + 1))

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_alive(stub)


@pytest.fixture(scope="module")
def few_ids_server(films: Catalog) -> Iterator[RunningServer]:
    scorer = Scorer(DEFAULT_PARAMETERS, [films], limits=SizeLimits(max_item_ids=3))
    with serving(scorer) as running:
        yield running


def test_item_id_limit_is_inclusive(
    few_ids_server: RunningServer, party: Party, films: Catalog, films_user: FloatArray
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{few_ids_server.port}") as channel:
        small = pb_grpc.ScoringServiceStub(channel)
        steps = list(small.GetServerInfo(pb.GetServerInfoRequest()).ckks.galois_steps)
        request = pb.ScoreRequest(
            key_id=register_keys(small, party.galois_keys(steps)),
            catalog="films",
            query=party.query(films_user),
            item_ids=["films-5", "films-0", "films-9"],
        )

        scores = raw_scores(small, party, request, 3)
        assert np.abs(scores - films.embeddings[[5, 0, 9]] @ films_user).max() < 1e-4

        request.item_ids.append("films-1")
        assert code_of(score_error(small, request)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_alive(small)


def test_unknown_key_id_is_not_found_with_key_not_found_reason(
    stub: pb_grpc.ScoringServiceStub, good_request: pb.ScoreRequest
) -> None:
    good_request.key_id = "0" * 32

    error = score_error(stub, good_request)

    assert code_of(error) == grpc.StatusCode.NOT_FOUND
    assert isinstance(error, grpc.Call)
    status = rpc_status.from_call(error)
    assert status is not None
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert [(i.reason, i.domain) for i in infos] == [(KEY_NOT_FOUND, ERROR_DOMAIN)]
    assert_alive(stub)


def test_unknown_catalog_has_no_key_not_found_reason(
    stub: pb_grpc.ScoringServiceStub, good_request: pb.ScoreRequest
) -> None:
    # A client re-registers keys on KEY_NOT_FOUND only; other NOT_FOUNDs must not say so.
    good_request.catalog = "no-such-catalog"

    error = score_error(stub, good_request)

    assert isinstance(error, grpc.Call)
    status = rpc_status.from_call(error)
    details = [] if status is None else list(status.details)
    assert not any(d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) for d in details)


def test_wrong_catalog_version_is_failed_precondition(
    stub: pb_grpc.ScoringServiceStub,
    good_request: pb.ScoreRequest,
    party: Party,
    films: Catalog,
    films_user: FloatArray,
) -> None:
    good_request.catalog_version = "0" * 16 if films.version != "0" * 16 else "1" * 16

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.FAILED_PRECONDITION

    good_request.catalog_version = films.version
    assert_scores_right(stub, party, good_request, films, films_user)


def test_empty_query_is_invalid(
    stub: pb_grpc.ScoringServiceStub, good_request: pb.ScoreRequest
) -> None:
    good_request.query = b""

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.INVALID_ARGUMENT
    assert_alive(stub)


@pytest.mark.parametrize("length", [3, 16, 1000, 100_000])
def test_garbage_query_is_invalid(
    stub: pb_grpc.ScoringServiceStub, good_request: pb.ScoreRequest, length: int
) -> None:
    good_request.query = os.urandom(length)

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.INVALID_ARGUMENT
    assert_alive(stub)


def test_truncated_query_is_invalid(
    stub: pb_grpc.ScoringServiceStub, good_request: pb.ScoreRequest
) -> None:
    query = good_request.query
    good_request.query = query[: len(query) - 100]
    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.INVALID_ARGUMENT

    # Also with the SEAL header's size field patched to match the truncation.
    truncated = bytearray(query[: len(query) // 2])
    struct.pack_into("<Q", truncated, 8, len(truncated))
    good_request.query = bytes(truncated)
    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.INVALID_ARGUMENT
    assert_alive(stub)


def test_random_body_under_a_valid_seal_header_is_an_invalid_query(
    stub: pb_grpc.ScoringServiceStub, good_request: pb.ScoreRequest
) -> None:
    good_request.query = with_seal_header(os.urandom(len(good_request.query)), good_request.query)

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.INVALID_ARGUMENT
    assert_alive(stub)


def test_query_under_other_parameters_is_invalid(
    stub: pb_grpc.ScoringServiceStub,
    good_request: pb.ScoreRequest,
    info: pb.GetServerInfoResponse,
    films_user: FloatArray,
) -> None:
    good_request.query = Party(OTHER_PARAMETERS).query(films_user)
    assert len(good_request.query) <= info.limits.max_query_bytes

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.INVALID_ARGUMENT
    assert_alive(stub)


def test_query_at_a_lower_level_is_invalid(
    stub: pb_grpc.ScoringServiceStub,
    good_request: pb.ScoreRequest,
    party: Party,
    films_user: FloatArray,
) -> None:
    good_request.query = party.query(films_user, lower_level=True)

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.INVALID_ARGUMENT
    assert_alive(stub)


def test_query_at_the_wrong_scale_is_invalid(
    stub: pb_grpc.ScoringServiceStub,
    good_request: pb.ScoreRequest,
    party: Party,
    films: Catalog,
    films_user: FloatArray,
) -> None:
    good_request.query = party.query(films_user, scale_bits=30)

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.INVALID_ARGUMENT

    good_request.query = party.query(films_user)
    assert_scores_right(stub, party, good_request, films, films_user)


def test_oversized_query_is_exhausted(
    stub: pb_grpc.ScoringServiceStub,
    good_request: pb.ScoreRequest,
    info: pb.GetServerInfoResponse,
) -> None:
    limit = info.limits.max_query_bytes
    assert len(good_request.query) <= limit
    good_request.query = good_request.query + b"\0" * (limit + 1 - len(good_request.query))

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_alive(stub)


def test_query_decompression_bomb_is_exhausted(
    stub: pb_grpc.ScoringServiceStub,
    good_request: pb.ScoreRequest,
    info: pb.GetServerInfoResponse,
) -> None:
    bomb = seal_bomb(info.limits.max_query_bytes * 64, 2, good_request.query)
    assert len(bomb) < info.limits.max_query_bytes
    good_request.query = bomb

    assert code_of(score_error(stub, good_request)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_alive(stub)


# --- the same refusals through the client library ------------------------------------


def test_client_maps_unknown_item_to_not_found(client: Client, user: FloatArray) -> None:
    with pytest.raises(NotFoundError) as info:
        client.score(user, catalog="books", item_ids=["books-0", "no-such-item"])

    assert not isinstance(info.value, grpc.RpcError)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-item" in str(info.value)


def test_client_maps_unknown_catalog_to_not_found(client: Client, user: FloatArray) -> None:
    with pytest.raises(NotFoundError) as info:
        client.score(user, catalog="no-such-catalog")

    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_client_maps_repeated_ids_to_invalid_request(client: Client, user: FloatArray) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.score(user, catalog="books", item_ids=["books-3", "books-3"])

    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_client_maps_too_many_ids_to_limit_exceeded(
    client: Client, user: FloatArray, info: pb.GetServerInfoResponse
) -> None:
    too_many = [f"books-{i}" for i in range(info.limits.max_item_ids + 1)]

    with pytest.raises(LimitExceededError) as raised:
        client.score(user, catalog="books", item_ids=too_many)

    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert np.abs(client.score(user, catalog="books", item_ids=too_many[:2])).max() > 0


def test_client_errors_are_heserve_errors_not_rpc_errors(client: Client, user: FloatArray) -> None:
    with pytest.raises(HeserveError) as info:
        client.score(user, catalog="books", item_ids=["books-1", "books-1"])

    assert not isinstance(info.value, grpc.RpcError)


def test_a_restart_with_new_content_is_refused_stale_and_the_client_rescores_once(
    films: Catalog, films_user: FloatArray
) -> None:
    first = start_server(Scorer(DEFAULT_PARAMETERS, [films]), "127.0.0.1", 0)
    port = first.port
    client = Client(f"127.0.0.1:{port}", timeout=TIMEOUT)
    second: RunningServer | None = None
    try:
        before = client.score(films_user, catalog="films")
        assert np.abs(before - films.embeddings @ films_user).max() < 1e-4
        first.stop(grace=None)

        changed = Catalog("films", unit_rows(films.item_count, films.dimension, 3), films.ids)
        assert changed.version != films.version
        second = start_server(Scorer(DEFAULT_PARAMETERS, [changed]), "127.0.0.1", port)

        # On the wire: the old version is refused, with the reason a client acts on.
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            list(
                pb_grpc.ScoringServiceStub(channel).Score(
                    pb.ScoreRequest(
                        key_id="k", catalog="films", query=b"q", catalog_version=films.version
                    ),
                    timeout=TIMEOUT,
                )
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _reason(refused.value) == CATALOG_VERSION_CHANGED

        # The client re-reads the catalog and scores once more, under the new version
        # (keys are re-registered on the way: the restart forgot them).
        after = client.score(films_user, catalog="films")
        assert np.abs(after - changed.embeddings @ films_user).max() < 1e-4
        assert client.stats.catalog_refreshes == 1
        assert client.stats.registrations == 2
    finally:
        client.close()
        first.stop(grace=None)
        if second is not None:
            second.stop(grace=None)
