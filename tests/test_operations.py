"""Operating a server: metrics scraped over HTTP, request ids in metadata and logs,
deadlines, the concurrency bound and message sizes, against real servers on loopback.
Settings (flags, environment, config file) are tested in test_ops_config.py.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any, cast

import grpc
import numpy as np
import pytest
from conftest import make_catalog
from prometheus_client.parser import text_string_to_metric_families

from heserve.backends.base import Backend
from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer, SizeLimits
from heserve.ops.logs import JsonFormatter, KeyValueFormatter
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import query_slots
from heserve.transport.auth import Authenticator
from heserve.transport.server import RunningServer, start_server
from heserve.transport.servicer import ScoringServicer
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import Client, SecretContext, ServerUnavailableError

TIMEOUT = 60.0
SLOTS = DEFAULT_PARAMETERS.slot_count


@pytest.fixture(scope="module")
def shop() -> Catalog:
    return make_catalog("shop", 600, 16, seed=51)


@pytest.fixture(scope="module")
def wide() -> Catalog:
    """Three output ciphertexts' worth of items (2S per chunk): five with real scores."""
    return make_catalog("wide", 4 * SLOTS + 100, 8, seed=52)


@pytest.fixture
def user() -> np.ndarray:
    vector: np.ndarray = unit_rows(1, 16, seed=53)[0]
    return vector


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at http://127.0.0.1:port/metrics, by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _rpc(method: str, **labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted({"service": "heserve.v1.ScoringService", "method": method, **labels}.items())
    )


# --- metrics -------------------------------------------------------------------------


def test_metrics_over_http_count_requests_errors_latency_items_keys_and_bytes(
    servers: list[RunningServer], shop: Catalog, user: np.ndarray
) -> None:
    scorer = Scorer(DEFAULT_PARAMETERS, [shop])
    server = start_server(scorer, "127.0.0.1", 0, metrics_port=0, max_concurrent_rpcs=10)
    servers.append(server)
    assert server.metrics_port is not None
    target = f"127.0.0.1:{server.port}"

    client = Client(target, rerank_locally=False)  # the server's re-ranking is counted
    client.score(user, catalog="shop")
    client.score(user, catalog="shop", item_ids=["shop-5", "shop-1", "shop-9"])
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                stub.ListItems(pb.ListItemsRequest(catalog="nope"), timeout=TIMEOUT)

    during = _scrape(server.metrics_port)
    client.close()
    after = _scrape(server.metrics_port)

    assert during[("heserve_requests_total", _rpc("Score"))] == 2
    assert during[("heserve_requests_total", _rpc("RegisterKeys"))] == 1
    assert during[("heserve_requests_total", _rpc("ListItems"))] == 2
    assert during[("heserve_request_errors_total", _rpc("ListItems", code="NOT_FOUND"))] == 2
    assert ("heserve_request_errors_total", _rpc("Score", code="NOT_FOUND")) not in during
    assert during[("heserve_request_duration_seconds_count", _rpc("Score"))] == 2
    assert during[("heserve_request_duration_seconds_sum", _rpc("Score"))] > 0
    assert during[("heserve_request_duration_seconds_bucket", _rpc("Score", le="+Inf"))] == 2
    assert during[("heserve_items_scored_total", (("catalog", "shop"),))] == shop.item_count + 3
    assert during[("heserve_keys_held", ())] == 1
    assert during[("heserve_key_store_bytes", ())] > client.stats.key_bytes_sent
    received = during[("heserve_received_bytes_total", _rpc("RegisterKeys"))]
    assert received >= client.stats.key_bytes_sent
    assert during[("heserve_received_bytes_total", _rpc("Score"))] >= client.stats.query_bytes_sent
    assert during[("heserve_sent_bytes_total", _rpc("Score"))] >= (
        client.stats.score_bytes_received
    )
    assert during[("heserve_requests_in_flight", ())] == 0
    assert during[("heserve_max_concurrent_rpcs", ())] == 10
    assert ("heserve_build_info", (("preset", "precise"), ("version", "0.1.0"))) in during

    assert after[("heserve_keys_held", ())] == 0  # close() erased the keys
    assert after[("heserve_requests_total", _rpc("DeleteKeys"))] == 1


