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
import itertools
import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import tenseal.sealapi as seal

from heserve import seal_io
from heserve.backend import Sealed, ShardUnavailableError
from heserve.engine import Chunk, Progress, ScoringEngine, ScoringError, encoded_chunk_bytes
from heserve.packing import DiagonalPlan, FloatArray
from heserve.params import CkksParameters

log = logging.getLogger(__name__)

_UNBOUNDED = 1 << 62


def _serve_worker(conn: Connection, params: CkksParameters) -> None:
    """A worker's loop: keep shards and keys, answer tagged requests in order."""
    engine = ScoringEngine(params)
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
                chunks: list[Chunk] = []
                encoded_bytes = encoded_chunk_bytes(params, plan)
                for position, chunk_rows in enumerate(rows):
                    if (position + 1) * encoded_bytes <= budget:
                        chunks.append(engine.encode_rows(plan, chunk_rows))
                    else:
                        chunks.append(chunk_rows)
                    conn.send(("progress", request_id, 1))
                shards[name] = (plan, indices, chunks)
                conn.send(("done", request_id))
            elif kind == "score":
                _, _, name, key_id, keys_blob, query_blob, max_bytes = message
                if keys_blob is not None:
                    keys[key_id] = seal_io.load_galois_keys(engine.context, keys_blob, _UNBOUNDED)
                plan, indices, chunks = shards[name]
                query = seal_io.load_ciphertext(engine.context, query_blob, max_bytes)
                results = engine.score(plan, chunks, query, keys[key_id])
                for index, scores in zip(indices, results, strict=True):
                    conn.send(("chunk", request_id, index, seal_io.to_bytes(scores)))
                conn.send(("done", request_id))
            elif kind == "forget":
                keys.pop(message[2], None)
            elif kind == "stop":
                return
        except (ScoringError, seal_io.SerializationError, KeyError, ValueError) as exc:
            conn.send(("error", request_id, f"{type(exc).__name__}: {exc}"))


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    keys_held: set[str] = field(default_factory=set)
    alive: bool = True

    def send(self, message: tuple[Any, ...]) -> None:
        with self.send_lock:
            self.conn.send(message)


class ProcessBackend:
    """Catalog shards in `workers` processes (default: one per core)."""

    def __init__(
        self,
        params: CkksParameters,
        workers: int | None = None,
        memory_budget: int | None = None,
    ) -> None:
        self.params = params
        self.shard_count = workers or os.cpu_count() or 1
        self.memory_budget = memory_budget
        self._ids = itertools.count(1)
        self._pending: dict[int, queue.SimpleQueue[tuple[Any, ...]]] = {}
        self._pending_lock = threading.Lock()
        self._catalogs: dict[str, int] = {}
        self._encoded_per_worker = 0
        context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        for number in range(self.shard_count):
            front, back = context.Pipe()
            process = context.Process(
                target=_serve_worker,
                args=(back, params),
                name=f"heserve-worker-{number}",
                daemon=True,
            )
            process.start()
            back.close()
            worker = _Worker(process, front)
            self._workers.append(worker)
            threading.Thread(
                target=self._route, args=(worker,), name=f"heserve-route-{number}", daemon=True
            ).start()

    def _route(self, worker: _Worker) -> None:
        """Deliver each reply of one worker to the request it answers."""
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
        with self._pending_lock:
            waiting = list(self._pending.values())
        for target in waiting:
            target.put(("crashed", 0, worker.process.name))

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
            raise ScoringError(message[2])
        return message

    def add_catalog(
        self, name: str, plan: DiagonalPlan, embeddings: FloatArray, progress: Progress | None
    ) -> None:
        slots = plan.slot_count
        total = -(-embeddings.shape[0] // slots)
        budget = _UNBOUNDED
        if self.memory_budget is not None:
            budget = self.memory_budget // self.shard_count - self._encoded_per_worker
        request_id, replies = self._open()
        try:
            for shard, worker in enumerate(self._workers):
                indices = list(range(shard, total, self.shard_count))
                rows = [embeddings[i * slots : (i + 1) * slots].copy() for i in indices]
                worker.send(("catalog", request_id, name, plan, indices, rows, budget))
            done = finished = 0
            while finished < len(self._workers):
                if self._next_reply(replies)[0] == "progress":
                    done += 1
                    if progress is not None:
                        progress(done, total)
                else:
                    finished += 1
        finally:
            self._close(request_id)
        chunk_bytes = encoded_chunk_bytes(self.params, plan)
        per_worker = -(-total // self.shard_count)
        self._encoded_per_worker += min(per_worker, max(0, budget) // chunk_bytes) * chunk_bytes
        self._catalogs[name] = total

    def score(
        self,
        name: str,
        key_id: str,
        keys: Sealed[seal.GaloisKeys],
        query: Sealed[seal.Ciphertext],
    ) -> Iterator[bytes]:
        total = self._catalogs[name]
        request_id, replies = self._open()
        try:
            for worker in self._workers:
                if not worker.alive:
                    raise ShardUnavailableError(f"worker {worker.process.name} is not running")
                with worker.send_lock:
                    ship = key_id not in worker.keys_held
                    worker.keys_held.add(key_id)
                    worker.conn.send(
                        (
                            "score",
                            request_id,
                            name,
                            key_id,
                            keys.blob if ship else None,
                            query.blob,
                            len(query.blob) + 4096,
                        )
                    )
            ready: dict[int, bytes] = {}
            for expected in range(total):
                while expected not in ready:
                    message = self._next_reply(replies)
                    if message[0] == "chunk":
                        ready[message[2]] = message[3]
                yield ready.pop(expected)
        finally:
            self._close(request_id)

    def forget_keys(self, key_id: str) -> None:
        for worker in self._workers:
            with worker.send_lock:
                if key_id in worker.keys_held and worker.alive:
                    worker.keys_held.discard(key_id)
                    worker.conn.send(("forget", 0, key_id))

    def close(self) -> None:
        for worker in self._workers:
            if worker.alive:
                with contextlib.suppress(OSError):
                    worker.send(("stop", 0))
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
            worker.conn.close()
