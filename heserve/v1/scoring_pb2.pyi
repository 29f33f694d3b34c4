from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransportSecurity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_SECURITY_UNSPECIFIED: _ClassVar[TransportSecurity]
    TRANSPORT_SECURITY_PLAINTEXT: _ClassVar[TransportSecurity]
    TRANSPORT_SECURITY_TLS: _ClassVar[TransportSecurity]
    TRANSPORT_SECURITY_MUTUAL_TLS: _ClassVar[TransportSecurity]

class CallerIdentity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CALLER_IDENTITY_UNSPECIFIED: _ClassVar[CallerIdentity]
    CALLER_IDENTITY_ANONYMOUS: _ClassVar[CallerIdentity]
    CALLER_IDENTITY_API_TOKEN: _ClassVar[CallerIdentity]
TRANSPORT_SECURITY_UNSPECIFIED: TransportSecurity
TRANSPORT_SECURITY_PLAINTEXT: TransportSecurity
TRANSPORT_SECURITY_TLS: TransportSecurity
TRANSPORT_SECURITY_MUTUAL_TLS: TransportSecurity
CALLER_IDENTITY_UNSPECIFIED: CallerIdentity
CALLER_IDENTITY_ANONYMOUS: CallerIdentity
CALLER_IDENTITY_API_TOKEN: CallerIdentity

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("server_version", "ckks", "limits", "key_retention", "privacy")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CKKS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    KEY_RETENTION_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    ckks: CkksParameters
    limits: SizeLimits
    key_retention: KeyRetentionPolicy
    privacy: PrivacyStatement
    def __init__(self, server_version: _Optional[str] = ..., ckks: _Optional[_Union[CkksParameters, _Mapping]] = ..., limits: _Optional[_Union[SizeLimits, _Mapping]] = ..., key_retention: _Optional[_Union[KeyRetentionPolicy, _Mapping]] = ..., privacy: _Optional[_Union[PrivacyStatement, _Mapping]] = ...) -> None: ...

class PrivacyStatement(_message.Message):
    __slots__ = ("statement_version", "keys", "stored", "logs", "never_logged", "observations", "transport", "caller_identity", "catalog_protections", "summary")
    STATEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    NEVER_LOGGED_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CALLER_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    CATALOG_PROTECTIONS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    statement_version: int
    keys: KeyRetentionPolicy
    stored: _containers.RepeatedCompositeFieldContainer[StoredData]
    logs: _containers.RepeatedCompositeFieldContainer[LoggedRecord]
    never_logged: _containers.RepeatedScalarFieldContainer[str]
    observations: _containers.RepeatedCompositeFieldContainer[Observation]
    transport: TransportSecurity
    caller_identity: CallerIdentity
    catalog_protections: _containers.RepeatedCompositeFieldContainer[CatalogProtection]
    summary: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, statement_version: _Optional[int] = ..., keys: _Optional[_Union[KeyRetentionPolicy, _Mapping]] = ..., stored: _Optional[_Iterable[_Union[StoredData, _Mapping]]] = ..., logs: _Optional[_Iterable[_Union[LoggedRecord, _Mapping]]] = ..., never_logged: _Optional[_Iterable[str]] = ..., observations: _Optional[_Iterable[_Union[Observation, _Mapping]]] = ..., transport: _Optional[_Union[TransportSecurity, str]] = ..., caller_identity: _Optional[_Union[CallerIdentity, str]] = ..., catalog_protections: _Optional[_Iterable[_Union[CatalogProtection, _Mapping]]] = ..., summary: _Optional[_Iterable[str]] = ...) -> None: ...

class StoredData(_message.Message):
    __slots__ = ("subject", "description", "idle_ttl_seconds", "kept_for", "erasable")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KEPT_FOR_FIELD_NUMBER: _ClassVar[int]
    ERASABLE_FIELD_NUMBER: _ClassVar[int]
    subject: str
    description: str
    idle_ttl_seconds: int
    kept_for: str
    erasable: bool
    def __init__(self, subject: _Optional[str] = ..., description: _Optional[str] = ..., idle_ttl_seconds: _Optional[int] = ..., kept_for: _Optional[str] = ..., erasable: _Optional[bool] = ...) -> None: ...

