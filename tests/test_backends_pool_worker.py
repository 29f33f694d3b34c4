"""A pool worker's loop, run in this process over a real pipe: what it reports as the
request's fault and as its own, and the ring of queries the front gave up on.
And the front: a query does not wait for a worker being replaced past its deadline."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import numpy as np
import pytest

from heserve.backends.base import ScoreCall, Sealed, ShardUnavailableError
from heserve.backends.pool import PoolBackend
from heserve.backends.pool_worker import (
    CANCELLED_SLOTS,
    ChunkScored,
    Done,
    Failed,
    LoadShard,
    ScoreShard,
    Stop,
    serve_worker,
)
from heserve.backends.shard import ShardQuery
from heserve.domain.catalog import unit_rows
from heserve.he.plan import DiagonalPlan
from heserve.protocol import wire
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import query_slots
from heserve_client import SecretContext

SLOTS = DEFAULT_PARAMETERS.slot_count
DIMENSION = 16
PLAN = DiagonalPlan.for_catalog(DIMENSION, 6 * SLOTS, SLOTS)
ROWS = unit_rows(6 * SLOTS, DIMENSION, 41)  # three chunks


@pytest.fixture
def worker() -> Iterator[tuple[Connection, ctypes.Array[ctypes.c_int64]]]:
    """serve_worker in a thread of this process, a catalog of three chunks loaded."""
    front, back = multiprocessing.Pipe()
    cancelled = (ctypes.c_int64 * CANCELLED_SLOTS)()
    thread = threading.Thread(target=serve_worker, args=(back, DEFAULT_PARAMETERS, cancelled))
    thread.start()
    front.send(LoadShard(1, "items", PLAN, tuple(PLAN.chunk_rows(ROWS)), None))
    while not isinstance(front.recv(), Done):  # its progress, then Done
        pass
    try:
        yield front, cancelled
    finally:
        front.send(Stop())
        thread.join(timeout=60)


def _replies(conn: Connection, request_id: int) -> list[object]:
    replies: list[object] = []
    while not replies or not isinstance(replies[-1], Done | Failed):
        reply = conn.recv()
        if getattr(reply, "request_id", None) == request_id:
            replies.append(reply)
    return replies


def test_a_bad_query_is_the_callers_fault_a_missing_key_the_workers(
    worker: tuple[Connection, ctypes.Array[ctypes.c_int64]], secret: SecretContext
) -> None:
    conn, _ = worker
    conn.send(ScoreShard(2, ShardQuery("items", "k", (b"not a ciphertext",), b"x"), (0,)))
    (refused,) = _replies(conn, 2)
    assert isinstance(refused, Failed) and refused.caller_fault

    query = secret.encrypt(query_slots(ROWS[0], DIMENSION, SLOTS))
    conn.send(ScoreShard(3, ShardQuery("items", "never-sent", (query,)), (0, 1, 2)))
    (fault,) = _replies(conn, 3)  # the front always ships keys first: this is a bug
    assert isinstance(fault, Failed) and not fault.caller_fault
    assert "KeyError" in fault.reason


def test_every_query_in_the_cancelled_ring_stops_at_its_next_chunk(
    worker: tuple[Connection, ctypes.Array[ctypes.c_int64]], secret: SecretContext
) -> None:
    conn, cancelled = worker
    keys = secret.galois_keys([0, *PLAN.rotation_steps])
    query = secret.encrypt(query_slots(ROWS[0], DIMENSION, SLOTS))
    cancelled[0], cancelled[1] = 11, 12  # two hang-ups in a row: neither overwrites the other
    for request_id in (11, 12):
        conn.send(ScoreShard(request_id, ShardQuery("items", "k", (query,), keys), (0, 1, 2)))
        replies = _replies(conn, request_id)
        assert [type(reply) for reply in replies] == [ChunkScored, Done]  # 1 of 3 chunks
        keys = None  # type: ignore[assignment]  # the worker holds them now
    conn.send(ScoreShard(13, ShardQuery("items", "k", (query,)), (0, 1, 2)))
    replies = _replies(conn, 13)
    assert [type(reply) for reply in replies] == [ChunkScored] * 3 + [Done]
    first = replies[0]
    assert isinstance(first, ChunkScored)
    scores = secret.decrypt_complex(first.scores[0], 1 << 24)
    assert np.abs(scores.real[:5] - ROWS[:5] @ ROWS[0]).max() < 1e-4


def test_a_query_does_not_wait_past_its_deadline_for_a_worker_being_replaced(
    secret: SecretContext,
) -> None:
    backend = PoolBackend(DEFAULT_PARAMETERS, workers=2)
    try:
        backend.add_catalog("items", PLAN, ROWS, None)
        keys_blob = secret.galois_keys([0, *PLAN.rotation_steps])
        keys = Sealed(keys_blob, wire.load_galois_keys(backend.engine.context, keys_blob, 1 << 26))
        blob = secret.encrypt(query_slots(ROWS[0], DIMENSION, SLOTS))
        query = Sealed(blob, wire.load_ciphertext(backend.engine.context, blob, 1 << 24))
        victim = backend.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        replaced = time.monotonic() + 60
        while backend.worker_pids()[0] == victim:  # the front has seen the death
            assert time.monotonic() < replaced
            time.sleep(0.01)
        started = time.monotonic()
        call = ScoreCall("items", "k", keys, (query,), deadline=started + 0.05)
        with pytest.raises(ShardUnavailableError, match="being replaced"):
            list(backend.score(call))
        assert time.monotonic() - started < 2.0  # not the 300 s restart_timeout
    finally:
        backend.close()
