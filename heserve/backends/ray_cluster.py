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

from heserve.backends.base import ScoreCall, ShardBudget, ShardUnavailableError, shard_chunks
from heserve.backends.shard import Shard, ShardQuery
from heserve.he.engine import Engine, Progress, QueryError
from heserve.he.plan import DiagonalPlan
from heserve.protocol.params import CkksParameters
from heserve.protocol.slots import RowArray

log = logging.getLogger(__name__)

_ACTOR_FAILURES = (
    ray.exceptions.RayActorError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OwnerDiedError,
)


@dataclass(frozen=True)
class _ShardCatalog:
    """What an actor needs, besides its rows, to encode its shard of a catalog."""

    name: str
    plan: DiagonalPlan
    budget: int | None


@dataclass(frozen=True)
class _RayCatalog:
    """A catalog as the front keeps it: enough for a restarted actor to rebuild its shard."""

    shard: _ShardCatalog
    total: int
    shard_rows: tuple[Any, ...]  # one ObjectRef of row chunks per shard


class ShardActor:
    """A `Shard` in a Ray actor: one shard of every catalog, plus the keys it was sent."""

    def __init__(self, params: CkksParameters) -> None:
        self._shard = Shard(Engine(params))

    def pid(self) -> int:
        return os.getpid()

    def load(self, catalog: _ShardCatalog, rows_ref: list[Any]) -> int:
        """Encode this shard of a catalog (rows fetched from the object store)."""
        rows: list[RowArray] = ray.get(rows_ref[0])
        self._shard.load_catalog(catalog.name, catalog.plan, rows, catalog.budget)
        return len(rows)

    def score(
        self, catalog: _ShardCatalog, rows_ref: list[Any], query: ShardQuery, keys_ref: list[Any]
    ) -> Iterator[list[bytes]]:
        """Stream this shard's score ciphertexts (one per query) chunk by chunk, in order."""
        if not self._shard.holds_catalog(catalog.name):  # restarted since it was loaded
            self.load(catalog, rows_ref)
        if not self._shard.holds_keys(query.key_id):
            self._shard.add_keys(query.key_id, ray.get(keys_ref[0]))
        yield from self._shard.answer(query)

    def forget(self, key_id: str) -> None:
        self._shard.forget_keys(key_id)

    def held_keys(self) -> list[str]:
        return self._shard.held_keys()


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
        self.engine = Engine(params)  # the front's: the Scorer checks queries with it
        self.shard_count = shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._budget = ShardBudget(memory_budget, self.shard_count)
        actor_class: Any = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=0)(ShardActor)
        self._actors: list[Any] = [actor_class.remote(params) for _ in range(self.shard_count)]
        self._catalogs: dict[str, _RayCatalog] = {}
        self._key_refs: dict[str, Any] = {}

    def actor_pids(self) -> list[int]:
        """The process id of each shard's actor, in shard order."""
        return [int(pid) for pid in ray.get([actor.pid.remote() for actor in self._actors])]

    def actor_keys(self) -> list[list[str]]:
        """The key_ids each shard's actor holds (as the actor reports), in shard order."""
        held: list[list[str]] = ray.get([actor.held_keys.remote() for actor in self._actors])
        return held

    def kill_actor(self, shard: int) -> None:
        """Kill one shard's actor the way a crash would: Ray restarts it."""
        ray.kill(self._actors[shard], no_restart=False)

    def add_catalog(
        self, name: str, plan: DiagonalPlan, embeddings: RowArray, progress: Progress | None
    ) -> None:
        total = plan.chunk_count(len(embeddings))
        budget = self._budget.take(self.params, plan, total)
        shard_rows = tuple(
            ray.put(plan.chunk_rows(embeddings, shard_chunks(shard, self.shard_count, total)))
            for shard in range(self.shard_count)
        )
        shard = _ShardCatalog(name, plan, budget)
        pending = [
            actor.load.remote(shard, [rows])
            for actor, rows in zip(self._actors, shard_rows, strict=True)
        ]
        done = 0
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            done += int(ray.get(finished[0]))
            if progress is not None:
                progress(done, total)
        self._catalogs[name] = _RayCatalog(shard, total, shard_rows)

    def score(self, call: ScoreCall) -> Iterator[list[bytes]]:
        return self._stream(call, self._catalogs[call.catalog].total, None)

    def score_rows(self, call: ScoreCall, rows: RowArray) -> Iterator[list[bytes]]:
        chunks = self._catalogs[call.catalog].shard.plan.chunk_rows(rows)
        return self._stream(call, len(chunks), chunks)

    def _stream(
        self, call: ScoreCall, total: int, rows: list[RowArray] | None
    ) -> Iterator[list[bytes]]:
        """Start each actor's part of the query, then yield the `total` results in order.
        `rows`: the chunks to score, if not the catalog's own (re-ranking)."""
        catalog = self._catalogs[call.catalog]
        if self._failed:
            self._wait_for_actors()
        key_ref = self._key_refs.get(call.key_id)
        if key_ref is None:
            key_ref = self._key_refs[call.key_id] = ray.put(call.keys.blob)
        streams = []
        for shard, (actor, catalog_rows) in enumerate(
            zip(self._actors, catalog.shard_rows, strict=True)
        ):
            indices = shard_chunks(shard, self.shard_count, total)
            if not indices:
                break  # fewer chunks than shards: the later shards have none
            part = None if rows is None else tuple(rows[i] for i in indices)
            blobs = tuple(query.blob for query in call.queries)
            query = ShardQuery(call.catalog, call.key_id, blobs, rows=part)
            streams.append(actor.score.remote(catalog.shard, [catalog_rows], query, [key_ref]))
        try:
            for index in range(total):
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
