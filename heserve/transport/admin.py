"""gRPC transport of the CatalogAdminService (heserve.admin.v1): the operator's write path.

Like heserve.transport.servicer, this layer only translates: an UpdateItems request to
`Scorer.update_items`, a ReloadCatalogs call to the server's reload (the one SIGHUP
runs), each `CatalogChange` to its message, and `ServiceError`s to statuses (the same
decorator as the ScoringService's). Before it allocates the rows it bounds what the
message holds: the number of items, each id's length, each embedding's length (the
catalog's dimension). Who may call it is decided before the request is read
(heserve.transport.interceptors.AdminAuthenticationInterceptor); the servicer checks
again that the caller is an admin, so that it is never served to anyone else even if
it were registered without that interceptor. Each change is logged by the domain
(one line: catalog, outcome, versions, counts, seconds; never ids nor embeddings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import cast

import grpc
import numpy as np

from heserve.admin.v1 import admin_pb2 as admin_pb
from heserve.admin.v1 import admin_pb2_grpc as admin_grpc
from heserve.domain.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
)
from heserve.domain.scorer import CatalogChange, Scorer
from heserve.transport.auth import ADMIN_PREFIX, UnauthenticatedError
from heserve.transport.context import current_caller
from heserve.transport.servicer import abort_on_service_error, call_deadline

ADMIN_SERVICE_NAME = admin_pb.DESCRIPTOR.services_by_name["CatalogAdminService"].full_name


_OUTCOME_PREFIX = "CATALOG_CHANGE_OUTCOME_"


def change_outcome(name: str) -> admin_pb.CatalogChangeOutcome:
    """The CatalogChangeOutcome of an outcome's name ("updated" →
    CATALOG_CHANGE_OUTCOME_UPDATED): the proto's enum is the one list of outcomes."""
    try:
        value = admin_pb.CatalogChangeOutcome.Value(_OUTCOME_PREFIX + name.upper())
        return cast("admin_pb.CatalogChangeOutcome", value)  # the stubs say int
    except ValueError:
        return admin_pb.CATALOG_CHANGE_OUTCOME_UNSPECIFIED


def change_outcome_name(value: int) -> str:
    """An outcome's name ("updated") from its CatalogChangeOutcome value."""
    try:
        return str(admin_pb.CatalogChangeOutcome.Name(value)).removeprefix(_OUTCOME_PREFIX).lower()
    except ValueError:
        return f"outcome {value}"


def change_to_message(change: CatalogChange) -> admin_pb.CatalogChange:
    """A CatalogChange as the admin service answers it: every field by its name, the
    outcome as its enum value."""
    values = {field.name: getattr(change, field.name) for field in fields(change)}
    outcome = change_outcome(values.pop("outcome"))
    return admin_pb.CatalogChange(outcome=outcome, **values)


def _check_admin() -> None:
    """Refuse a caller that is not an admin (the interceptor already has: never act for one)."""
    if not current_caller().name.startswith(ADMIN_PREFIX):
        raise UnauthenticatedError("the admin service needs an admin token")


class CatalogAdminServicer(admin_grpc.CatalogAdminServiceServicer):  # type: ignore[misc]  # untyped stub
    """The heserve.admin.v1.CatalogAdminService over a Scorer; `reload` re-reads the
    catalog sources named at start-up (None: there are none)."""

    def __init__(
        self, scorer: Scorer, reload: Callable[[], Sequence[CatalogChange]] | None
    ) -> None:
        self._scorer = scorer
        self._reload = reload

    @abort_on_service_error
    def ReloadCatalogs(
        self, request: admin_pb.ReloadCatalogsRequest, context: grpc.ServicerContext
    ) -> admin_pb.ReloadCatalogsResponse:
        _check_admin()
        if self._reload is None:
            raise FailedPreconditionError(
                "this server was started without catalog files (it serves the demo "
                "catalog): there is nothing to read again"
            )
        return admin_pb.ReloadCatalogsResponse(
            changes=[change_to_message(change) for change in self._reload()]
        )

    @abort_on_service_error
    def ListCatalogs(
        self, request: admin_pb.ListCatalogsRequest, context: grpc.ServicerContext
    ) -> admin_pb.ListCatalogsResponse:
        _check_admin()
        return admin_pb.ListCatalogsResponse(
            catalogs=[
                admin_pb.CatalogState(
                    catalog=name,
                    version=entry.catalog.version,
                    item_count=entry.catalog.item_count,
                    dimension=entry.catalog.dimension,
                    chunk_count=entry.plan.chunk_count(entry.catalog.item_count),
                    updates_since_source=entry.updates,
                )
                for name, entry in self._scorer.catalogs.items()
            ]
        )

    @abort_on_service_error
    def UpdateItems(
        self, request: admin_pb.UpdateItemsRequest, context: grpc.ServicerContext
    ) -> admin_pb.UpdateItemsResponse:
        _check_admin()
        scorer = self._scorer
        upsert_ids = [item.id for item in request.upserts]
        scorer.bound_update(upsert_ids, request.delete_ids)  # before the rows are made
        dimension = scorer.catalog(request.catalog).catalog.dimension
        for position, item in enumerate(request.upserts):
            if len(item.embedding) != dimension:
                raise InvalidArgumentError(
                    f"upserts[{position}].embedding has {len(item.embedding)} values; catalog "
                    f"{request.catalog!r} has dimension {dimension}"
                )
        with_popularity = sum(item.HasField("popularity") for item in request.upserts)
        if 0 < with_popularity < len(request.upserts):
            raise InvalidArgumentError(
                f"popularity is set on {with_popularity} of {len(request.upserts)} upserts: "
                "set it on all of them or on none"
            )
        rows = np.empty((len(request.upserts), dimension), dtype=np.float32)
        for row, item in zip(rows, request.upserts, strict=True):
            row[:] = item.embedding
        change = scorer.update_items(
            request.catalog,
            upsert_ids,
            rows,
            list(request.delete_ids),
            popularity=[item.popularity for item in request.upserts] if with_popularity else None,
            if_version=request.if_version,
            deadline=call_deadline(context),
        )
        return admin_pb.UpdateItemsResponse(change=change_to_message(change))
