"""A process pool backend: each worker holds one shard of every catalog.

`tenseal.sealapi` holds the GIL, so using more than one core takes processes.
Shard w of a catalog is its chunks w, w + W, w + 2W, ... (round robin), so all
workers produce in step and the front streams results in catalog order with
little buffering. Each worker encodes its shard once and keeps it; Galois keys
reach a worker once per key_id and are dropped when the key store drops them.

Workers are spawned (not forked) so that no gRPC state is copied into them. Each
request is a tagged message on the worker's pipe; a reader thread per worker
routes replies to the queue of the request they answer, so concurrent queries
interleave in the workers instead of waiting for each other in the front.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import tenseal.sealapi as seal

from heserve.backends.base import Sealed, ShardBudget, ShardUnavailableError, shard_chunks
from heserve.he.engine import Chunk, Engine, Progress, QueryError
from heserve.he.plan import DiagonalPlan
from heserve.protocol import wire
from heserve.protocol.params import CkksParameters
from heserve.protocol.slots import FloatArray

log = logging.getLogger(__name__)

_UNBOUNDED = 1 << 62


def _progress_to(conn: Connection, request_id: int) -> Progress:
    """Report each encoded chunk to the front, which sums the workers' progress."""
    return lambda done, total: conn.send(("progress", request_id, 1))


def _serve_worker(conn: Connection, params: CkksParameters, cancelled: ctypes.c_int64) -> None:
    """A worker's loop: keep shards and keys, answer tagged requests in order.

    `cancelled`, shared with the front, names the last query the front gave up on
    (its caller hung up or ran out of time): the worker stops it at the next chunk.
    """
    engine = Engine(params)
    shards: dict[str, tuple[DiagonalPlan, list[int], list[Chunk]]] = {}
    keys: dict[str, seal.GaloisKeys] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind, request_id = message[0], message[1]
        try:
            if kind == "catalog":
                _, _, name, plan, indices, rows, budget = message
                chunks = engine.encode_chunks(plan, rows, budget, _progress_to(conn, request_id))
                shards[name] = (plan, indices, chunks)
                conn.send(("done", request_id))
            elif kind == "score":
                _, _, name, key_id, keys_blob, query_blob, max_bytes = message
                if keys_blob is not None:
                    keys[key_id] = wire.load_galois_keys(engine.context, keys_blob, _UNBOUNDED)
                plan, indices, chunks = shards[name]
                query = wire.load_ciphertext(engine.context, query_blob, max_bytes)
                results = engine.score(plan, chunks, query, keys[key_id])
                for index, scores in zip(indices, results, strict=True):
                    conn.send(("chunk", request_id, index, wire.to_bytes(scores)))
                    if cancelled.value == request_id:
                        break
                conn.send(("done", request_id))
            elif kind == "forget":
                keys.pop(message[2], None)
            elif kind == "stop":
                return
        except (QueryError, wire.SerializationError, KeyError, ValueError) as exc:
            conn.send(("error", request_id, f"{type(exc).__name__}: {exc}"))


@dataclass
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    cancelled: ctypes.c_int64
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    keys_held: set[str] = field(default_factory=set)
    alive: bool = True
    ready: threading.Event = field(default_factory=threading.Event)

    def send(self, message: tuple[Any, ...]) -> None:
        with self.send_lock:
            self.conn.send(message)


@dataclass(frozen=True)
class _CatalogSpec:
    """What a worker needs to rebuild its shard of a catalog after a restart."""

    name: str
    plan: DiagonalPlan
    embeddings: FloatArray
    budget: int | None


