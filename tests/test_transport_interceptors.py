"""heserve.transport.interceptors, each on its own and composed, through a real gRPC server
on loopback serving a stand-in ScoringService that records what reaches it: which
requests were parsed, which behaviours ran, and the CallInfo they saw."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from heserve.domain.scorer import Scorer
from heserve.transport import interceptors as policy
from heserve.transport.auth import Authenticator, QueryBudget
from heserve.transport.context import CallInfo, current_call
from heserve.transport.metrics import Metrics
from heserve.transport.server import interceptors
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc

TIMEOUT = 30.0
SERVICE = "heserve.v1.ScoringService"
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
HEX_ID = re.compile(r"[0-9a-f]{32}")
SCORE_BOOKS = pb.ScoreRequest(catalog="books", query=b"q" * 50)


def _bearer(token: str, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
    metadata = [("authorization", f"Bearer {token}")]
    if request_id is not None:
        metadata.append(("x-request-id", request_id))
    return tuple(metadata)


class StandIn:
    """GetServerInfo, RegisterKeys and Score that record what reached them."""

    def __init__(self) -> None:
        self.parsed: list[str] = []  # request messages deserialized, by type
        self.seen: list[CallInfo | None] = []  # the CallInfo each behaviour ran with
        self.lock = threading.Lock()

    def _parser(self, message_type: Any) -> Callable[[bytes], Any]:
        def parse(data: bytes) -> Any:
            with self.lock:
                self.parsed.append(message_type.__name__)
            return message_type.FromString(data)

        return parse

    def _saw(self) -> None:
        with self.lock:
            self.seen.append(current_call())

    def get_server_info(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._saw()
        return pb.GetServerInfoResponse(server_version="stand-in")

    def register_keys(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        self._saw()
        size = sum(len(request.galois_keys_chunk) for request in requests)
        return pb.RegisterKeysResponse(key_id=f"k{size}")

    def score(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._saw()
        if request.catalog == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such catalog")
        for index in range(3):
            yield pb.ScoreResponse(scores=b"s" * 100, offset=10 * index, count=10)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        def out(message: Any) -> bytes:
            data: bytes = message.SerializeToString()
            return data

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetServerInfo": grpc.unary_unary_rpc_method_handler(
                    self.get_server_info, self._parser(pb.GetServerInfoRequest), out
                ),
                "RegisterKeys": grpc.stream_unary_rpc_method_handler(
                    self.register_keys, self._parser(pb.RegisterKeysRequest), out
                ),
                "Score": grpc.unary_stream_rpc_method_handler(
                    self.score, self._parser(pb.ScoreRequest), out
                ),
            },
        )


@contextmanager
def serving(
    *chain: policy.ServerInterceptor, stand_in: StandIn | None = None
) -> Iterator[tuple[StandIn, pb_grpc.ScoringServiceStub, grpc.Channel]]:
    """A server on a free loopback port with `chain` (outermost first) before `stand_in`,
    and a stub and channel to it."""
    stand_in = stand_in or StandIn()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=list(chain))
    server.add_generic_rpc_handlers((stand_in.handler(),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield stand_in, pb_grpc.ScoringServiceStub(channel), channel
    finally:
        server.stop(None).wait()


def _refused(call: Callable[[], Any]) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert isinstance(error, grpc.Call)
    return error


def _check_health(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT
    )
    status: int = reply.status
    return status


def _key_chunks() -> Iterator[pb.RegisterKeysRequest]:
    return iter([pb.RegisterKeysRequest(galois_keys_chunk=b"k" * 1000)] * 3)


@pytest.fixture
def alice_and_bob() -> Authenticator:
    return Authenticator([("alice", ALICE), ("bob", BOB)])


# --- request id ---------------------------------------------------------------------------


def test_a_request_id_is_echoed_generated_or_replaced_and_bound_for_the_servicer() -> None:
    with serving(policy.RequestIdInterceptor()) as (stand_in, stub, _):
        ids = []
        for supplied in ("checkout-42", None, "a b", "x" * 129):
            metadata = () if supplied is None else (("x-request-id", supplied),)
            _, call = stub.GetServerInfo.with_call(
                pb.GetServerInfoRequest(), timeout=TIMEOUT, metadata=metadata
            )
            ids.append(dict(call.initial_metadata())["x-request-id"])

    assert ids[0] == "checkout-42"
    assert all(HEX_ID.fullmatch(generated) for generated in ids[1:])  # none, or not sane
    assert len(set(ids)) == 4
    method = f"/{SERVICE}/GetServerInfo"
    # without authentication, everybody is the anonymous caller
    assert [info.request_id if info else None for info in stand_in.seen] == ids
    assert all(info and info.method == method and info.caller for info in stand_in.seen)
    assert {info.caller.name for info in stand_in.seen if info and info.caller} == {"anonymous"}


# --- authentication -------------------------------------------------------------------------


def test_a_call_without_a_known_token_is_unauthenticated_before_its_request_is_parsed(
    alice_and_bob: Authenticator,
) -> None:
    chain = (policy.RequestIdInterceptor(), policy.AuthenticationInterceptor(alice_and_bob))
    with serving(*chain) as (stand_in, stub, channel):
        info = pb.GetServerInfoRequest()
        refusals = [
            _refused(lambda: stub.GetServerInfo(info, timeout=TIMEOUT)),
            _refused(
                lambda: stub.GetServerInfo(
                    info, timeout=TIMEOUT, metadata=_bearer(ALICE + "x", "wrong-1")
                )
            ),
            _refused(lambda: stub.RegisterKeys(_key_chunks(), timeout=TIMEOUT)),
            _refused(
                lambda: list(stub.Score(pb.ScoreRequest(catalog="c", query=b"q"), timeout=TIMEOUT))
            ),
        ]
        assert stand_in.parsed == [] and stand_in.seen == []  # nothing read, nothing ran
        assert _check_health(channel) == health_pb2.HealthCheckResponse.SERVING  # no token

        reply = stub.RegisterKeys(_key_chunks(), timeout=TIMEOUT, metadata=_bearer(BOB))

    assert {error.code() for error in refusals} == {grpc.StatusCode.UNAUTHENTICATED}
    assert "authorization: Bearer" in (refusals[0].details() or "")
    assert ("x-request-id", "wrong-1") in refusals[1].initial_metadata()  # echoed when refused
    assert reply.key_id == "k3000"
    assert stand_in.parsed == ["RegisterKeysRequest"] * 3
    [seen] = stand_in.seen
    assert seen is not None and seen.caller is not None
    assert seen.caller.name == "bob" and seen.caller.owner_tag  # key_ids end in bob's tag


# --- query budget ---------------------------------------------------------------------------


def test_score_past_the_budget_is_resource_exhausted_per_caller_and_nothing_else_is_charged(
    alice_and_bob: Authenticator,
) -> None:
    budget = QueryBudget(2, window_seconds=3600)
    chain = (
        policy.RequestIdInterceptor(),
        policy.AuthenticationInterceptor(alice_and_bob),
        policy.QueryBudgetInterceptor(budget),
    )
    request = pb.ScoreRequest(catalog="c", query=b"q")
    with serving(*chain) as (stand_in, stub, channel):
        for _ in range(3):  # not charged: not Score
            stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT, metadata=_bearer(ALICE))
            _check_health(channel)
        # without a token: refused by authentication, and charged to nobody
        for _ in range(3):
            error = _refused(lambda: list(stub.Score(request, timeout=TIMEOUT)))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        for _ in range(2):
            assert len(list(stub.Score(request, timeout=TIMEOUT, metadata=_bearer(ALICE)))) == 3
        parsed_before = len(stand_in.parsed)
        spent = _refused(
            lambda: list(stub.Score(request, timeout=TIMEOUT, metadata=_bearer(ALICE)))
        )
        assert len(stand_in.parsed) == parsed_before  # refused before the request was read
        assert len(list(stub.Score(request, timeout=TIMEOUT, metadata=_bearer(BOB)))) == 3

    assert spent.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 Score calls per 3600 s" in (spent.details() or "")
    assert budget.charge("alice") is not None and budget.charge("bob") is None


def test_without_tokens_the_budget_charges_the_anonymous_caller() -> None:
    chain = (policy.RequestIdInterceptor(), policy.QueryBudgetInterceptor(QueryBudget(1)))
    request = pb.ScoreRequest(catalog="c", query=b"q")
    with serving(*chain) as (_, stub, _):
        assert len(list(stub.Score(request, timeout=TIMEOUT))) == 3
        error = _refused(lambda: list(stub.Score(request, timeout=TIMEOUT)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_token_named_anonymous_is_not_charged_for_calls_without_a_token() -> None:
    budget = QueryBudget(1)
    authenticator = Authenticator([("anonymous", ALICE)])
    chain = (policy.RequestIdInterceptor(), policy.AuthenticationInterceptor(authenticator))
    request = pb.ScoreRequest(catalog="c", query=b"q")
    with serving(*chain, policy.QueryBudgetInterceptor(budget)) as (_, stub, _):
        for _ in range(3):
            error = _refused(lambda: list(stub.Score(request, timeout=TIMEOUT)))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len(list(stub.Score(request, timeout=TIMEOUT, metadata=_bearer(ALICE)))) == 3


# --- metrics --------------------------------------------------------------------------------


def _sample(metrics: Metrics, name: str, method: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(
        name, {"service": SERVICE, "method": method, **labels}
    )
    return value or 0.0


def test_metrics_count_every_call_refused_ones_included_but_not_unknown_methods(
    scorer: Scorer, alice_and_bob: Authenticator
) -> None:
    metrics = Metrics(scorer)
    chain = (
        policy.RequestIdInterceptor(),
        policy.MetricsInterceptor(metrics),
        policy.AuthenticationInterceptor(alice_and_bob),
    )
    request = SCORE_BOOKS
    with serving(*chain) as (_, stub, channel):
        for _ in range(2):
            _refused(lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT))
        assert len(list(stub.Score(request, timeout=TIMEOUT, metadata=_bearer(ALICE)))) == 3
        missing = pb.ScoreRequest(catalog="missing")
        _refused(lambda: list(stub.Score(missing, timeout=TIMEOUT, metadata=_bearer(ALICE))))
        stub.RegisterKeys(_key_chunks(), timeout=TIMEOUT, metadata=_bearer(ALICE))
        unknown = channel.unary_unary(f"/{SERVICE}/Nonexistent", None, None)
        for metadata in ((), _bearer(ALICE)):  # UNIMPLEMENTED, with a token or without
            error = _refused(lambda: unknown(b"", timeout=TIMEOUT, metadata=metadata))  # noqa: B023
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED

    assert _sample(metrics, "heserve_requests_total", "GetServerInfo") == 2
    assert (
        _sample(metrics, "heserve_request_errors_total", "GetServerInfo", code="UNAUTHENTICATED")
        == 2
    )
    assert _sample(metrics, "heserve_requests_total", "Score") == 2
    assert _sample(metrics, "heserve_request_errors_total", "Score", code="NOT_FOUND") == 1
    assert _sample(metrics, "heserve_request_duration_seconds_count", "Score") == 2
    received = request.ByteSize() + missing.ByteSize()
    assert _sample(metrics, "heserve_received_bytes_total", "Score") == received
    responses = [pb.ScoreResponse(scores=b"s" * 100, offset=10 * i, count=10) for i in range(3)]
    sent = sum(response.ByteSize() for response in responses)
    assert _sample(metrics, "heserve_sent_bytes_total", "Score") == sent
    assert _sample(metrics, "heserve_received_bytes_total", "RegisterKeys") == 3 * (
        pb.RegisterKeysRequest(galois_keys_chunk=b"k" * 1000).ByteSize()
    )
    assert (
        metrics.registry.get_sample_value("heserve_items_scored_total", {"catalog": "books"}) == 30
    )
    assert metrics.registry.get_sample_value("heserve_requests_in_flight") == 0
    assert _sample(metrics, "heserve_requests_total", "Nonexistent") == 0  # no label made


# --- access log -----------------------------------------------------------------------------


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, dict[str, Any]]]:
    return [
        (record.levelno, record.fields)  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == "heserve.access" and "code" in getattr(record, "fields", {})
    ]


def test_the_access_log_has_one_line_per_call_with_sizes_codes_and_the_caller(
    alice_and_bob: Authenticator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="heserve.access")
    budget = QueryBudget(1)
    chain = (
        policy.RequestIdInterceptor(),
        policy.AccessLogInterceptor(),
        policy.AuthenticationInterceptor(alice_and_bob),
        policy.QueryBudgetInterceptor(budget),
    )
    request = SCORE_BOOKS
    with serving(*chain) as (_, stub, channel):
        _check_health(channel)
        list(stub.Score(request, timeout=TIMEOUT, metadata=_bearer(ALICE, "score-1")))
        _refused(lambda: list(stub.Score(request, timeout=TIMEOUT, metadata=_bearer(ALICE, "s-2"))))
        _refused(
            lambda: stub.GetServerInfo(
                pb.GetServerInfoRequest(), metadata=(("x-request-id", "nobody-3"),)
            )
        )

    lines = _access_lines(caplog)
    assert len(lines) == 4
    (health_level, health_line), *calls = lines
    assert health_level == logging.DEBUG  # a successful health check is quiet
    assert (health_line["service"], health_line["code"]) == ("grpc.health.v1.Health", "OK")
    by_id = {fields["request_id"]: (level, fields) for level, fields in calls}
    level, scored = by_id["score-1"]
    assert level == logging.INFO
    assert scored["method"] == "Score" and scored["code"] == "OK"
    assert scored["caller"] == "alice"
    assert scored["bytes_in"] == request.ByteSize()
    assert scored["bytes_out"] > 300  # three responses of 100 score bytes
    assert (scored["catalog"], scored["queries"]) == ("books", 1)  # names and counts only
    assert scored["items"] == 30  # the stand-in's three responses of 10 items each
    assert abs(scored["deadline_ms"] - TIMEOUT * 1000) < 1000  # gRPC adds a little slack
    assert scored["duration_ms"] >= 0
    assert by_id["s-2"][1]["code"] == "RESOURCE_EXHAUSTED"
    assert by_id["s-2"][1]["caller"] == "alice" and by_id["s-2"][1]["bytes_in"] == 0
    assert by_id["nobody-3"][1]["code"] == "UNAUTHENTICATED"
    assert by_id["nobody-3"][1]["caller"] == "anonymous"
    assert by_id["nobody-3"][1]["deadline_ms"] is None  # no deadline was set
    started = [r for r in caplog.records if r.name == "heserve.access" and "started" in r.msg]
    assert {r.fields["caller"] for r in started} >= {"alice", "anonymous"}  # type: ignore[attr-defined]
    assert ALICE not in caplog.text and "q" * 50 not in caplog.text


# --- metadata size ----------------------------------------------------------------------------


def test_a_call_with_too_much_metadata_is_refused_unread_uncharged_and_logged(
    alice_and_bob: Authenticator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="heserve.access")
    budget = QueryBudget(1)
    chain = (
        policy.RequestIdInterceptor(),
        policy.AccessLogInterceptor(),
        policy.MetadataLimitInterceptor(max_bytes=2048),
        policy.AuthenticationInterceptor(alice_and_bob),
        policy.QueryBudgetInterceptor(budget),
    )
    padding = (("x-padding", "p" * 3000),)  # within gRPC's own limits, past this one
    with serving(*chain) as (stand_in, stub, channel):
        oversized = _bearer(ALICE, "big-1") + padding
        info = pb.GetServerInfoRequest()
        refused = [
            _refused(lambda: list(stub.Score(SCORE_BOOKS, timeout=TIMEOUT, metadata=oversized))),
            _refused(lambda: stub.GetServerInfo(info, timeout=TIMEOUT, metadata=oversized)),
            _refused(
                lambda: health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=TIMEOUT, metadata=padding
                )
            ),
        ]
        assert stand_in.parsed == [] and stand_in.seen == []  # nothing read, nothing ran
        # alice's one Score of the budget was not spent by the refused call
        assert len(list(stub.Score(SCORE_BOOKS, timeout=TIMEOUT, metadata=_bearer(ALICE)))) == 3

    assert [error.code() for error in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert "metadata larger than 2048 bytes" in (refused[0].details() or "")
    assert ("x-request-id", "big-1") in refused[0].initial_metadata()
    lines = {fields["request_id"]: fields for _, fields in _access_lines(caplog)}
    assert lines["big-1"]["code"] == "RESOURCE_EXHAUSTED"
    assert lines["big-1"]["caller"] == "anonymous"  # nobody is known from refused metadata
    assert "p" * 100 not in caplog.text and ALICE not in caplog.text


def test_metadata_is_counted_as_http2_counts_a_header_list() -> None:
    class Details(grpc.HandlerCallDetails):
        method = "/m"
        invocation_metadata = (("a", "bc"), ("authorization", "x" * 10))

    assert policy.metadata_bytes(Details()) == (1 + 2 + 32) + (13 + 10 + 32)


# --- composed -------------------------------------------------------------------------------


def test_the_server_composes_them_request_id_first_and_refusals_last(
    scorer: Scorer, alice_and_bob: Authenticator
) -> None:
    metrics = Metrics(scorer)
    chain = interceptors(metrics, alice_and_bob, QueryBudget(5))
    assert [type(interceptor) for interceptor in chain] == [
        policy.RequestIdInterceptor,
        policy.AccessLogInterceptor,
        policy.MetricsInterceptor,
        policy.MetadataLimitInterceptor,
        policy.AuthenticationInterceptor,
        policy.QueryBudgetInterceptor,
    ]
    assert [type(i) for i in interceptors(metrics)] == [
        policy.RequestIdInterceptor,
        policy.AccessLogInterceptor,
        policy.MetricsInterceptor,
        policy.MetadataLimitInterceptor,
    ]


def test_a_client_that_hangs_up_mid_stream_stops_the_behaviour_and_is_cancelled(
    scorer: Scorer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="heserve.access")
    metrics = Metrics(scorer)
    stopped = threading.Event()
    release = threading.Event()
    logged = threading.Event()

    class Ended(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "code" in getattr(record, "fields", {}):
                logged.set()

    ended = Ended()
    logging.getLogger("heserve.access").addHandler(ended)

    class Endless(StandIn):
        def score(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield pb.ScoreResponse(count=1)
                release.wait(TIMEOUT)  # until the client has gone
                while True:
                    yield pb.ScoreResponse(count=1)
            finally:
                stopped.set()

    chain = (
        policy.RequestIdInterceptor(),
        policy.AccessLogInterceptor(),
        policy.MetricsInterceptor(metrics),
    )
    try:
        with serving(*chain, stand_in=Endless()) as (_, stub, _):
            call = stub.Score(pb.ScoreRequest(catalog="c"), timeout=TIMEOUT)
            next(call)
            call.cancel()
            release.set()
            assert stopped.wait(TIMEOUT)
            assert logged.wait(TIMEOUT)
    finally:
        logging.getLogger("heserve.access").removeHandler(ended)

    assert [fields["code"] for _, fields in _access_lines(caplog)] == ["CANCELLED"]
    assert _sample(metrics, "heserve_request_errors_total", "Score", code="CANCELLED") == 1
    assert metrics.registry.get_sample_value("heserve_requests_in_flight") == 0
