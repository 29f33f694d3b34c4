"""A process pool backend: each worker holds one shard of every catalog.

`tenseal.sealapi` holds the GIL, so using more than one core takes processes.
Shard w of a catalog is its chunks w, w + W, w + 2W, ... (round robin), so all
workers produce in step and the front streams results in catalog order with
little buffering. Each worker encodes its shard once and keeps it; Galois keys
reach a worker once per key_id and are dropped when the key store drops them.

Workers are spawned (not forked) so that no gRPC state is copied into them. Each
request is a typed message on the worker's pipe (`pool_worker`); a reader thread
per worker routes replies to the queue of the request they answer, so concurrent
queries interleave in the workers instead of waiting for each other in the front.
Re-ranking candidates are scored by the workers too, their chunks dealt round
robin like a catalog's.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection

from heserve.backends.base import (
    ScoreCall,
    ShardBudget,
    ShardFaultError,
    ShardUnavailableError,
    shard_changes,
    shard_chunks,
)
from heserve.backends.pool_worker import (
    CANCELLED_SLOTS,
    CancelledRing,
    ChunkEncoded,
    ChunkScored,
    DeriveShard,
    Failed,
    ForgetKeys,
    LoadShard,
    RemoveCatalog,
    Reply,
    ScoreShard,
    Stop,
    ToWorker,
    resident_bytes,
    serve_worker,
)
from heserve.backends.shard import ShardQuery
from heserve.he.engine import Engine, Progress, QueryError
from heserve.he.plan import DiagonalPlan
from heserve.he.rows import Rows
from heserve.protocol.params import CkksParameters
from heserve.protocol.slots import RowArray

log = logging.getLogger(__name__)

_CHUNKS_PER_LOAD = 4
"""Chunks of rows per LoadShard message: 8,192 rows each, 16 MiB at d = 128 in float32."""


@dataclass
class _Worker:
    """A worker process as the front sees it: its pipe, and the keys it was sent."""

    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    cancelled: CancelledRing
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    cancels: int = 0  # the next slot of `cancelled` to write
    keys_held: set[str] = field(default_factory=set)
    alive: bool = True
    ready: threading.Event = field(default_factory=threading.Event)

    def send(self, message: ToWorker) -> None:
        with self.send_lock:
            self.conn.send(message)


_GROUP_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM}
"""What a terminal (hang-up, Ctrl-C) or a service manager stopping a whole process
group (docker stop, systemd) sends every process of it: the front acts on them (a
reload; a graceful stop that ends the workers with Stop), its workers never. A worker
ends on Stop, or when the front's pipe closes (the front is gone); by hand, SIGKILL."""


@contextlib.contextmanager
def _group_signals_blocked() -> Iterator[None]:
    """`_GROUP_SIGNALS` blocked in this thread while it starts processes, which inherit
    the mask: the workers (and multiprocessing's resource tracker) would otherwise die
    of a signal meant for the front, and be replaced for nothing (or, while the front
    stops gracefully, replaced after it said it stopped)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _GROUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass(frozen=True)
class WorkerDied:
    """Put by the front itself to every open request when a worker's pipe closes."""

    worker: str


