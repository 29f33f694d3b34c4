"""Issue 10, finding 2 at the service: one caller cannot evict another's keys by
re-compressing one key set, nor by registering many, through a real server with tokens."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import grpc
import pytest
import zstandard
from conftest import TIMEOUT, key_chunks, serving

from heserve.domain.catalog import Catalog
from heserve.domain.scorer import KeyRetentionPolicy, Scorer
from heserve.protocol import wire
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.transport.auth import Authenticator
from heserve.transport.server import RunningServer
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import SecretContext

ALICE, MALLORY = "alice-token-0123456789abcdef", "mallory-token-0123456789abcd"


@pytest.fixture(scope="module")
def guarded(films: Catalog) -> Iterator[RunningServer]:
    authenticator = Authenticator([("alice", ALICE), ("mallory", MALLORY)])
    # max_keys 8: two key sets per caller
    scorer = Scorer(DEFAULT_PARAMETERS, [films], retention=KeyRetentionPolicy(max_keys=8))
    with serving(scorer, authenticator=authenticator) as running:
        yield running


def _register(server: RunningServer, token: str, blob: bytes) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        metadata = (("authorization", f"Bearer {token}"),)
        reply = stub.RegisterKeys(key_chunks(blob), timeout=TIMEOUT, metadata=metadata)
        return str(reply.key_id)


def _recompressed(blob: bytes, level: int, kind: str) -> bytes:
    """The same key set under another compression: what a client may legitimately send."""
    raw = wire.galois_keys_to_wire(blob)  # compression mode none
    body = raw[16:]
    if kind == "zstd":
        packed = zstandard.ZstdCompressor(level=level).compress(body)
        mode = 2
    else:
        packed = zlib.compress(body, level)
        mode = 1
    header = bytearray(raw[:16])
    header[5] = mode
    header[8:16] = (16 + len(packed)).to_bytes(8, "little")
    return bytes(header) + packed


def test_one_key_set_recompressed_is_one_entry(guarded: RunningServer) -> None:
    secret = SecretContext(DEFAULT_PARAMETERS)
    blob = secret.galois_keys([0, 1, 8])
    ids = {
        _register(guarded, MALLORY, variant)
        for variant in (
            blob,
            wire.galois_keys_to_wire(blob),
            _recompressed(blob, 1, "zstd"),
            _recompressed(blob, 19, "zstd"),
            _recompressed(blob, 6, "zlib"),
        )
    }
    assert len(ids) == 1


def test_a_flood_of_key_sets_evicts_the_flooders_own_never_the_victims(
    guarded: RunningServer,
) -> None:
    victim = _register(guarded, ALICE, SecretContext(DEFAULT_PARAMETERS).galois_keys([0, 1, 8]))
    flood = [
        _register(guarded, MALLORY, SecretContext(DEFAULT_PARAMETERS).galois_keys([0, 1, 8]))
        for _ in range(5)
    ]
    assert len(set(flood)) == 5
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        alice = (("authorization", f"Bearer {ALICE}"),)
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT, metadata=alice)
        assert info.key_retention.max_keys_per_caller == 2
        # alice's keys are still there: deleting them finds them
        reply = stub.DeleteKeys(
            pb.DeleteKeysRequest(key_id=victim),
            timeout=TIMEOUT,
            metadata=alice,
        )
        assert reply.deleted
