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

An actor's death is noticed when it happens, busy or idle: each actor runs a
`watch` call that never returns (in a concurrency group of its own, beside the one
that scores), and a front thread waits on all of them. It logs the death at
WARNING, counts the restart (`restarts`, exported as a metric) and watches the
restarted actor. What a client is told is only that a shard failed and to retry:
Ray's own text (actor ids, RPC codes, node addresses) goes to the log, never the wire.

Ray's Python logging goes through heserve's (its own handler is removed), so that
`--log-format json` holds for what Ray says in this process too.

Ray is an optional dependency (`pip install heserve[ray]`); only this module
imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray.exceptions

from heserve.backends.base import (
    ScoreCall,
    ShardBudget,
    ShardFaultError,
    ShardUnavailableError,
    shard_changes,
    shard_chunks,
)
from heserve.backends.shard import Shard, ShardQuery
from heserve.he.engine import Engine, Progress, QueryError
from heserve.he.plan import DiagonalPlan
from heserve.he.rows import Rows
from heserve.protocol import wire
from heserve.protocol.params import CkksParameters
from heserve.protocol.slots import RowArray

log = logging.getLogger(__name__)

_Method = TypeVar("_Method", bound=Callable[..., Any])
_WATCH_GROUP = "watch"
_MEMORY_SECONDS = 2.0  # a scrape waits this long for the actors' memory, at most

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
    shard_rows: tuple[tuple[Any, ...], ...]
    """Per shard, one ObjectRef per chunk of rows: a version made by an update shares the
    refs of the chunks it did not change (the object store holds those rows once)."""


def _in_watch_group(method: _Method) -> _Method:
    """Run `method` in the actor's watch group: beside a running query, not after it."""
    decorated: _Method = ray.method(concurrency_group=_WATCH_GROUP)(method)
    return decorated


def _route_ray_logging() -> None:
    """Ray's records through heserve's handlers and level, not Ray's own stderr handler."""
    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        ray_logger.removeHandler(handler)
    ray_logger.propagate = True
    ray_logger.setLevel(logging.NOTSET)


