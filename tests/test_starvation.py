"""Idle and hostile streams cannot starve the server (issue 9, finding 1).

One address opens N half-open RegisterKeys uploads (one chunk, then nothing), N Score
streams it never reads, and N health Watch streams it never reads; meanwhile a health
Check and another caller's recommend (a Score with its keys registered, decrypted)
must each answer within 1 s. Run twice: with the default per-caller limits (most of
the flood is refused at once, RESOURCE_EXHAUSTED) and with limits so high that every
stream is admitted and held (the server holds them without a thread each).

N is 20 here so the file runs in seconds; HESERVE_STARVATION_STREAMS=100 gives the
issue's measurement (figures printed, shown with pytest -s). Real server on loopback,
each party on its own TCP connection (as separate clients would be); the streams are
known to be open from what the server reports (`CallAdmission.wait_held`) and from
the first response each Watch returns, not from sleeps.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import query_slots
from heserve.transport.auth import Authenticator
from heserve.transport.bridge import CallLimits
from heserve.transport.server import RunningServer, start_server
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import Client, SecretContext

STREAMS = int(os.environ.get("HESERVE_STARVATION_STREAMS", "20"))
ANSWER_WITHIN = 1.0
WAIT = 60.0
MALLORY, ALICE = "mallory-" + "m" * 24, "alice-" + "a" * 24
SLOTS = DEFAULT_PARAMETERS.slot_count
# Many responses per Score, so that an unread stream is held at its first write.
CATALOG = Catalog(
    "wide", unit_rows(8 * SLOTS, 8, seed=91), tuple(f"w{i}" for i in range(8 * SLOTS))
)
GENEROUS = CallLimits(max_calls_per_caller=10_000, max_streams_per_caller=10_000)


def _channel(port: int) -> grpc.Channel:
    """A channel on a TCP connection of its own, whose window does not grow by itself
    (so an unread stream stays unread)."""
    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.max_receive_message_length", 64 << 20),
        ],
    )


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


class Flood:
    """Mallory's streams: half-open uploads, unread Scores and unread Watches."""

    def __init__(self, port: int, keys: bytes, key_id: str, query: bytes) -> None:
        self.channels = [_channel(port) for _ in range(3)]
        uploads, scores, watches = self.channels
        self.release = threading.Event()
        self.calls: list[Any] = []
        self.ended: list[grpc.StatusCode] = []  # codes of Mallory's calls that ended
        self.ended_changed = threading.Condition()
        stub = pb_grpc.ScoringServiceStub(uploads)
        for _ in range(STREAMS):
            self.calls.append(
                stub.RegisterKeys.future(
                    self._half_open(keys[: 1 << 16]), metadata=_bearer(MALLORY)
                )
            )
        request = pb.ScoreRequest(key_id=key_id, catalog=CATALOG.name, query=query)
        score_stub = pb_grpc.ScoringServiceStub(scores)
        self.scores = [score_stub.Score(request, metadata=_bearer(MALLORY)) for _ in range(STREAMS)]
        for call in [*self.calls, *self.scores]:
            call.add_done_callback(self._note_end)
        health = health_pb2_grpc.HealthStub(watches)
        self.watches = [
            health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(STREAMS)
        ]

    def _note_end(self, call: Any) -> None:
        with self.ended_changed:
            self.ended.append(call.code())
            self.ended_changed.notify_all()

    def wait_ended(self, count: int) -> list[grpc.StatusCode]:
        """The codes of the first `count` of Mallory's calls to end (waits for them)."""
        with self.ended_changed:
            assert self.ended_changed.wait_for(lambda: len(self.ended) >= count, WAIT)
            return list(self.ended)

    def _half_open(self, chunk: bytes) -> Iterator[pb.RegisterKeysRequest]:
        yield pb.RegisterKeysRequest(galois_keys_chunk=chunk)
        self.release.wait()  # and then nothing, until the test ends

    def first_watch_replies(self) -> list[str]:
        """Each Watch's first answer: SERVING once it is open, or its refusal's code."""
        outcomes = []
        for watch in self.watches:
            try:
                outcomes.append(
                    health_pb2.HealthCheckResponse.ServingStatus.Name(next(watch).status)
                )
            except grpc.RpcError as error:
                outcomes.append(error.code().name)
        return outcomes

    def close(self) -> None:
        self.release.set()
        for call in [*self.calls, *self.scores, *self.watches]:
            call.cancel()
        for channel in self.channels:
            channel.close()


@pytest.fixture(params=["default limits", "generous limits"])
def guarded(request: pytest.FixtureRequest) -> Iterator[tuple[RunningServer, str]]:
    limits = CallLimits() if request.param == "default limits" else GENEROUS
    running = start_server(
        Scorer(DEFAULT_PARAMETERS, [CATALOG]),
        "127.0.0.1",
        0,
        authenticator=Authenticator([("mallory", MALLORY), ("alice", ALICE)]),
        call_limits=limits,
    )
    yield running, str(request.param)
    running.stop(grace=None)


