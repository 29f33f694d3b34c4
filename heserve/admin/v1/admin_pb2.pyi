from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CatalogChangeOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CATALOG_CHANGE_OUTCOME_UNSPECIFIED: _ClassVar[CatalogChangeOutcome]
    CATALOG_CHANGE_OUTCOME_UPDATED: _ClassVar[CatalogChangeOutcome]
    CATALOG_CHANGE_OUTCOME_REPLACED: _ClassVar[CatalogChangeOutcome]
    CATALOG_CHANGE_OUTCOME_UNCHANGED: _ClassVar[CatalogChangeOutcome]
    CATALOG_CHANGE_OUTCOME_FAILED: _ClassVar[CatalogChangeOutcome]
CATALOG_CHANGE_OUTCOME_UNSPECIFIED: CatalogChangeOutcome
CATALOG_CHANGE_OUTCOME_UPDATED: CatalogChangeOutcome
CATALOG_CHANGE_OUTCOME_REPLACED: CatalogChangeOutcome
CATALOG_CHANGE_OUTCOME_UNCHANGED: CatalogChangeOutcome
CATALOG_CHANGE_OUTCOME_FAILED: CatalogChangeOutcome

class ListCatalogsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCatalogsResponse(_message.Message):
    __slots__ = ("catalogs",)
    CATALOGS_FIELD_NUMBER: _ClassVar[int]
    catalogs: _containers.RepeatedCompositeFieldContainer[CatalogState]
    def __init__(self, catalogs: _Optional[_Iterable[_Union[CatalogState, _Mapping]]] = ...) -> None: ...

class CatalogState(_message.Message):
    __slots__ = ("catalog", "version", "item_count", "dimension", "chunk_count", "updates_since_source")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    UPDATES_SINCE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    version: str
    item_count: int
    dimension: int
    chunk_count: int
    updates_since_source: int
    def __init__(self, catalog: _Optional[str] = ..., version: _Optional[str] = ..., item_count: _Optional[int] = ..., dimension: _Optional[int] = ..., chunk_count: _Optional[int] = ..., updates_since_source: _Optional[int] = ...) -> None: ...

class ReloadCatalogsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadCatalogsResponse(_message.Message):
    __slots__ = ("changes",)
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[CatalogChange]
    def __init__(self, changes: _Optional[_Iterable[_Union[CatalogChange, _Mapping]]] = ...) -> None: ...

class UpdateItemsRequest(_message.Message):
    __slots__ = ("catalog", "upserts", "delete_ids", "if_version")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    UPSERTS_FIELD_NUMBER: _ClassVar[int]
    DELETE_IDS_FIELD_NUMBER: _ClassVar[int]
    IF_VERSION_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    upserts: _containers.RepeatedCompositeFieldContainer[Item]
    delete_ids: _containers.RepeatedScalarFieldContainer[str]
    if_version: str
    def __init__(self, catalog: _Optional[str] = ..., upserts: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., delete_ids: _Optional[_Iterable[str]] = ..., if_version: _Optional[str] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("id", "embedding", "popularity")
    ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    POPULARITY_FIELD_NUMBER: _ClassVar[int]
    id: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    popularity: float
    def __init__(self, id: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ..., popularity: _Optional[float] = ...) -> None: ...

class UpdateItemsResponse(_message.Message):
    __slots__ = ("change",)
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    change: CatalogChange
    def __init__(self, change: _Optional[_Union[CatalogChange, _Mapping]] = ...) -> None: ...

class CatalogChange(_message.Message):
    __slots__ = ("catalog", "outcome", "version", "previous_version", "item_count", "upserted", "deleted", "chunks_rewritten", "chunk_count", "seconds", "error", "updates_dropped")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_REWRITTEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    UPDATES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    outcome: CatalogChangeOutcome
    version: str
    previous_version: str
    item_count: int
    upserted: int
    deleted: int
    chunks_rewritten: int
    chunk_count: int
    seconds: float
    error: str
    updates_dropped: int
    def __init__(self, catalog: _Optional[str] = ..., outcome: _Optional[_Union[CatalogChangeOutcome, str]] = ..., version: _Optional[str] = ..., previous_version: _Optional[str] = ..., item_count: _Optional[int] = ..., upserted: _Optional[int] = ..., deleted: _Optional[int] = ..., chunks_rewritten: _Optional[int] = ..., chunk_count: _Optional[int] = ..., seconds: _Optional[float] = ..., error: _Optional[str] = ..., updates_dropped: _Optional[int] = ...) -> None: ...
