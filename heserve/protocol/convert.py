"""Protobuf messages to and from the values client and server exchange, in one place.

The server announces its parameters, size limits, key retention and catalogs as
messages; the client reads them back. Both ends convert here, so a field added to
a message and to its value is converted the same way on both sides.

A value and its message spell their shared fields alike (`SizeLimits.max_page_size`
is `heserve.v1.SizeLimits.max_page_size`), so conversion goes field by field by
name: a value field the message lacks is refused by protobuf ("has no ... field"),
and a message field the value lacks is filled from the keyword arguments or left at
its default. The round trips are tested in tests/test_protocol_convert.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message

from heserve.protocol import privacy
from heserve.protocol.params import CkksParameters
from heserve.v1 import scoring_pb2 as pb

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    Value = TypeVar("Value", bound=DataclassInstance)
else:
    Value = TypeVar("Value")
AnyMessage = TypeVar("AnyMessage", bound=Message)

# CkksParameters refuses anything below 128-bit security (see heserve.protocol.params).
SECURITY_BITS = 128


@dataclass(frozen=True)
class CatalogInfo:
    """What the server says about one catalog (heserve.v1.CatalogInfo)."""

    name: str
    version: str
    """A hash of the embeddings and ids: Score refuses a request made for another."""
    dimension: int
    """The length of the user vector."""
    item_count: int
    padded_dimension: int
    """The dimension rounded up to a power of two; the query repeats the vector padded to it."""
    items_per_response: int
    """Real scores per ScoreResponse (the slot count); complex scores carry twice as many."""


def to_message(message_type: type[AnyMessage], value: DataclassInstance, **more: Any) -> AnyMessage:
    """A `message_type` with `value`'s fields under the same names, and the fields in `more`."""
    return message_type(
        **{field.name: getattr(value, field.name) for field in fields(value)}, **more
    )


def from_message(value_type: type[Value], message: Message) -> Value:
    """A `value_type` built from the message's fields of the same names (repeated: as tuples)."""
    values: dict[str, Any] = {}
    for field in fields(value_type):
        if field.init:
            item = getattr(message, field.name)
            repeated = isinstance(item, Sequence) and not isinstance(item, str | bytes)
            values[field.name] = tuple(item) if repeated else item
    return value_type(**values)


def parameters_to_message(
    params: CkksParameters, *, galois_steps: Sequence[int], preset: str
) -> pb.CkksParameters:
    """The parameters as GetServerInfo announces them, with the rotation steps keys must cover."""
    return to_message(
        pb.CkksParameters,
        params,
        galois_steps=list(galois_steps),
        security_bits=SECURITY_BITS,
        slot_count=params.slot_count,
        preset=preset,
    )


def parameters_from_message(message: pb.CkksParameters) -> CkksParameters:
    """The parameters a server announced (validated: below 128-bit security raises)."""
    return from_message(CkksParameters, message)


def catalog_info_to_message(info: CatalogInfo) -> pb.CatalogInfo:
    return to_message(pb.CatalogInfo, info)


def catalog_info_from_message(message: pb.CatalogInfo) -> CatalogInfo:
    return from_message(CatalogInfo, message)


def server_info_to_message(
    *,
    server_version: str,
    parameters: pb.CkksParameters,
    limits: DataclassInstance,
    max_query_bytes: int,
    key_retention: DataclassInstance,
    statement: privacy.PrivacyStatement | None = None,
) -> pb.GetServerInfoResponse:
    """GetServerInfo's answer: `limits` and `key_retention` are the server's SizeLimits and
    KeyRetentionPolicy (fields named as in the messages); the largest query is derived from
    the parameters, so it is given apart; `statement` is the privacy statement."""
    return pb.GetServerInfoResponse(
        server_version=server_version,
        ckks=parameters,
        limits=to_message(pb.SizeLimits, limits, max_query_bytes=max_query_bytes),
        key_retention=to_message(pb.KeyRetentionPolicy, key_retention),
        privacy=None if statement is None else privacy_to_message(statement),
    )


_TRANSPORT = {
    privacy.UNSPECIFIED: pb.TRANSPORT_SECURITY_UNSPECIFIED,
    privacy.PLAINTEXT: pb.TRANSPORT_SECURITY_PLAINTEXT,
    privacy.TLS: pb.TRANSPORT_SECURITY_TLS,
    privacy.MUTUAL_TLS: pb.TRANSPORT_SECURITY_MUTUAL_TLS,
}
_CALLER_IDENTITY = {
    privacy.UNSPECIFIED: pb.CALLER_IDENTITY_UNSPECIFIED,
    privacy.ANONYMOUS: pb.CALLER_IDENTITY_ANONYMOUS,
    privacy.API_TOKEN: pb.CALLER_IDENTITY_API_TOKEN,
}


def privacy_to_message(statement: privacy.PrivacyStatement) -> pb.PrivacyStatement:
    """The statement as GetServerInfo announces it."""
    return pb.PrivacyStatement(
        statement_version=statement.statement_version,
        keys=to_message(pb.KeyRetentionPolicy, statement.keys),
        stored=[to_message(pb.StoredData, item) for item in statement.stored],
        logs=[to_message(pb.LoggedRecord, record) for record in statement.logs],
        never_logged=list(statement.never_logged),
        observations=[to_message(pb.Observation, item) for item in statement.observations],
        transport=_TRANSPORT[statement.transport],
        caller_identity=_CALLER_IDENTITY[statement.caller_identity],
        catalog_protections=[
            to_message(pb.CatalogProtection, item) for item in statement.catalog_protections
        ],
        summary=list(statement.summary),
    )


def privacy_from_message(
    message: pb.GetServerInfoResponse,
) -> privacy.PrivacyStatement | None:
    """The statement a server announced in GetServerInfo; None if it announced none (a
    server before statements). Enum values this client does not know read as
    UNSPECIFIED, which no requirement accepts."""
    if not message.HasField("privacy"):
        return None
    statement = message.privacy
    transports = {number: name for name, number in _TRANSPORT.items()}
    identities = {number: name for name, number in _CALLER_IDENTITY.items()}
    return privacy.PrivacyStatement(
        statement_version=statement.statement_version,
        keys=from_message(privacy.KeysKept, statement.keys),
        stored=tuple(from_message(privacy.StoredData, item) for item in statement.stored),
        logs=tuple(from_message(privacy.LoggedRecord, record) for record in statement.logs),
        never_logged=tuple(statement.never_logged),
        observations=tuple(
            from_message(privacy.Observation, item) for item in statement.observations
        ),
        transport=transports.get(statement.transport, privacy.UNSPECIFIED),
        caller_identity=identities.get(statement.caller_identity, privacy.UNSPECIFIED),
        catalog_protections=tuple(
            from_message(privacy.CatalogProtection, item) for item in statement.catalog_protections
        ),
        summary=tuple(statement.summary),
    )
