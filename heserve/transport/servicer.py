"""gRPC transport: ScoringService requests in, domain calls, statuses out.

This layer only translates: protobuf messages to domain calls on `Scorer`, and
`ServiceError`s to gRPC status codes with their message. It bounds the streamed
key upload chunk by chunk, before the bytes are joined, checks that a key_id is the
caller's (see heserve.transport.auth), and stops scoring as soon as the call's deadline passes
or the client cancels.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from heserve import __version__
from heserve.domain.errors import InvalidArgumentError, ResourceExhaustedError, ServiceError
from heserve.domain.scorer import Scorer, ServedCatalog
from heserve.domain.statement import Deployment, build_statement
from heserve.protocol import convert
from heserve.protocol.convert import CatalogInfo
from heserve.protocol.reasons import ERROR_DOMAIN
from heserve.transport.auth import check_owner
from heserve.transport.context import current_caller, note_refusal
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ScoringService"].full_name
_DEFAULT_PAGE_SIZE = 1000
_MAX_MESSAGE_CHARS = 1024
# What this server issues as a page token: the offset of the next page, in ASCII digits
# without a leading zero. int() would also take " 5", "+5", "5_0" and full-width digits.
_PAGE_TOKEN = re.compile(r"0|[1-9][0-9]{0,17}")

Handler = TypeVar("Handler", bound=Callable[..., Any])


def abort_on_service_error(handler: Handler) -> Handler:
    """Turn a ServiceError into the matching gRPC status, for unary and streaming handlers."""

    def abort(context: grpc.ServicerContext, exc: ServiceError) -> None:
        message = str(exc)
        if len(message) > _MAX_MESSAGE_CHARS:  # the domain clips what it echoes; in case not
            message = message[:_MAX_MESSAGE_CHARS] + "..."
        log.info("%s refused: %s %s", handler.__name__, exc.status, message)
        note_refusal(exc.reason)
        code = getattr(grpc.StatusCode, exc.status)
        status = status_pb2.Status(code=code.value[0], message=message)
        if exc.reason:
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN))
            status.details.append(detail)
        context.abort_with_status(rpc_status.to_status(status))

    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from handler(self, request, context)
            except ServiceError as exc:
                abort(context, exc)

        return streaming  # type: ignore[return-value]

    @functools.wraps(handler)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return handler(self, request, context)
        except ServiceError as exc:
            abort(context, exc)

    return unary  # type: ignore[return-value]


def _page(token: str, page_size: int, limit: int, total: int) -> tuple[int, int]:
    """Start and end of the page a (token, size) pair names; tokens are offsets."""
    if token and not _PAGE_TOKEN.fullmatch(token):
        raise InvalidArgumentError("page_token is not one this server issued")
    start = int(token) if token else 0
    if not 0 <= start <= total:
        raise InvalidArgumentError("page_token is out of range")
    size = min(page_size or _DEFAULT_PAGE_SIZE, limit)
    return start, min(total, start + size)


def _catalog_info(entry: ServedCatalog) -> CatalogInfo:
    """What ListCatalogs says of a served catalog: its data, and its slot layout's."""
    catalog, plan = entry.catalog, entry.plan
    return CatalogInfo(
        catalog.name,
        catalog.version,
        catalog.dimension,
        catalog.item_count,
        padded_dimension=plan.padded_dimension,
        items_per_response=plan.slot_count,
    )


def call_deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value, None without one."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:  # gRPC reports "none" as centuries
        return None
    return time.monotonic() + remaining


def _past_deadline(context: grpc.ServicerContext) -> bool:
    remaining = context.time_remaining()  # None (no deadline) in some ServicerContexts
    return remaining is not None and remaining <= 0


