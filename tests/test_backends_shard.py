"""The shard every backend computes with: a catalog's chunks, keys by key_id, queries as bytes.

Real encryption throughout: a client's SecretContext encrypts and decrypts, and
scores are checked against the plaintext product computed here.
"""

from __future__ import annotations

import numpy as np
import pytest

from heserve.backends.base import shard_chunks
from heserve.backends.shard import Shard, ShardQuery
from heserve.domain.catalog import unit_rows
from heserve.he.engine import Engine, encoded_chunk_bytes
from heserve.he.plan import DiagonalPlan
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import FloatArray, query_slots, unpack_complex
from heserve_client import SecretContext

SLOTS = DEFAULT_PARAMETERS.slot_count
# Three chunks of 2 x 4,096 items; shard 1 of two holds chunk 1 only.
ITEMS, DIMENSION = 4 * SLOTS + 300, 24
PLAN = DiagonalPlan.for_catalog(DIMENSION, ITEMS, SLOTS, 2)
CATALOG = unit_rows(ITEMS, DIMENSION, 31)


@pytest.fixture(scope="module")
def shard() -> Shard:
    """Shard 0 of two: chunks 0 and 2 of the catalog, the first encoded, the second not."""
    shard = Shard(Engine(DEFAULT_PARAMETERS))
    rows = PLAN.chunk_rows(CATALOG, shard_chunks(0, 2, PLAN.chunk_count(ITEMS)))
    budget = encoded_chunk_bytes(DEFAULT_PARAMETERS, PLAN)
    shard.load_catalog("items", PLAN, rows, budget)
    return shard


def _keys(secret: SecretContext) -> bytes:
    return secret.galois_keys([0, *PLAN.rotation_steps])


def _query(secret: SecretContext, vector: FloatArray) -> bytes:
    return secret.encrypt(query_slots(vector, DIMENSION, SLOTS))


def _decrypted(secret: SecretContext, blobs: list[bytes], counts: list[int]) -> FloatArray:
    return np.concatenate(
        [
            unpack_complex(secret.decrypt_complex(blob, 1 << 24), count)
            for blob, count in zip(blobs, counts, strict=True)
        ]
    )


def test_a_query_with_its_keys_scores_the_shards_chunks_in_order(
    shard: Shard, secret: SecretContext
) -> None:
    vector = unit_rows(1, DIMENSION, 32)[0]
    expected = CATALOG @ vector
    per_chunk = PLAN.items_per_chunk

    request = ShardQuery("items", "k1", (_query(secret, vector),), _keys(secret))
    blobs = [per_query[0] for per_query in shard.answer(request)]

    assert len(blobs) == 2  # chunks 0 and 2: one encoded at load, one on the fly
    scores = _decrypted(secret, blobs, [per_chunk, ITEMS - 2 * per_chunk])
    wanted = np.concatenate([expected[:per_chunk], expected[2 * per_chunk :]])
    assert np.abs(scores - wanted).max() < 1e-4


def test_keys_stay_until_forgotten(shard: Shard, secret: SecretContext) -> None:
    vector = unit_rows(1, DIMENSION, 33)[0]
    list(shard.answer(ShardQuery("items", "k2", (_query(secret, vector),), _keys(secret))))
    assert shard.holds_keys("k2") and "k2" in shard.held_keys()

    again = list(shard.answer(ShardQuery("items", "k2", (_query(secret, vector),))))  # no keys sent
    assert len(again) == 2

    shard.forget_keys("k2")
    assert not shard.holds_keys("k2") and "k2" not in shard.held_keys()
    with pytest.raises(KeyError):
        shard.answer(ShardQuery("items", "k2", (_query(secret, vector),)))


def test_given_rows_are_scored_under_the_catalogs_layout(
    shard: Shard, secret: SecretContext
) -> None:
    vector = unit_rows(1, DIMENSION, 34)[0]
    candidates = CATALOG[[7, 3, ITEMS - 1, 1000]]
    query = ShardQuery("items", "k3", (_query(secret, vector),), _keys(secret), rows=(candidates,))

    blobs = [per_query[0] for per_query in shard.answer(query)]

    assert len(blobs) == 1
    scores = _decrypted(secret, blobs, [len(candidates)])
    assert np.abs(scores - candidates @ vector).max() < 1e-4
    assert shard.plan("items") == PLAN and shard.holds_catalog("items")
    assert not shard.holds_catalog("other")