class PoolBackend:
    """Catalog shards in `workers` processes (default: one per core).

    A worker that dies fails the requests it held (ShardUnavailableError, which
    the service maps to UNAVAILABLE) and is replaced at once: the new process
    re-encodes its shards, and queries wait for it (up to `restart_timeout`).
    """

    def __init__(
        self,
        params: CkksParameters,
        workers: int | None = None,
        memory_budget: int | None = None,
        restart_timeout: float = 300.0,
    ) -> None:
        self.params = params
        self.shard_count = workers or os.cpu_count() or 1
        self._budget = ShardBudget(memory_budget, self.shard_count)
        self.restart_timeout = restart_timeout
        self.restarts = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, queue.SimpleQueue[tuple[Any, ...]]] = {}
        self._pending_lock = threading.Lock()
        self._catalogs: dict[str, int] = {}
        self._specs: list[_CatalogSpec] = []
        self._closing = False
        self._context = multiprocessing.get_context("spawn")
        self._workers = [self._spawn(index) for index in range(self.shard_count)]
        for worker in self._workers:
            worker.ready.set()

    def _spawn(self, index: int) -> _Worker:
        front, back = self._context.Pipe()
        cancelled = self._context.RawValue(ctypes.c_int64, 0)
        process = self._context.Process(
            target=_serve_worker,
            args=(back, self.params, cancelled),
            name=f"heserve-worker-{index}",
            daemon=True,
        )
        process.start()
        back.close()
        worker = _Worker(index, process, front, cancelled)
        threading.Thread(
            target=self._route, args=(worker,), name=f"heserve-route-{index}", daemon=True
        ).start()
        return worker

    def _route(self, worker: _Worker) -> None:
        """Deliver each reply of one worker to the request it answers; replace it if it dies."""
        while True:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                break
            with self._pending_lock:
                target = self._pending.get(message[1])
            if target is not None:  # None: an abandoned request; drop its results
                target.put(message)
        worker.alive = False
        worker.ready.clear()
        with self._pending_lock:
            waiting = list(self._pending.values())
        for target in waiting:
            target.put(("crashed", 0, worker.process.name))
        if not self._closing:
            self._replace(worker)

    def _replace(self, dead: _Worker) -> None:
        log.warning(
            "worker %s died (exit code %s); replacing it", dead.process.name, dead.process.exitcode
        )
        dead.process.join(timeout=5)
        dead.conn.close()
        worker = self._spawn(dead.index)
        self._workers[dead.index] = worker
        try:
            for spec in self._specs:
                self._load_shards(spec, [worker], None)
        except ShardUnavailableError:
            return  # the replacement died too; its own route thread replaces it
        self.restarts += 1
        worker.ready.set()
        log.warning("worker %s replaced and ready", worker.process.name)

    def _open(self) -> tuple[int, queue.SimpleQueue[tuple[Any, ...]]]:
        request_id = next(self._ids)
        replies: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        with self._pending_lock:
            self._pending[request_id] = replies
        return request_id, replies

    def _close(self, request_id: int) -> None:
        with self._pending_lock:
            self._pending.pop(request_id, None)

    def _next_reply(self, replies: queue.SimpleQueue[tuple[Any, ...]]) -> tuple[Any, ...]:
        message = replies.get()
        if message[0] == "crashed":
            raise ShardUnavailableError(f"worker {message[2]} died during the request")
        if message[0] == "error":
            raise QueryError(message[2])
        return message

    def _load_shards(
        self, spec: _CatalogSpec, workers: list[_Worker], progress: Progress | None
    ) -> None:
        """Have each of `workers` encode its shard of a catalog; wait until all are done."""
        total = spec.plan.chunk_count(len(spec.embeddings))
        request_id, replies = self._open()
        try:
            for worker in workers:
                indices = shard_chunks(worker.index, self.shard_count, total)
                rows = spec.plan.chunk_rows(spec.embeddings, indices)
                worker.send(
                    ("catalog", request_id, spec.name, spec.plan, indices, rows, spec.budget)
                )
            done = finished = 0
            while finished < len(workers):
                if self._next_reply(replies)[0] == "progress":
                    done += 1
                    if progress is not None:
                        progress(done, total)
                else:
                    finished += 1
        finally:
            self._close(request_id)

    def add_catalog(
        self, name: str, plan: DiagonalPlan, embeddings: FloatArray, progress: Progress | None
    ) -> None:
        total = plan.chunk_count(len(embeddings))
        budget = self._budget.take(self.params, plan, -(-total // self.shard_count))
        spec = _CatalogSpec(name, plan, embeddings, budget)
        self._load_shards(spec, self._workers, progress)
        self._specs.append(spec)
        self._catalogs[name] = total

    def _ready_workers(self) -> list[_Worker]:
        """All workers, waiting for any being replaced (bounded by restart_timeout)."""
        deadline = time.monotonic() + self.restart_timeout
        for index in range(self.shard_count):
            # A dead worker's slot is refilled by a new one: wait on whichever is current.
            while not self._workers[index].ready.wait(0.05):
                if time.monotonic() > deadline:
                    raise ShardUnavailableError(f"worker {index} is not ready")
        return list(self._workers)

    def score(
        self,
        name: str,
        key_id: str,
        keys: Sealed[seal.GaloisKeys],
        query: Sealed[seal.Ciphertext],
    ) -> Iterator[bytes]:
        total = self._catalogs[name]
        workers = self._ready_workers()
        request_id, replies = self._open()
        finished = False
        try:
            for worker in workers:
                with worker.send_lock:
                    ship = key_id not in worker.keys_held
                    message = (
                        "score",
                        request_id,
                        name,
                        key_id,
                        keys.blob if ship else None,
                        query.blob,
                        _UNBOUNDED,  # bounded, inflated too, when the Scorer loaded it
                    )
                    try:
                        worker.conn.send(message)
                    except OSError:
                        raise ShardUnavailableError(
                            f"worker {worker.process.name} died before the request"
                        ) from None
                    worker.keys_held.add(key_id)
            ready: dict[int, bytes] = {}
            for expected in range(total):
                while expected not in ready:
                    reply = self._next_reply(replies)
                    if reply[0] == "chunk":
                        ready[reply[2]] = reply[3]
                yield ready.pop(expected)
            finished = True
        finally:
            self._close(request_id)
            if not finished:  # the caller stopped reading (hang-up, deadline) or a shard failed
                for worker in workers:
                    worker.cancelled.value = request_id  # spare the others the rest of it

    def forget_keys(self, key_id: str) -> None:
        for worker in self._workers:
            with worker.send_lock:
                if key_id in worker.keys_held and worker.alive:
                    worker.keys_held.discard(key_id)
                    worker.conn.send(("forget", 0, key_id))

    def close(self) -> None:
        self._closing = True
        for worker in self._workers:
            if worker.alive:
                with contextlib.suppress(OSError):
                    worker.send(("stop", 0))
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
            worker.conn.close()
