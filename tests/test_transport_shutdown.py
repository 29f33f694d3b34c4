"""Shutting down with a call in flight (issue 12, finding 5): the call the grace period
cuts is logged as the shutdown's doing, not the client's, the server says when it has
stopped, and the client is told to retry (UNAVAILABLE)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import TIMEOUT, make_catalog, register_keys

from heserve.domain.catalog import unit_rows
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import query_slots
from heserve.transport.server import start_server
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import SecretContext


def test_a_call_cut_by_the_shutdown_is_logged_as_the_servers_doing(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="heserve")
    films = make_catalog("films", 3 * DEFAULT_PARAMETERS.poly_modulus_degree, 8, seed=72)
    scorer = Scorer(DEFAULT_PARAMETERS, [films])  # three chunks: results after the stop
    first_sent, stopped = threading.Event(), threading.Event()
    score = scorer.backend.score

    def held(*args: Any) -> Iterator[list[bytes]]:
        """A score that cannot finish before the server stops."""
        for number, results in enumerate(score(*args)):
            if number == 1:
                first_sent.set()
                stopped.wait(TIMEOUT)
            yield results

    monkeypatch.setattr(scorer.backend, "score", held)
    server = start_server(scorer, "127.0.0.1", 0)
    secret = SecretContext(DEFAULT_PARAMETERS)
    outcome: list[grpc.StatusCode] = []
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        steps = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT).ckks.galois_steps
        key_id = register_keys(stub, secret.galois_keys(list(steps)))
        query = secret.encrypt(
            query_slots(unit_rows(1, films.dimension, 71)[0], films.dimension, 4096)
        )
        request = pb.ScoreRequest(
            key_id=key_id, catalog="films", query=query, more_queries=[query], complex_scores=True
        )

        def call() -> None:
            try:
                list(stub.Score(request, timeout=TIMEOUT))
                outcome.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                outcome.append(error.code())

        caller = threading.Thread(target=call)
        caller.start()
        assert first_sent.wait(TIMEOUT)
        server.stop(grace=0.1)
        stopped.set()
        caller.join(TIMEOUT)

    assert outcome == [grpc.StatusCode.UNAVAILABLE]  # retry: another server, or this one back
    deadline = time.monotonic() + TIMEOUT
    while "Score UNAVAILABLE" not in caplog.text:  # the access line, after the handler's end
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.01)
    assert "cancelled by the client" not in caplog.text
    assert "Score UNAVAILABLE" in caplog.text and "Score CANCELLED" not in caplog.text
    assert "heserve stopped in" in caplog.text


def test_a_second_server_on_a_port_in_use_is_refused() -> None:
    """gRPC's default SO_REUSEPORT would let it start and split the clients between the
    two servers at random."""
    scorer = Scorer(DEFAULT_PARAMETERS, [make_catalog("films", 50, 8, seed=73)])
    first = start_server(scorer, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match="in use"):
            start_server(scorer, "127.0.0.1", first.port)
    finally:
        first.stop(grace=None)