# --- request ids and logs ------------------------------------------------------------------


def test_request_ids_are_echoed_and_tag_every_log_line_of_the_call(
    servers: list[RunningServer], shop: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(Scorer(DEFAULT_PARAMETERS, [shop]), "127.0.0.1", 0)
    servers.append(server)
    target = f"127.0.0.1:{server.port}"
    caplog.set_level(logging.DEBUG, logger="heserve")
    json_lines, kv_lines = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(json_lines), logging.StreamHandler(kv_lines)]
    handlers[0].setFormatter(JsonFormatter())
    handlers[1].setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ScoringServiceStub(channel)
            _, call = stub.GetServerInfo.with_call(
                pb.GetServerInfoRequest(),
                timeout=TIMEOUT,
                metadata=(("x-request-id", "checkout-42"),),
            )
            assert ("x-request-id", "checkout-42") in call.initial_metadata()
            _, call = stub.ListCatalogs.with_call(pb.ListCatalogsRequest(), timeout=TIMEOUT)
            generated = dict(call.initial_metadata())["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", generated)
            # not a sane id (spaces, too long): replaced, so logs stay one token per field
            _, call = stub.ListCatalogs.with_call(
                pb.ListCatalogsRequest(), timeout=TIMEOUT, metadata=(("x-request-id", "a b"),)
            )
            assert re.fullmatch(r"[0-9a-f]{32}", dict(call.initial_metadata())["x-request-id"])
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListItems(
                    pb.ListItemsRequest(catalog="nope"),
                    timeout=TIMEOUT,
                    metadata=(("x-request-id", "refused-7"),),
                )
            error = refused.value
            assert isinstance(error, grpc.Call)
            assert ("x-request-id", "refused-7") in error.initial_metadata()

        with Client(target) as client:
            client.register_keys()
            registered = client.last_request_id
    finally:
        for handler in handlers:
            root.removeHandler(handler)

    access = {
        record.fields["request_id"]: record.fields
        for record in caplog.records
        if record.name == "heserve.access" and "code" in getattr(record, "fields", {})
    }
    assert access["checkout-42"]["method"] == "GetServerInfo"
    assert access["checkout-42"]["code"] == "OK"
    assert access[generated]["method"] == "ListCatalogs"
    assert access["refused-7"]["code"] == "NOT_FOUND"
    assert access[registered]["method"] == "RegisterKeys"

    records = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    scoring = [
        r for r in records if r["logger"] == "heserve.domain.scorer" and "registered" in r["msg"]
    ]
    assert [r["request_id"] for r in scoring] == [registered]  # not an access line: via the call
    refused_line = next(r for r in records if r.get("request_id") == "refused-7" and "code" in r)
    assert refused_line["level"] == "INFO" and refused_line["code"] == "NOT_FOUND"
    assert any(
        line.startswith("ts=") and "request_id=refused-7" in line and "code=NOT_FOUND" in line
        for line in kv_lines.getvalue().splitlines()
    )


# --- deadlines ----------------------------------------------------------------------------


class _Context:
    """A ServicerContext whose deadline passes after `responses` checks between responses
    (the servicer's first look, which hands the deadline to the backends, is not one)."""

    def __init__(self, responses: int) -> None:
        self.checks = -1
        self.responses = responses

    def time_remaining(self) -> float:
        self.checks += 1
        return 10.0 if self.checks <= self.responses else 0.0

    def is_active(self) -> bool:
        return True

    def abort_with_status(self, status: Any) -> None:
        raise AssertionError(f"unexpected abort {status}")


