"""A pool worker process and the messages it exchanges with the front (`pool.py`).

Each message is a small frozen dataclass, one per kind, sent whole over the
worker's pipe. Every reply names the request it answers (`request_id`), so one
reader thread per worker in the front can route replies to concurrent requests.
The worker itself is a `Shard` answering requests in the order they arrive.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from heserve.backends.base import return_freed_memory
from heserve.backends.shard import Shard, ShardQuery
from heserve.he.engine import Engine, Progress, QueryError
from heserve.he.plan import DiagonalPlan
from heserve.protocol import wire
from heserve.protocol.params import CkksParameters
from heserve.protocol.slots import RowArray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    """A request, or a reply to one: replies carry the `request_id` of their request."""

    request_id: int


# --- front → worker ------------------------------------------------------------------


@dataclass(frozen=True)
class LoadShard(Message):
    """Encode a batch of this worker's chunks of a catalog (`rows`: one entry per chunk);
    `first` is the batch's position in the worker's shard (see `Shard.load_catalog`)."""

    catalog: str
    plan: DiagonalPlan
    rows: tuple[RowArray, ...]
    memory_budget: int | None
    first: int = 0


@dataclass(frozen=True)
class DeriveShard(Message):
    """Make this worker's shard of catalog `catalog` from its shard of `base` (see
    `Shard.derive_catalog`): `count` chunks, `changed` the new rows by position."""

    catalog: str
    base: str
    count: int
    changed: tuple[tuple[int, RowArray], ...]
    first: int = 0
    """0 for an update's first message to this worker; its later ones fill in more."""


@dataclass(frozen=True)
class ScoreShard(Message):
    """Score a query; `indices` are the catalog-wide chunk indices of the results."""

    query: ShardQuery
    indices: tuple[int, ...]


@dataclass(frozen=True)
class ForgetKeys:
    key_id: str


@dataclass(frozen=True)
class RemoveCatalog:
    """Drop this worker's chunks of a catalog (a newer version replaced it)."""

    catalog: str


@dataclass(frozen=True)
class Stop:
    pass


ToWorker = LoadShard | DeriveShard | ScoreShard | ForgetKeys | RemoveCatalog | Stop

# --- worker → front ------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkScored(Message):
    """The score ciphertexts of chunk `index` (catalog-wide) of a ScoreShard, one per query."""

    index: int
    scores: tuple[bytes, ...]


@dataclass(frozen=True)
class ChunkEncoded(Message):
    """One more chunk of a LoadShard encoded: the front sums the workers' progress."""


@dataclass(frozen=True)
class Failed(Message):
    """The request failed: `caller_fault` (a query this engine cannot score, bytes that
    do not load) becomes a QueryError in the front, anything else a ShardFaultError."""

    reason: str
    caller_fault: bool = True


@dataclass(frozen=True)
class Done(Message):
    """The request is complete (or, for a cancelled query, given up)."""


Reply = ChunkScored | ChunkEncoded | Failed | Done


_PR_SET_NAME = 15  # prctl(2): the calling thread's name, which /proc/PID/comm shows
_COMM_BYTES = 15  # the kernel keeps 15 bytes of it


def name_process(name: str) -> None:
    """Name this process in /proc/PID/comm, which `ps -e`, `top` and `pgrep` show, so an
    operator tells a worker from any other Python. The multiprocessing name names it
    inside Python; the command line stays the interpreter's (rewriting argv in place
    needs setproctitle). Linux only; elsewhere, nothing."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:_COMM_BYTES]), 0, 0, 0)


def resident_bytes(pid: int) -> int | None:
    """The resident memory of process `pid` on this machine (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return None
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


def _progress_to(conn: Connection, request_id: int) -> Progress:
    return lambda done, total: conn.send(ChunkEncoded(request_id))


CANCELLED_SLOTS = 64
"""Queries the front gave up on that a worker remembers (a ring shared with the front):
enough that a burst of hang-ups cannot push one out before the worker sees it."""

CancelledRing = Any
"""multiprocessing's RawArray of CANCELLED_SLOTS c_int64 (its type is made at run time)."""


def serve_worker(
    conn: Connection, params: CkksParameters, cancelled: CancelledRing, name: str = ""
) -> None:
    """A worker's loop: keep a shard, answer requests in order, until Stop or EOF.

    `cancelled`, a ring shared with the front, holds the ids of the last queries the
    front gave up on (their callers hung up or ran out of time): the worker stops any
    of them at its next chunk. `name` is what the process shows in `ps` (see
    `name_process`).
    """
    if name:
        name_process(name)
    shard = Shard(Engine(params))
    while True:
        try:
            message: ToWorker = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(message, Stop):
            return
        if isinstance(message, ForgetKeys):
            shard.forget_keys(message.key_id)
            continue
        if isinstance(message, RemoveCatalog):
            shard.remove_catalog(message.catalog)
            return_freed_memory()
            continue
        try:
            _serve(shard, conn, message, cancelled)
        except (QueryError, wire.SerializationError) as exc:
            conn.send(Failed(message.request_id, str(exc)))
        except Exception as exc:  # a fault of this worker, not of the request: say so
            log.exception("worker failed request %d", message.request_id)
            conn.send(Failed(message.request_id, f"{type(exc).__name__}: {exc}", False))
        else:
            conn.send(Done(message.request_id))


def _serve(
    shard: Shard,
    conn: Connection,
    message: LoadShard | DeriveShard | ScoreShard,
    cancelled: CancelledRing,
) -> None:
    """Carry out one request, sending its progress or results as they come."""
    request_id = message.request_id
    if isinstance(message, DeriveShard):
        shard.derive_catalog(
            message.catalog, message.base, message.count, dict(message.changed), message.first > 0
        )
        return_freed_memory()
        return
    if isinstance(message, LoadShard):
        progress = _progress_to(conn, request_id)
        shard.load_catalog(
            message.catalog,
            message.plan,
            message.rows,
            message.memory_budget,
            progress,
            message.first,
        )
        return_freed_memory()
        return
    for index, scores in zip(message.indices, shard.answer(message.query), strict=True):
        conn.send(ChunkScored(request_id, index, tuple(scores)))
        if request_id in cancelled[:]:
            return