class ScoringServicer(pb_grpc.ScoringServiceServicer):  # type: ignore[misc]  # untyped stub
    """The heserve.v1.ScoringService, backed by a Scorer; `deployment` is what the
    transport serves with (TLS, tokens, budget, log level), for the privacy statement."""

    def __init__(self, scorer: Scorer, deployment: Deployment | None = None) -> None:
        self._scorer = scorer
        self._deployment = deployment or Deployment()
        self.stopping = threading.Event()
        """Set when the server shuts down: calls it ends are its doing, not the client's."""

    def server_info(self) -> pb.GetServerInfoResponse:
        """Parameters, limits, retention, and the privacy statement built from them now."""
        scorer = self._scorer
        return convert.server_info_to_message(
            server_version=__version__,
            parameters=convert.parameters_to_message(
                scorer.params, galois_steps=scorer.galois_steps, preset=scorer.preset
            ),
            limits=scorer.limits,
            max_query_bytes=scorer.max_query_bytes,
            key_retention=scorer.retention,
            statement=build_statement(scorer, self._deployment),
        )

    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return self.server_info()

    @abort_on_service_error
    def ListCatalogs(
        self, request: pb.ListCatalogsRequest, context: grpc.ServicerContext
    ) -> pb.ListCatalogsResponse:
        entries = list(self._scorer.catalogs.values())
        start, end = _page(
            request.page_token, request.page_size, self._scorer.limits.max_page_size, len(entries)
        )
        return pb.ListCatalogsResponse(
            catalogs=[
                convert.catalog_info_to_message(_catalog_info(entry))
                for entry in entries[start:end]
            ],
            next_page_token=str(end) if end < len(entries) else "",
        )

    @abort_on_service_error
    def ListItems(
        self, request: pb.ListItemsRequest, context: grpc.ServicerContext
    ) -> pb.ListItemsResponse:
        catalog = self._scorer.catalog(request.catalog).catalog
        start, end = _page(
            request.page_token,
            request.page_size,
            self._scorer.limits.max_page_size,
            catalog.item_count,
        )
        return pb.ListItemsResponse(
            item_ids=catalog.ids[start:end],
            next_page_token=str(end) if end < catalog.item_count else "",
            catalog_version=catalog.version,
            popularity=[] if catalog.popularity is None else catalog.popularity[start:end],
        )

    @abort_on_service_error
    def RegisterKeys(
        self, request_iterator: Iterator[pb.RegisterKeysRequest], context: grpc.ServicerContext
    ) -> pb.RegisterKeysResponse:
        limits = self._scorer.limits
        parts: list[bytes] = []
        received = 0
        for request in request_iterator:
            chunk = request.galois_keys_chunk
            if len(chunk) > limits.max_key_chunk_bytes:
                raise InvalidArgumentError(
                    f"a key chunk of {len(chunk)} bytes exceeds {limits.max_key_chunk_bytes}"
                )
            received += len(chunk)
            log.debug("key chunk of %d bytes, %d in all", len(chunk), received)
            if received > limits.max_key_bytes:
                raise ResourceExhaustedError(f"key upload exceeds {limits.max_key_bytes} bytes")
            parts.append(chunk)
        if not context.is_active():
            # The caller hung up: its stream may look complete but is not. Parse
            # and store nothing; the answer goes nowhere.
            log.info("RegisterKeys: the caller hung up after %d bytes; nothing stored", received)
            return pb.RegisterKeysResponse()
        if not received:
            raise InvalidArgumentError("no key bytes were sent")
        key_id = self._scorer.register_keys(b"".join(parts), current_caller().owner_tag)
        return pb.RegisterKeysResponse(
            key_id=key_id, ttl_seconds=self._scorer.retention.ttl_seconds
        )

    @abort_on_service_error
    def DeleteKeys(
        self, request: pb.DeleteKeysRequest, context: grpc.ServicerContext
    ) -> pb.DeleteKeysResponse:
        if not request.key_id:
            raise InvalidArgumentError("key_id is empty")
        check_owner(current_caller(), request.key_id)
        return pb.DeleteKeysResponse(deleted=self._scorer.delete_keys(request.key_id))

    @abort_on_service_error
    def Score(
        self, request: pb.ScoreRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ScoreResponse]:
        if not request.key_id:
            raise InvalidArgumentError("key_id is empty")
        check_owner(current_caller(), request.key_id)
        runs = self._scorer.score(
            request.key_id,
            request.catalog,
            request.query,
            list(request.item_ids),
            request.catalog_version,
            request.complex_scores,
            list(request.more_queries),
            call_deadline(context),
        )
        # Between responses (each computed, or the second half of a split result),
        # look at the call: stop once the client has gone or the deadline passed.
        for run in runs:
            if _past_deadline(context):
                log.info("Score past its deadline after %d of %d responses", run.index, run.total)
                return
            if not context.is_active():
                if self.stopping.is_set():  # the access log and metrics say so too
                    context.set_code(grpc.StatusCode.UNAVAILABLE)
                    log.info("Score ended by the server's shutdown after %d responses", run.index)
                else:
                    log.info("Score cancelled by the client after %d responses", run.index)
                return
            log.debug(
                "Score response %d of %d: %d items, %d bytes",
                run.index + 1,
                run.total,
                run.count,
                len(run.scores),
            )
            yield pb.ScoreResponse(
                scores=run.scores,
                offset=run.offset,
                count=run.count,
                chunk_index=run.index,
                chunk_count=run.total,
                query_index=run.query_index,
            )
