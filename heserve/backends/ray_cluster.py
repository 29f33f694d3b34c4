"""A Ray backend: each shard of every catalog lives in a Ray actor.

The same shards as the process pool (chunk c belongs to shard c mod S), moved onto
a Ray cluster so a catalog or a query rate beyond one machine needs no rewrite.
Each actor encodes its shard once and keeps it. Evaluation keys travel through
Ray's object store once per key_id: the front puts the bytes once and passes the
reference nested in a list, so Ray does not resolve it per call; an actor fetches
it only when it does not hold that key_id yet. Actors are restarted by Ray when
they die; a restarted actor holds nothing and re-encodes its shard on its next
query (or at once, through `warm_up`), and the query that was in flight fails
with ShardUnavailableError (UNAVAILABLE on the wire).

Ray is an optional dependency (`pip install heserve[ray]`); only this module
imports it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions
import tenseal.sealapi as seal

from heserve.backends.base import Sealed, ShardBudget, ShardUnavailableError, shard_chunks
from heserve.he.engine import Chunk, Engine, Progress, QueryError
from heserve.he.plan import DiagonalPlan
from heserve.protocol import wire
from heserve.protocol.params import CkksParameters
from heserve.protocol.slots import FloatArray

log = logging.getLogger(__name__)

_UNBOUNDED = 1 << 62
_ACTOR_FAILURES = (
    ray.exceptions.RayActorError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OwnerDiedError,
)


class ShardActor:
    """One shard of every catalog, encoded once, plus the keys it was sent."""

    def __init__(self, params: CkksParameters) -> None:
        self._engine = Engine(params)
        self._shards: dict[str, tuple[DiagonalPlan, list[Chunk]]] = {}
        self._keys: dict[str, seal.GaloisKeys] = {}

    def pid(self) -> int:
        return os.getpid()

    def load(self, name: str, plan: DiagonalPlan, rows_ref: list[Any], budget: int | None) -> int:
        """Encode this shard of a catalog (rows fetched from the object store)."""
        rows: list[FloatArray] = ray.get(rows_ref[0])
        chunks = self._engine.encode_chunks(plan, rows, budget)
        self._shards[name] = (plan, chunks)
        return len(rows)

    def score(
        self,
        name: str,
        plan: DiagonalPlan,
        rows_ref: list[Any],
        budget: int | None,
        key_id: str,
        keys_ref: list[Any],
        query_blob: bytes,
    ) -> Iterator[bytes]:
        """Stream this shard's score ciphertexts, in chunk order."""
        if name not in self._shards:  # restarted since the catalog was loaded
            self.load(name, plan, rows_ref, budget)
        if key_id not in self._keys:
            blob: bytes = ray.get(keys_ref[0])
            self._keys[key_id] = wire.load_galois_keys(self._engine.context, blob, _UNBOUNDED)
        plan, chunks = self._shards[name]
        # The Scorer bounded the query (inflated too) before it got here.
        query = wire.load_ciphertext(self._engine.context, query_blob, _UNBOUNDED)
        for scores in self._engine.score(plan, chunks, query, self._keys[key_id]):
            yield wire.to_bytes(scores)

    def forget(self, key_id: str) -> None:
        self._keys.pop(key_id, None)

    def held_keys(self) -> list[str]:
        return sorted(self._keys)


@dataclass(frozen=True)
class _RayCatalog:
    plan: DiagonalPlan
    total: int
    budget: int | None
    shard_rows: tuple[Any, ...]  # one ObjectRef of row chunks per shard


class RayBackend:
    """Catalog shards in Ray actors, one per CPU of the cluster by default."""

    def __init__(
        self,
        params: CkksParameters,
        address: str | None = None,
        shards: int | None = None,
        memory_budget: int | None = None,
        restart_timeout: float = 300.0,
    ) -> None:
        self.restart_timeout = restart_timeout
        self._failed = False  # a shard failed: wait for Ray's restart before the next query
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False, include_dashboard=False)
        self.params = params
        self.shard_count = shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._budget = ShardBudget(memory_budget, self.shard_count)
        actor_class: Any = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=0)(ShardActor)
        self._actors: list[Any] = [actor_class.remote(params) for _ in range(self.shard_count)]
        self._catalogs: dict[str, _RayCatalog] = {}
        self._key_refs: dict[str, Any] = {}

    def actor_pids(self) -> list[int]:
        return [int(pid) for pid in ray.get([actor.pid.remote() for actor in self._actors])]

    def add_catalog(
        self, name: str, plan: DiagonalPlan, embeddings: FloatArray, progress: Progress | None
    ) -> None:
        total = plan.chunk_count(len(embeddings))
        budget = self._budget.take(self.params, plan, -(-total // self.shard_count))
        shard_rows = tuple(
            ray.put(plan.chunk_rows(embeddings, shard_chunks(shard, self.shard_count, total)))
            for shard in range(self.shard_count)
        )
        pending = [
            actor.load.remote(name, plan, [rows], budget)
            for actor, rows in zip(self._actors, shard_rows, strict=True)
        ]
        done = 0
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            done += int(ray.get(finished[0]))
            if progress is not None:
                progress(done, total)
        self._catalogs[name] = _RayCatalog(plan, total, budget, shard_rows)

    def score(
        self,
        name: str,
        key_id: str,
        keys: Sealed[seal.GaloisKeys],
        query: Sealed[seal.Ciphertext],
    ) -> Iterator[bytes]:
        catalog = self._catalogs[name]
        if self._failed:
            self._wait_for_actors()
        key_ref = self._key_refs.get(key_id)
        if key_ref is None:
            key_ref = self._key_refs[key_id] = ray.put(keys.blob)
        streams = [
            actor.score.remote(
                name, catalog.plan, [rows], catalog.budget, key_id, [key_ref], query.blob
            )
            for actor, rows in zip(self._actors, catalog.shard_rows, strict=True)
        ]
        try:
            for index in range(catalog.total):
                yield ray.get(next(streams[index % self.shard_count]))
        except _ACTOR_FAILURES as exc:
            self._failed = True
            raise ShardUnavailableError(f"a Ray shard failed during the query: {exc}") from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            raise QueryError(str(cause)) from None

    def _wait_for_actors(self) -> None:
        """Until every actor answers: Ray refuses tasks while it restarts one."""
        deadline = time.monotonic() + self.restart_timeout
        while True:
            try:
                ray.get([actor.pid.remote() for actor in self._actors], timeout=10)
            except (*_ACTOR_FAILURES, ray.exceptions.GetTimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise ShardUnavailableError(f"a Ray shard did not come back: {exc}") from None
                time.sleep(0.1)
                continue
            self._failed = False
            return

    def forget_keys(self, key_id: str) -> None:
        if self._key_refs.pop(key_id, None) is not None:
            for actor in self._actors:
                actor.forget.remote(key_id)

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