def test_a_flood_from_one_address_leaves_health_and_other_callers_answering(
    guarded: tuple[RunningServer, str],
) -> None:
    running, label = guarded
    admission = running.admission
    assert admission is not None
    limits = admission.limits
    party = SecretContext(DEFAULT_PARAMETERS)
    vector = unit_rows(1, CATALOG.dimension, seed=92)[0]
    query = party.encrypt(query_slots(vector, CATALOG.dimension, SLOTS))

    with _channel(running.port) as setup:
        stub = pb_grpc.ScoringServiceStub(setup)
        steps = list(
            stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=WAIT, metadata=_bearer(MALLORY)
            ).ckks.galois_steps
        )
        keys = party.galois_keys(steps)
        chunks = [
            pb.RegisterKeysRequest(galois_keys_chunk=keys[i : i + (1 << 20)])
            for i in range(0, len(keys), 1 << 20)
        ]
        key_id = stub.RegisterKeys(iter(chunks), timeout=WAIT, metadata=_bearer(MALLORY)).key_id

    alice = Client(f"127.0.0.1:{running.port}", token=ALICE, timeout=WAIT)
    alice.score(vector, catalog=CATALOG.name)  # keys registered before the flood
    flood = Flood(running.port, keys, key_id, query)
    try:
        # What the server holds: Mallory's streams up to the limit, the Watches (no
        # token: counted against the address) up to the limit.
        mallory_streams = min(2 * STREAMS, limits.max_streams_per_caller)
        assert admission.wait_held("caller:mallory", mallory_streams, timeout=WAIT)
        # Every other stream of Mallory's was refused, RESOURCE_EXHAUSTED.
        refused = flood.wait_ended(2 * STREAMS - mallory_streams)
        assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (2 * STREAMS - mallory_streams)
        watches = flood.first_watch_replies()
        assert watches.count("SERVING") == min(STREAMS, limits.max_streams_per_caller)
        assert set(watches) <= {"SERVING", "RESOURCE_EXHAUSTED"}
        assert admission.held("address:127.0.0.1")[1] == watches.count("SERVING")
        if limits is GENEROUS:
            # The Score streams are open and unread: each is blocked on a write.
            for call in flood.scores:
                call.initial_metadata()

        with _channel(running.port) as prober:
            started = time.monotonic()
            status = health_pb2_grpc.HealthStub(prober).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=WAIT
            )
            health_seconds = time.monotonic() - started
        started = time.monotonic()
        scores = alice.score(vector, catalog=CATALOG.name)
        recommend_seconds = time.monotonic() - started
        with _channel(running.port) as other:
            started = time.monotonic()
            pb_grpc.ScoringServiceStub(other).GetServerInfo(
                pb.GetServerInfoRequest(), timeout=WAIT, metadata=_bearer(ALICE)
            )
            info_seconds = time.monotonic() - started

        print(
            json.dumps(
                {
                    "limits": label,
                    "streams_of_each_kind": STREAMS,
                    "held_by_mallory": admission.held("caller:mallory")[1],
                    "watches_held": watches.count("SERVING"),
                    "health_check_s": round(health_seconds, 4),
                    "get_server_info_s": round(info_seconds, 4),
                    "alice_recommend_s": round(recommend_seconds, 4),
                }
            )
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        assert np.abs(scores - CATALOG.embeddings @ vector).max() < 1e-4
        assert health_seconds < ANSWER_WITHIN
        assert info_seconds < ANSWER_WITHIN
        assert recommend_seconds < ANSWER_WITHIN
    finally:
        flood.close()
        alice.close()


def test_a_half_open_upload_is_ended_after_the_idle_limit() -> None:
    """An upload that goes quiet is ended with DEADLINE_EXCEEDED after
    `upload_idle_seconds`, and no longer counts against its caller."""
    running = start_server(
        Scorer(DEFAULT_PARAMETERS, [CATALOG]),
        "127.0.0.1",
        0,
        call_limits=CallLimits(upload_idle_seconds=0.5, upload_total_seconds=30),
    )
    release = threading.Event()

    def half_open() -> Iterator[pb.RegisterKeysRequest]:
        yield pb.RegisterKeysRequest(galois_keys_chunk=b"k" * 100)
        release.wait()

    try:
        with _channel(running.port) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as ended:
                pb_grpc.ScoringServiceStub(channel).RegisterKeys(half_open(), timeout=WAIT)
            elapsed = time.monotonic() - started
        release.set()
        assert isinstance(ended.value, grpc.Call)
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "idle" in (ended.value.details() or "")
        assert 0.5 <= elapsed < 5
        assert running.admission is not None
        assert running.admission.wait_held("address:127.0.0.1", 0, timeout=WAIT, calls=0)
    finally:
        release.set()
        running.stop(grace=None)