def _cause(exc: BaseException) -> str:
    """A short name of a Ray failure for the log (its full text carries Ray internals)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:200]}"


class ShardActor:
    """A `Shard` in a Ray actor: one shard of every catalog, plus the keys it was sent."""

    def __init__(self, params: CkksParameters) -> None:
        self._shard = Shard(Engine(params))
        self._never = threading.Event()

    @_in_watch_group
    def pid(self) -> int:
        return os.getpid()

    @_in_watch_group
    def watch(self) -> None:
        """Never returns: its failure is how the front learns that the actor died."""
        self._never.wait()

    @_in_watch_group
    def resident_bytes(self) -> int:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")

    def remove_catalog(self, name: str) -> None:
        self._shard.remove_catalog(name)

    def load(self, catalog: _ShardCatalog, rows_refs: list[Any]) -> int:
        """Encode this shard of a catalog (rows fetched from the object store, a chunk per
        ref)."""
        rows: list[RowArray] = ray.get(rows_refs)
        self._shard.load_catalog(catalog.name, catalog.plan, rows, catalog.budget)
        return len(rows)

    def derive(
        self,
        catalog: _ShardCatalog,
        rows_refs: list[Any],
        base: str,
        count: int,
        changed: dict[int, RowArray],
    ) -> None:
        """This shard of `catalog` from its shard of `base` and the rewritten chunks; an
        actor restarted since `base` was loaded encodes its whole shard instead."""
        if self._shard.holds_catalog(base):
            self._shard.derive_catalog(catalog.name, base, count, changed)
        else:
            self.load(catalog, rows_refs)

    def score(
        self,
        catalog: _ShardCatalog,
        rows_refs: list[Any],
        query: ShardQuery,
        keys_ref: list[Any],
    ) -> Iterator[list[bytes]]:
        """Stream this shard's score ciphertexts (one per query) chunk by chunk, in order."""
        if not self._shard.holds_catalog(catalog.name):  # restarted since it was loaded
            self.load(catalog, rows_refs)
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
        self.restarts = 0
        self._failed = False  # a shard failed: wait for Ray's restart before the next query
        self._closing = False
        _route_ray_logging()
        if not ray.is_initialized():
            ray.init(
                address=address,
                log_to_driver=False,
                include_dashboard=False,
                configure_logging=False,
            )
        self.params = params
        self.engine = Engine(params)  # the front's: the Scorer checks queries with it
        self.shard_count = shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._budget = ShardBudget(memory_budget, self.shard_count)
        actor_class: Any = ray.remote(
            num_cpus=1,
            max_restarts=-1,
            max_task_retries=0,
            concurrency_groups={_WATCH_GROUP: 3},  # watch, and pid or memory beside it
        )(ShardActor)
        self._actors: list[Any] = [actor_class.remote(params) for _ in range(self.shard_count)]
        self._pids = [int(pid) for pid in ray.get([a.pid.remote() for a in self._actors])]
        self._catalogs: dict[str, _RayCatalog] = {}
        self._key_refs: dict[str, Any] = {}
        self._watcher = threading.Thread(target=self._watch, name="heserve-ray-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Wait on every actor's `watch` call; log and count each death, then watch the
        restarted actor (Ray restarts it; it re-encodes its shard on its next query)."""
        watching = {actor.watch.remote(): shard for shard, actor in enumerate(self._actors)}
        while watching and not self._closing:
            ready, _ = ray.wait(list(watching), num_returns=1)
            shard = watching.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception as exc:  # every way an actor can fail
                if self._closing:
                    return
                self._on_death(shard, exc)
            if not self._closing:
                watching[self._actors[shard].watch.remote()] = shard

    def _on_death(self, shard: int, exc: BaseException) -> None:
        """Log the failure at once, wait for the actor to answer again, and count a
        restart if it is a new process (Ray reports a restart in progress as the actor
        being unavailable, not dead: the pid tells)."""
        old_pid = self._pids[shard]
        log.warning(
            "Ray shard %d (actor pid %d) is down (%s); Ray restarts it",
            shard,
            old_pid,
            _cause(exc),
            extra={"fields": {"event": "shard_died", "shard": shard, "pid": old_pid}},
        )
        deadline = time.monotonic() + self.restart_timeout
        while not self._closing:
            try:
                pid = int(ray.get(self._actors[shard].pid.remote(), timeout=10))
                break
            except Exception as again:
                if time.monotonic() > deadline:
                    log.warning("Ray shard %d did not come back: %s", shard, _cause(again))
                    return
                time.sleep(0.1)  # Ray refuses calls while it restarts the actor
        else:
            return
        if pid == old_pid:
            log.warning("Ray shard %d (actor pid %d) answers again", shard, pid)
            return
        self._pids[shard] = pid
        self.restarts += 1
        log.warning(
            "Ray shard %d restarted (actor pid %d); it re-encodes its shard on its next query",
            shard,
            pid,
            extra={"fields": {"event": "shard_restarted", "shard": shard, "pid": pid}},
        )

    def shard_memory(self) -> list[int | None]:
        """Resident bytes of each shard's actor process, as each actor reports it (None:
        no answer within a couple of seconds, e.g. restarting)."""
        refs = [actor.resident_bytes.remote() for actor in self._actors]
        sizes: list[int | None] = []
        for ref in refs:
            try:
                sizes.append(int(ray.get(ref, timeout=_MEMORY_SECONDS)))
            except Exception:  # a scrape shows what it can
                sizes.append(None)
        return sizes

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
        self, name: str, plan: DiagonalPlan, embeddings: Rows, progress: Progress | None
    ) -> None:
        total = plan.chunk_count(len(embeddings))
        budget = self._budget.take(self.params, plan, total, name)
        shard_rows = tuple(
            tuple(
                ray.put(rows)
                for rows in plan.chunk_rows(
                    embeddings, shard_chunks(shard, self.shard_count, total)
                )
            )
            for shard in range(self.shard_count)
        )
        shard = _ShardCatalog(name, plan, budget)
        pending = [
            actor.load.remote(shard, list(rows))
            for actor, rows in zip(self._actors, shard_rows, strict=True)
        ]
        done = 0
        with self._shard_failures("while encoding a catalog"):
            while pending:
                finished, pending = ray.wait(pending, num_returns=1)
                done += int(ray.get(finished[0]))
                if progress is not None:
                    progress(done, total)
        self._catalogs[name] = _RayCatalog(shard, total, shard_rows)

    def update_catalog(
        self, name: str, base: str, plan: DiagonalPlan, embeddings: Rows, chunks: Sequence[int]
    ) -> None:
        """Each actor derives its shard of `name` from its shard of `base`. Only the
        rewritten chunks' rows go to the object store; the others' refs are `base`'s. An
        actor Ray restarts later rebuilds its shard from them."""
        total = plan.chunk_count(len(embeddings))
        held = self._catalogs[base]
        shard = _ShardCatalog(name, plan, held.shard.budget)
        shard_rows = []
        pending = []
        for index, actor in enumerate(self._actors):
            count, changed = shard_changes(index, self.shard_count, plan, embeddings, chunks)
            refs = [
                ray.put(changed[position])
                if position in changed
                else held.shard_rows[index][position]
                for position in range(count)
            ]
            shard_rows.append(tuple(refs))
            pending.append(actor.derive.remote(shard, refs, base, count, dict(changed)))
        with self._shard_failures("during a catalog update"):
            ray.get(pending)
        self._budget.inherit(name, base)
        self._catalogs[name] = _RayCatalog(shard, total, tuple(shard_rows))

    @contextlib.contextmanager
    def _shard_failures(self, when: str) -> Iterator[None]:
        """An actor lost while encoding, as the ShardUnavailableError the Scorer reports
        (the change fails and changes nothing); Ray's own text stays in the log."""
        try:
            yield
        except _ACTOR_FAILURES as exc:
            self._failed = True
            log.warning("a Ray shard failed %s (%s)", when, _cause(exc))
            raise ShardUnavailableError(f"a shard failed {when}") from None

    def remove_catalog(self, name: str) -> None:
        """Drop a catalog's chunks, also one whose encoding failed part way (some actors
        may hold their shard of it, and its budget was taken)."""
        self._catalogs.pop(name, None)
        self._budget.release(name)
        for actor in self._actors:
            actor.remove_catalog.remote(name)

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
            streams.append(actor.score.remote(catalog.shard, list(catalog_rows), query, [key_ref]))
        try:
            for index in range(total):
                yield ray.get(next(streams[index % self.shard_count]))
        except _ACTOR_FAILURES as exc:
            self._failed = True
            log.warning("a Ray shard failed during a query (%s)", _cause(exc))
            raise ShardUnavailableError("a shard failed during the query") from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            if isinstance(cause, QueryError | wire.SerializationError):
                raise QueryError(str(cause)) from None
            log.error("a Ray shard failed a query: %s", _cause(exc))
            raise ShardFaultError("a shard failed the query") from None

    def _wait_for_actors(self) -> None:
        """Until every actor answers: Ray refuses tasks while it restarts one."""
        deadline = time.monotonic() + self.restart_timeout
        while True:
            try:
                ray.get([actor.pid.remote() for actor in self._actors], timeout=10)
            except (*_ACTOR_FAILURES, ray.exceptions.GetTimeoutError) as exc:
                if time.monotonic() > deadline:
                    log.warning("a Ray shard did not come back (%s)", _cause(exc))
                    raise ShardUnavailableError("a shard did not come back in time") from None
                time.sleep(0.1)
                continue
            self._failed = False
            return

    def forget_keys(self, key_id: str) -> None:
        if self._key_refs.pop(key_id, None) is not None:
            for actor in self._actors:
                actor.forget.remote(key_id)

    def close(self) -> None:
        self._closing = True
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        # The watcher wakes as the actors die; joined here, it makes no Ray call after
        # close (one after ray.shutdown() would connect to the cluster again).
        self._watcher.join(timeout=30)
        self._actors = []
