"""heserve.protocol.convert: the values client and server exchange, to messages and back."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import BOOKS_DIMENSION, BOOKS_ITEMS
from google.protobuf.message import Message

from heserve import __version__
from heserve.domain.catalog import Catalog
from heserve.domain.scorer import KeyRetentionPolicy, Scorer, SizeLimits
from heserve.protocol import convert
from heserve.protocol.convert import CatalogInfo
from heserve.protocol.params import (
    DEFAULT_PARAMETERS,
    PRESETS,
    CkksParameters,
    InsecureParametersError,
)
from heserve.transport.servicer import ScoringServicer
from heserve.v1 import scoring_pb2 as pb
from heserve_client import Client


def _unset_fields(message: Message) -> list[str]:
    """Fields of `message` (and of its message fields) left at their defaults."""
    unset = []
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if isinstance(value, Message):
            unset += [f"{field.name}.{name}" for name in _unset_fields(value)]
        elif not value:
            unset.append(field.name)
    return unset


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameters_round_trip_with_what_the_server_adds(preset: str) -> None:
    params = PRESETS[preset]
    message = convert.parameters_to_message(params, galois_steps=(0, 1, -64), preset=preset)

    assert convert.parameters_from_message(message) == params
    assert list(message.galois_steps) == [0, 1, -64]
    assert message.preset == preset
    assert message.slot_count == params.slot_count == params.poly_modulus_degree // 2
    assert message.security_bits == 128
    assert isinstance(convert.parameters_from_message(message).coeff_modulus_bits, tuple)


def test_parameters_from_a_message_are_validated() -> None:
    weak = pb.CkksParameters(poly_modulus_degree=4096, coeff_modulus_bits=[60, 60], scale_bits=40)
    with pytest.raises(InsecureParametersError, match="128-bit security"):
        convert.parameters_from_message(weak)


def test_catalog_info_round_trips() -> None:
    info = CatalogInfo(
        name="books",
        version="3f1c",
        dimension=100,
        item_count=5_000,
        padded_dimension=128,
        items_per_response=4096,
    )
    message = convert.catalog_info_to_message(info)

    assert _unset_fields(message) == []
    assert convert.catalog_info_from_message(message) == info


def test_limits_and_retention_round_trip_by_field_name() -> None:
    limits = SizeLimits(max_message_bytes=5 << 20, max_item_ids=17, max_page_size=9)
    retention = KeyRetentionPolicy(ttl_seconds=60, max_keys=3, max_bytes=1 << 25)

    limits_message = convert.to_message(pb.SizeLimits, limits, max_query_bytes=12345)
    retention_message = convert.to_message(pb.KeyRetentionPolicy, retention)

    assert convert.from_message(SizeLimits, limits_message) == limits
    assert limits_message.max_query_bytes == 12345
    assert convert.from_message(KeyRetentionPolicy, retention_message) == retention


def test_a_value_field_the_message_lacks_is_refused() -> None:
    @dataclass(frozen=True)
    class Renamed:
        max_messages: int = 1

    with pytest.raises(ValueError, match='no "max_messages" field'):
        convert.to_message(pb.SizeLimits, Renamed())


def test_server_info_fills_every_field(scorer: Scorer) -> None:
    message = ScoringServicer(scorer).server_info()

    # max_queries_per_request: 0 says "1" (a server that scores one query per request)
    assert set(_unset_fields(message)) <= {"limits.max_queries_per_request"}
    assert message.server_version == __version__
    assert convert.from_message(SizeLimits, message.limits) == scorer.limits
    assert message.limits.max_query_bytes == scorer.max_query_bytes
    assert convert.from_message(KeyRetentionPolicy, message.key_retention) == scorer.retention
    assert convert.parameters_from_message(message.ckks) == scorer.params
    assert tuple(message.ckks.galois_steps) == scorer.galois_steps


def test_the_client_reads_what_the_server_announces(
    scorer: Scorer, client: Client, books: Catalog, films: Catalog
) -> None:
    """Both ends of the wire, through a real server on loopback."""
    slots = DEFAULT_PARAMETERS.slot_count
    assert client.params == scorer.params == DEFAULT_PARAMETERS
    assert client.catalogs() == [
        CatalogInfo("books", books.version, BOOKS_DIMENSION, BOOKS_ITEMS, 128, slots),
        CatalogInfo("films", films.version, 32, 300, 32, slots),
    ]


def test_custom_parameters_round_trip() -> None:
    params = CkksParameters(
        poly_modulus_degree=8192,
        coeff_modulus_bits=(60, 40, 60),
        scale_bits=40,
        catalog_scale_bits=30,
    )
    message = convert.parameters_to_message(params, galois_steps=[], preset="custom")
    assert convert.parameters_from_message(message) == params