def _counting(monkeypatch: pytest.MonkeyPatch, backend: Backend, produced: list[int]) -> None:
    """Count the score ciphertexts the backend computes."""
    score = backend.score

    def counted(*args: Any) -> Iterator[list[bytes]]:
        for blob in score(*args):
            produced.append(1)
            yield blob

    monkeypatch.setattr(backend, "score", counted)


def _query(party: SecretContext, vector: np.ndarray) -> bytes:
    return party.encrypt(query_slots(vector, vector.shape[0], SLOTS))


@pytest.mark.parametrize(
    ("complex_scores", "responses", "total"),
    # complex scores: one response per computed chunk. Real scores: two responses per
    # chunk (the second needs no computing), so the deadline checked before the third
    # response is passed as the second chunk has just been computed.
    [(True, 1, 3), (False, 2, 5)],
    ids=["complex", "real"],
)
def test_score_stops_computing_when_the_deadline_passes(
    wide: Catalog,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    complex_scores: bool,
    responses: int,
    total: int,
) -> None:
    scorer = Scorer(DEFAULT_PARAMETERS, [wide])
    produced: list[int] = []
    _counting(monkeypatch, scorer.backend, produced)
    party = SecretContext(DEFAULT_PARAMETERS)
    key_id = scorer.register_keys(party.galois_keys(list(scorer.galois_steps)))
    request = pb.ScoreRequest(
        key_id=key_id,
        catalog="wide",
        query=_query(party, unit_rows(1, 8, 54)[0]),
        complex_scores=complex_scores,
    )
    caplog.set_level(logging.INFO, logger="heserve")

    context = cast(grpc.ServicerContext, _Context(responses=responses))
    replies = list(ScoringServicer(scorer).Score(request, context))

    assert [reply.chunk_index for reply in replies] == list(range(responses))
    assert {reply.chunk_count for reply in replies} == {total}
    assert len(produced) == 2  # the second was computed as the deadline passed; no third
    assert f"Score past its deadline after {responses} of {total} responses" in caplog.text


def test_a_real_deadline_ends_a_slow_score_on_the_server(
    servers: list[RunningServer],
    wide: Catalog,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scorer = Scorer(DEFAULT_PARAMETERS, [wide])
    produced: list[int] = []
    _counting(monkeypatch, scorer.backend, produced)
    score = scorer.backend.score

    def slow(*args: Any) -> Iterator[list[bytes]]:
        for blob in score(*args):
            time.sleep(0.6)  # each ciphertext takes 0.6 s more than it does
            yield blob

    monkeypatch.setattr(scorer.backend, "score", slow)
    server = start_server(scorer, "127.0.0.1", 0, metrics_port=0)
    servers.append(server)
    caplog.set_level(logging.INFO, logger="heserve")

    with Client(f"127.0.0.1:{server.port}") as client:
        client.register_keys()
        client.timeout = 1.0
        with pytest.raises(ServerUnavailableError) as late:
            client.score(unit_rows(1, 8, 55)[0], catalog="wide")
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        client.timeout = TIMEOUT

    deadline = time.monotonic() + 10
    while "past its deadline" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(r"Score past its deadline after [012] of 3 responses", caplog.text)
    assert len(produced) < 3
    assert server.metrics_port is not None
    samples = _scrape(server.metrics_port)
    assert samples[("heserve_request_errors_total", _rpc("Score", code="DEADLINE_EXCEEDED"))] == 1


# --- concurrency and sizes ------------------------------------------------------------------


def test_calls_past_max_concurrent_rpcs_are_resource_exhausted(
    servers: list[RunningServer], shop: Catalog
) -> None:
    server = start_server(Scorer(DEFAULT_PARAMETERS, [shop]), "127.0.0.1", 0, max_concurrent_rpcs=1)
    servers.append(server)
    release = threading.Event()

    def held_open() -> Iterator[pb.RegisterKeysRequest]:
        # One empty chunk gets the call onto the server (a stream that has sent
        # nothing may not have started there yet); then nothing until released.
        yield pb.RegisterKeysRequest()
        release.wait(TIMEOUT)

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        busy = stub.RegisterKeys.future(held_open(), timeout=TIMEOUT)
        # Let the held call take the only slot before any probe can compete for it.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and not busy.done():
            time.sleep(0.05)
        assert not busy.done(), "the held call was refused or ended early"

        def info_code() -> grpc.StatusCode:
            try:
                stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT)
            except grpc.RpcError as error:
                assert isinstance(error, grpc.Call)
                return error.code()
            return grpc.StatusCode.OK

        registry = server.metrics.registry
        deadline = time.monotonic() + 10
        while (
            registry.get_sample_value("heserve_requests_in_flight") != 1
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)  # until the server runs the held call (probing earlier would race it)
        assert not busy.done()
        assert info_code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        release.set()
        with pytest.raises(grpc.RpcError):
            busy.result(timeout=TIMEOUT)  # no key bytes: INVALID_ARGUMENT
        # Served again once the slot is free. One OK is the proof: a probe right after
        # another can still find the slot held by the one before, whose end gRPC
        # counts a moment after its answer (seen on a fresh CI machine).
        deadline = time.monotonic() + 10
        code = info_code()
        while code != grpc.StatusCode.OK and time.monotonic() < deadline:
            time.sleep(0.05)
            code = info_code()
        assert code == grpc.StatusCode.OK