@dataclass(frozen=True)
class _CatalogSpec:
    """What a worker needs to rebuild its shard of a catalog after a restart."""

    name: str
    plan: DiagonalPlan
    embeddings: Rows
    budget: int | None

    @property
    def chunk_count(self) -> int:
        return self.plan.chunk_count(len(self.embeddings))


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
        self.engine = Engine(params)  # the front's: the Scorer checks queries with it
        self.shard_count = workers or os.cpu_count() or 1
        self._budget = ShardBudget(memory_budget, self.shard_count)
        self.restart_timeout = restart_timeout
        self.restarts = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, queue.SimpleQueue[Reply | WorkerDied]] = {}
        self._pending_lock = threading.Lock()
        self._catalogs: dict[str, _CatalogSpec] = {}
        self._closing = False
        self._context = multiprocessing.get_context("spawn")
        self._workers = [self._spawn(index) for index in range(self.shard_count)]
        for worker in self._workers:
            worker.ready.set()

    def worker_pids(self) -> list[int]:
        """The process id of each shard's current worker, in shard order."""
        return [worker.process.pid or 0 for worker in self._workers]

    def shard_memory(self) -> list[int | None]:
        """Resident bytes of each shard's worker process, in shard order (None: gone)."""
        return [resident_bytes(pid) if pid else None for pid in self.worker_pids()]

    def worker_keys(self) -> list[set[str]]:
        """The key_ids each shard's current worker holds, in shard order."""
        return [set(worker.keys_held) for worker in self._workers]

    def pending_requests(self) -> int:
        """Requests whose replies the front still routes (0 when none is in flight)."""
        with self._pending_lock:
            return len(self._pending)

    def _spawn(self, index: int) -> _Worker:
        front, back = self._context.Pipe()
        # Twice: starting multiprocessing's resource tracker (once per front) unblocks
        # SIGINT and SIGTERM in this thread when it is done.
        with _group_signals_blocked():
            resource_tracker.ensure_running()
        with _group_signals_blocked():
            cancelled = self._context.RawArray(ctypes.c_int64, CANCELLED_SLOTS)
            process = self._context.Process(
                target=serve_worker,
                args=(back, self.params, cancelled, f"heserve-shard{index}"),
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
                message: Reply = worker.conn.recv()
            except (EOFError, OSError):
                break
            with self._pending_lock:
                target = self._pending.get(message.request_id)
            if target is not None:  # None: an abandoned request; drop its results
                target.put(message)
        worker.alive = False
        worker.ready.clear()
        with self._pending_lock:
            waiting = list(self._pending.values())
        for target in waiting:
            target.put(WorkerDied(worker.process.name))
        if not self._closing:
            self._replace(worker)

    def _replace(self, dead: _Worker) -> None:
        dead.process.join(timeout=5)  # reaped first: its exit status says how it died
        code = dead.process.exitcode
        how = (
            f"killed by {signal.Signals(-code).name}"
            if code is not None and code < 0 and -code in signal.valid_signals()
            else f"exit code {code}"
        )
        log.warning(
            "worker %s (pid %s, shard %d) died (%s); replacing it",
            dead.process.name,
            dead.process.pid,
            dead.index,
            how,
            extra={
                "fields": {
                    "event": "shard_died",
                    "shard": dead.index,
                    "pid": dead.process.pid,
                    "exit": how,
                }
            },
        )
        dead.conn.close()
        worker = self._spawn(dead.index)
        self._workers[dead.index] = worker
        try:
            for spec in list(self._catalogs.values()):  # a copy: an update may add one
                self._load_shards(spec, [worker], None)
        except ShardUnavailableError:
            return  # the replacement died too; its own route thread replaces it
        self.restarts += 1
        worker.ready.set()
        log.warning(
            "worker %s replaced and ready (pid %s)",
            worker.process.name,
            worker.process.pid,
            extra={
                "fields": {
                    "event": "shard_restarted",
                    "shard": dead.index,
                    "pid": worker.process.pid,
                }
            },
        )

    def _open(self) -> tuple[int, queue.SimpleQueue[Reply | WorkerDied]]:
        request_id = next(self._ids)
        replies: queue.SimpleQueue[Reply | WorkerDied] = queue.SimpleQueue()
        with self._pending_lock:
            self._pending[request_id] = replies
        return request_id, replies

    def _close(self, request_id: int) -> None:
        with self._pending_lock:
            self._pending.pop(request_id, None)

    def _next_reply(self, replies: queue.SimpleQueue[Reply | WorkerDied]) -> Reply:
        message = replies.get()
        if isinstance(message, WorkerDied):
            raise ShardUnavailableError(f"worker {message.worker} died during the request")
        if isinstance(message, Failed):
            if message.caller_fault:
                raise QueryError(message.reason)
            raise ShardFaultError(message.reason)
        return message

    def _load_shards(
        self, spec: _CatalogSpec, workers: list[_Worker], progress: Progress | None
    ) -> None:
        """Have each of `workers` encode its shard of a catalog; wait until all are done."""
        plan, rows = spec.plan, spec.embeddings

        def batches(worker: _Worker, request_id: int) -> list[Callable[[], ToWorker]]:
            indices = shard_chunks(worker.index, self.shard_count, spec.chunk_count)

            def load(first: int) -> Callable[[], ToWorker]:
                batch = indices[first : first + _CHUNKS_PER_LOAD]
                return lambda: LoadShard(
                    request_id,
                    spec.name,
                    plan,
                    tuple(plan.chunk_rows(rows, batch)),
                    spec.budget,
                    first,
                )

            return [load(first) for first in range(0, max(1, len(indices)), _CHUNKS_PER_LOAD)]

        self._run_batches(workers, batches, spec.chunk_count, progress)

    def _run_batches(
        self,
        workers: list[_Worker],
        batches: Callable[[_Worker, int], list[Callable[[], ToWorker]]],
        total: int,
        progress: Progress | None,
    ) -> None:
        """Send each of `workers` its batches (`batches(worker, request_id)`: one maker
        per message) and wait until each batch is done; `progress` counts the chunks
        the workers report encoded, out of `total`.

        Each worker's messages go out from a thread of its own, made one at a time as
        the pipe takes them: the worker encodes one batch while the next waits in its
        pipe, and no process ever holds a pickled copy of its whole shard (at
        1,000,000 × 128, 0.25 GB).
        """
        request_id, replies = self._open()
        try:
            expected = 0
            for worker in workers:
                makers = batches(worker, request_id)
                expected += len(makers)
                threading.Thread(
                    target=self._feed,
                    args=(worker, makers),
                    name=f"heserve-load-{worker.index}",
                    daemon=True,
                ).start()
            done = finished = 0
            while finished < expected:
                if isinstance(self._next_reply(replies), ChunkEncoded):
                    done += 1
                    if progress is not None:
                        progress(done, total)
                else:
                    finished += 1
        finally:
            self._close(request_id)

    @staticmethod
    def _feed(worker: _Worker, makers: list[Callable[[], ToWorker]]) -> None:
        """Send one worker its messages, each made just before it is sent (a pipe send
        blocks until the worker takes the message). A worker that dies stops the feed;
        its route thread fails the request."""
        for make in makers:
            try:
                worker.send(make())
            except OSError:
                return

    def add_catalog(
        self, name: str, plan: DiagonalPlan, embeddings: Rows, progress: Progress | None
    ) -> None:
        budget = self._budget.take(self.params, plan, plan.chunk_count(len(embeddings)), name)
        spec = _CatalogSpec(name, plan, embeddings, budget)
        self._load_shards(spec, self._workers, progress)
        self._catalogs[name] = spec

    def update_catalog(
        self, name: str, base: str, plan: DiagonalPlan, embeddings: Rows, chunks: Sequence[int]
    ) -> None:
        """Each worker derives its shard of `name` from its shard of `base`, receiving
        only its rewritten chunks' rows, a few chunks a message; a worker replaced
        meanwhile re-encodes its whole shard of `name` from the spec, as after any
        restart."""
        base_spec = self._catalogs[base]

        def batches(worker: _Worker, request_id: int) -> list[Callable[[], ToWorker]]:
            count, changed = shard_changes(worker.index, self.shard_count, plan, embeddings, chunks)
            positions = sorted(changed)

            def derive(first: int) -> Callable[[], ToWorker]:
                batch = positions[first : first + _CHUNKS_PER_LOAD]
                return lambda: DeriveShard(
                    request_id, name, base, count, tuple((p, changed[p]) for p in batch), first
                )

            return [derive(first) for first in range(0, max(1, len(positions)), _CHUNKS_PER_LOAD)]

        self._run_batches(self._ready_workers(), batches, len(chunks), None)
        self._budget.inherit(name, base)
        self._catalogs[name] = _CatalogSpec(name, plan, embeddings, base_spec.budget)

    def _ready_workers(self, call_deadline: float | None = None) -> list[_Worker]:
        """All workers, waiting for any being replaced: at most restart_timeout, and not
        past the call's own deadline (its caller would be gone by then)."""
        deadline = time.monotonic() + self.restart_timeout
        if call_deadline is not None:
            deadline = min(deadline, call_deadline)
        for index in range(self.shard_count):
            # A dead worker's slot is refilled by a new one: wait on whichever is current.
            while not self._workers[index].ready.wait(0.05):
                if time.monotonic() > deadline:
                    raise ShardUnavailableError(f"worker {index} is being replaced")
        return list(self._workers)

    def score(self, call: ScoreCall) -> Iterator[list[bytes]]:
        return self._stream(call, self._catalogs[call.catalog].chunk_count, lambda indices: None)

    def score_rows(self, call: ScoreCall, rows: RowArray) -> Iterator[list[bytes]]:
        chunks = self._catalogs[call.catalog].plan.chunk_rows(rows)
        return self._stream(call, len(chunks), lambda indices: tuple(chunks[i] for i in indices))

    def _stream(
        self,
        call: ScoreCall,
        total: int,
        rows_of: Callable[[list[int]], tuple[RowArray, ...] | None],
    ) -> Iterator[list[bytes]]:
        """Send the query to every worker with chunks to score, then yield the `total`
        results in order. `rows_of(indices)`: the rows of those chunks, if not the
        catalog's own (re-ranking)."""
        workers = self._ready_workers(call.deadline)
        request_id, replies = self._open()
        finished = False
        try:
            for worker in workers:
                indices = shard_chunks(worker.index, self.shard_count, total)
                if indices:
                    self._send_query(worker, request_id, call, indices, rows_of(indices))
            ready: dict[int, list[bytes]] = {}
            for expected in range(total):
                while expected not in ready:
                    reply = self._next_reply(replies)
                    if isinstance(reply, ChunkScored):
                        ready[reply.index] = list(reply.scores)
                yield ready.pop(expected)
            finished = True
        finally:
            self._close(request_id)
            if not finished:  # the caller stopped reading (hang-up, deadline) or a shard failed
                for worker in workers:  # spare the others the rest of it
                    with worker.send_lock:
                        worker.cancelled[worker.cancels % CANCELLED_SLOTS] = request_id
                        worker.cancels += 1

    def _send_query(
        self,
        worker: _Worker,
        request_id: int,
        call: ScoreCall,
        indices: list[int],
        rows: tuple[RowArray, ...] | None,
    ) -> None:
        """One worker's part of a query, with the keys if it does not hold them yet."""
        with worker.send_lock:
            ship = call.key_id not in worker.keys_held
            query = ShardQuery(
                call.catalog,
                call.key_id,
                tuple(query.blob for query in call.queries),
                call.keys.blob if ship else None,
                rows,
            )
            try:
                worker.conn.send(ScoreShard(request_id, query, tuple(indices)))
            except OSError:
                raise ShardUnavailableError(
                    f"worker {worker.process.name} died before the request"
                ) from None
            worker.keys_held.add(call.key_id)

    def remove_catalog(self, name: str) -> None:
        """Workers drop their chunks after the queries already in their pipes (FIFO)."""
        self._catalogs.pop(name, None)
        self._budget.release(name)
        for worker in self._workers:
            if worker.alive:
                with contextlib.suppress(OSError):
                    worker.send(RemoveCatalog(name))

    def forget_keys(self, key_id: str) -> None:
        for worker in self._workers:
            with worker.send_lock:
                if key_id in worker.keys_held and worker.alive:
                    worker.keys_held.discard(key_id)
                    worker.conn.send(ForgetKeys(key_id))

    def close(self) -> None:
        self._closing = True
        for worker in self._workers:
            if worker.alive:
                with contextlib.suppress(OSError):
                    worker.send(Stop())
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
            worker.conn.close()