class LoggedRecord(_message.Message):
    __slots__ = ("name", "level", "written", "fields", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    level: str
    written: bool
    fields: _containers.RepeatedScalarFieldContainer[str]
    description: str
    def __init__(self, name: _Optional[str] = ..., level: _Optional[str] = ..., written: _Optional[bool] = ..., fields: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ...) -> None: ...

class Observation(_message.Message):
    __slots__ = ("subject", "description")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    subject: str
    description: str
    def __init__(self, subject: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class CatalogProtection(_message.Message):
    __slots__ = ("name", "enabled", "setting", "holds_against", "does_not_hold_against")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SETTING_FIELD_NUMBER: _ClassVar[int]
    HOLDS_AGAINST_FIELD_NUMBER: _ClassVar[int]
    DOES_NOT_HOLD_AGAINST_FIELD_NUMBER: _ClassVar[int]
    name: str
    enabled: bool
    setting: str
    holds_against: str
    does_not_hold_against: str
    def __init__(self, name: _Optional[str] = ..., enabled: _Optional[bool] = ..., setting: _Optional[str] = ..., holds_against: _Optional[str] = ..., does_not_hold_against: _Optional[str] = ...) -> None: ...

class CkksParameters(_message.Message):
    __slots__ = ("poly_modulus_degree", "coeff_modulus_bits", "scale_bits", "galois_steps", "security_bits", "slot_count", "catalog_scale_bits", "preset")
    POLY_MODULUS_DEGREE_FIELD_NUMBER: _ClassVar[int]
    COEFF_MODULUS_BITS_FIELD_NUMBER: _ClassVar[int]
    SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    GALOIS_STEPS_FIELD_NUMBER: _ClassVar[int]
    SECURITY_BITS_FIELD_NUMBER: _ClassVar[int]
    SLOT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CATALOG_SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    poly_modulus_degree: int
    coeff_modulus_bits: _containers.RepeatedScalarFieldContainer[int]
    scale_bits: int
    galois_steps: _containers.RepeatedScalarFieldContainer[int]
    security_bits: int
    slot_count: int
    catalog_scale_bits: int
    preset: str
    def __init__(self, poly_modulus_degree: _Optional[int] = ..., coeff_modulus_bits: _Optional[_Iterable[int]] = ..., scale_bits: _Optional[int] = ..., galois_steps: _Optional[_Iterable[int]] = ..., security_bits: _Optional[int] = ..., slot_count: _Optional[int] = ..., catalog_scale_bits: _Optional[int] = ..., preset: _Optional[str] = ...) -> None: ...

class SizeLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_key_chunk_bytes", "max_key_bytes", "max_query_bytes", "max_item_ids", "max_page_size", "max_queries_per_request", "max_name_chars", "max_item_id_chars")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_KEY_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_KEY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERIES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_NAME_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEM_ID_CHARS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_key_chunk_bytes: int
    max_key_bytes: int
    max_query_bytes: int
    max_item_ids: int
    max_page_size: int
    max_queries_per_request: int
    max_name_chars: int
    max_item_id_chars: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_key_chunk_bytes: _Optional[int] = ..., max_key_bytes: _Optional[int] = ..., max_query_bytes: _Optional[int] = ..., max_item_ids: _Optional[int] = ..., max_page_size: _Optional[int] = ..., max_queries_per_request: _Optional[int] = ..., max_name_chars: _Optional[int] = ..., max_item_id_chars: _Optional[int] = ...) -> None: ...

class KeyRetentionPolicy(_message.Message):
    __slots__ = ("ttl_seconds", "max_keys", "max_bytes", "max_keys_per_caller")
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_KEYS_PER_CALLER_FIELD_NUMBER: _ClassVar[int]
    ttl_seconds: int
    max_keys: int
    max_bytes: int
    max_keys_per_caller: int
    def __init__(self, ttl_seconds: _Optional[int] = ..., max_keys: _Optional[int] = ..., max_bytes: _Optional[int] = ..., max_keys_per_caller: _Optional[int] = ...) -> None: ...

class ListCatalogsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCatalogsResponse(_message.Message):
    __slots__ = ("catalogs", "next_page_token")
    CATALOGS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    catalogs: _containers.RepeatedCompositeFieldContainer[CatalogInfo]
    next_page_token: str
    def __init__(self, catalogs: _Optional[_Iterable[_Union[CatalogInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CatalogInfo(_message.Message):
    __slots__ = ("name", "version", "dimension", "item_count", "padded_dimension", "items_per_response")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    PADDED_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_PER_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    dimension: int
    item_count: int
    padded_dimension: int
    items_per_response: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., dimension: _Optional[int] = ..., item_count: _Optional[int] = ..., padded_dimension: _Optional[int] = ..., items_per_response: _Optional[int] = ...) -> None: ...

class ListItemsRequest(_message.Message):
    __slots__ = ("catalog", "page_size", "page_token")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    page_size: int
    page_token: str
    def __init__(self, catalog: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListItemsResponse(_message.Message):
    __slots__ = ("item_ids", "next_page_token", "catalog_version", "popularity")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CATALOG_VERSION_FIELD_NUMBER: _ClassVar[int]
    POPULARITY_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    next_page_token: str
    catalog_version: str
    popularity: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., next_page_token: _Optional[str] = ..., catalog_version: _Optional[str] = ..., popularity: _Optional[_Iterable[float]] = ...) -> None: ...

class RegisterKeysRequest(_message.Message):
    __slots__ = ("galois_keys_chunk",)
    GALOIS_KEYS_CHUNK_FIELD_NUMBER: _ClassVar[int]
    galois_keys_chunk: bytes
    def __init__(self, galois_keys_chunk: _Optional[bytes] = ...) -> None: ...

class RegisterKeysResponse(_message.Message):
    __slots__ = ("key_id", "ttl_seconds")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    ttl_seconds: int
    def __init__(self, key_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class DeleteKeysRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class DeleteKeysResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("key_id", "catalog", "query", "item_ids", "catalog_version", "complex_scores", "more_queries")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CATALOG_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPLEX_SCORES_FIELD_NUMBER: _ClassVar[int]
    MORE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    catalog: str
    query: bytes
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    catalog_version: str
    complex_scores: bool
    more_queries: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, key_id: _Optional[str] = ..., catalog: _Optional[str] = ..., query: _Optional[bytes] = ..., item_ids: _Optional[_Iterable[str]] = ..., catalog_version: _Optional[str] = ..., complex_scores: _Optional[bool] = ..., more_queries: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "offset", "count", "chunk_index", "chunk_count", "query_index")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    QUERY_INDEX_FIELD_NUMBER: _ClassVar[int]
    scores: bytes
    offset: int
    count: int
    chunk_index: int
    chunk_count: int
    query_index: int
    def __init__(self, scores: _Optional[bytes] = ..., offset: _Optional[int] = ..., count: _Optional[int] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., query_index: _Optional[int] = ...) -> None: ...