def test_message_limits_are_enforced_reported_and_followed_by_the_client(
    servers: list[RunningServer], shop: Catalog
) -> None:
    small = start_server(
        Scorer(DEFAULT_PARAMETERS, [shop], limits=SizeLimits(max_message_bytes=3 << 20)),
        "127.0.0.1",
        0,
    )
    large = start_server(
        Scorer(DEFAULT_PARAMETERS, [shop], limits=SizeLimits(max_message_bytes=40 << 20)),
        "127.0.0.1",
        0,
    )
    servers += [small, large]

    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{small.port}", options=options) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT)
        assert info.limits.max_message_bytes == 3 << 20
        with pytest.raises(grpc.RpcError) as too_big:
            stub.ListItems(pb.ListItemsRequest(catalog="x" * (3 << 20)), timeout=TIMEOUT)
        error = too_big.value
        assert isinstance(error, grpc.Call)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.ListCatalogs(pb.ListCatalogsRequest(), timeout=TIMEOUT).catalogs

    with Client(f"127.0.0.1:{small.port}") as client:
        assert client.max_message_bytes >= client.server_info.limits.max_message_bytes
    with Client(f"127.0.0.1:{large.port}") as client:
        assert client.max_message_bytes == 40 << 20  # reopened to take the server's limit
        assert client.item_ids("shop")[:2] == ["shop-0", "shop-1"]


def test_the_client_sends_its_token_and_a_deadline_on_every_call(
    servers: list[RunningServer], shop: Catalog, user: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    token = "t" * 8 + "0123456789abcdef"
    server = start_server(
        Scorer(DEFAULT_PARAMETERS, [shop]),
        "127.0.0.1",
        0,
        authenticator=Authenticator([("svc", token)]),
    )
    servers.append(server)
    caplog.set_level(logging.INFO, logger="heserve.access")

    with Client(f"127.0.0.1:{server.port}", token=token, timeout=45) as client:
        client.recommend(user, catalog="shop", k=2)

    lines: list[dict[str, Any]] = [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if "code" in getattr(r, "fields", {})
    ]
    methods = {line["method"] for line in lines}
    assert methods >= {"GetServerInfo", "ListCatalogs", "RegisterKeys", "Score", "ListItems"}
    assert "DeleteKeys" in methods
    for line in lines:
        assert line["caller"] == "svc" and line["code"] == "OK"
        assert 0 < line["deadline_ms"] <= 47_000  # gRPC rounds the wire timeout up
