"""Where the encoded catalog lives and is scored: the backend interface.

The Scorer validates requests and owns the key store; a backend holds the
catalogs' encoded chunks and computes, through one `heserve.backends.shard.Shard`
per process that computes. `LocalBackend` does it in this process;
`heserve.backends.pool.PoolBackend` spreads the chunks of each catalog over worker
processes and `heserve.backends.ray_cluster.RayBackend` over Ray actors (shard =
the chunks with index ≡ shard mod shard count). Backends take keys and queries
both as bytes (what a remote shard needs) and as loaded SEAL objects (what an
in-process one uses), so neither is parsed twice.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import tenseal.sealapi as seal

from heserve.he.engine import Engine, Progress, encoded_chunk_bytes
from heserve.he.plan import DiagonalPlan
from heserve.he.rows import Rows
from heserve.protocol.params import CkksParameters
from heserve.protocol.slots import RowArray, ceil_div

T = TypeVar("T")

BOUNDED_OBJECT_BYTES = 1 << 62
"""The inflate limit for SEAL bytes that were bounded already: the queries and keys
the Scorer loaded under its own limits before they reached a backend, and the
results our own engines made. A bound here would only repeat those checks."""


class ShardUnavailableError(RuntimeError):
    """A shard (worker process, remote actor) failed while it held part of a request."""


class ShardFaultError(RuntimeError):
    """A shard raised an error that is not the request's fault (a bug, a broken
    environment): the caller gets INTERNAL, the details stay in the server's log."""


@dataclass(frozen=True)
class Sealed(Generic[T]):
    """A SEAL object together with the (validated) bytes it was loaded from."""

    blob: bytes
    value: T


@dataclass(frozen=True)
class ScoreCall:
    """One checked request, as every backend's `score` and `score_rows` take it.

    `catalog` names the catalog scored (or, for `score_rows`, whose layout the
    given rows take); `key_id` lets a remote shard keep the keys between queries.
    `queries` are scored in one pass over the catalog (one or more, same keys).
    """

    catalog: str
    key_id: str
    keys: Sealed[seal.GaloisKeys]
    queries: tuple[Sealed[seal.Ciphertext], ...]
    deadline: float | None = None
    """time.monotonic() past which the caller no longer waits (None: no deadline): a
    backend waiting for a shard being replaced gives up then, not minutes later."""


def return_freed_memory() -> None:
    """Give the heap's freed pages back to the system (glibc's malloc_trim; elsewhere,
    nothing). After a catalog's chunks or rows are dropped, glibc would otherwise keep
    the pages of the many blocks it freed (each below its mmap threshold), and the
    process's resident size, which is what an operator sees, would not come down."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def shard_changes(
    shard: int, shard_count: int, plan: DiagonalPlan, embeddings: Rows, chunks: Sequence[int]
) -> tuple[int, Mapping[int, RowArray]]:
    """A shard's part of `update_catalog`: how many chunks it holds of the new version,
    and the new rows of its rewritten ones by their position in the shard."""
    total = plan.chunk_count(len(embeddings))
    count = len(shard_chunks(shard, shard_count, total))
    mine = [c for c in chunks if c % shard_count == shard and c < total]
    rows = plan.chunk_rows(embeddings, mine)
    return count, {c // shard_count: part for c, part in zip(mine, rows, strict=True)}


def shard_chunks(shard: int, shard_count: int, chunk_count: int) -> list[int]:
    """The chunks of shard `shard`: c with c ≡ shard (mod shard_count), round robin.

    Round robin keeps every shard busy on its part of the same stretch of the
    catalog, so results can stream in catalog order with little buffering.
    """
    return list(range(shard, chunk_count, shard_count))


class ShardBudget:
    """A memory budget for encoded chunks, split evenly over shards, spent catalog by catalog."""

    def __init__(self, total_bytes: int | None, shard_count: int) -> None:
        self._shard_count = shard_count
        self._per_shard = None if total_bytes is None else total_bytes // shard_count
        self._spent = 0
        self._charged: dict[str, int] = {}

    def take(
        self, params: CkksParameters, plan: DiagonalPlan, chunk_count: int, name: str
    ) -> int | None:
        """Bytes each shard may encode for a catalog of `chunk_count` chunks (None: no
        limit), then charge them to `name`: the largest shard holds ⌈chunks / shards⌉."""
        if self._per_shard is None:
            return None
        left = max(0, self._per_shard - self._spent)
        chunk_bytes = encoded_chunk_bytes(params, plan)
        largest_shard = ceil_div(chunk_count, self._shard_count)
        charge = min(largest_shard, left // chunk_bytes) * chunk_bytes
        self._spent += charge
        self._charged[name] = self._charged.get(name, 0) + charge
        return left

    def inherit(self, name: str, base: str) -> None:
        """Charge `name`, a version made from `base` (update_catalog), what `base` was
        charged: while both are held, the budget counts the shared chunks twice, which
        errs on the side of memory."""
        charge = self._charged.get(base, 0)
        self._spent += charge
        self._charged[name] = self._charged.get(name, 0) + charge

    def release(self, name: str) -> None:
        """Give back what catalog `name` was charged (it was removed)."""
        self._spent -= self._charged.pop(name, 0)


class Backend(Protocol):
    """Holds encoded catalogs and scores queries against them.

    `engine` is the front process's own engine (one SEAL context per process): the
    Scorer loads and checks queries and keys with it and splits complex results.
    """

    shard_count: int
    engine: Engine

    def add_catalog(
        self, name: str, plan: DiagonalPlan, embeddings: Rows, progress: Progress | None
    ) -> None:
        """Encode and keep a catalog's chunks."""

    def update_catalog(
        self, name: str, base: str, plan: DiagonalPlan, embeddings: Rows, chunks: Sequence[int]
    ) -> None:
        """Keep catalog `name` (rows `embeddings`, under `base`'s `plan`), which differs
        from the held catalog `base` only in the chunks at catalog-wide indices `chunks`:
        those are encoded, every other one is shared with `base`, not copied."""

    def score(self, call: ScoreCall) -> Iterator[list[bytes]]:
        """Per chunk, in catalog order: one serialized score ciphertext per query."""
        ...

    def score_rows(self, call: ScoreCall, rows: RowArray) -> Iterator[list[bytes]]:
        """Score `rows` (re-ranking candidates, in the caller's order) under the layout of
        `call.catalog`: per chunk of rows, in order, one serialized ciphertext per query."""
        ...

    def remove_catalog(self, name: str) -> None:
        """Drop a catalog's chunks (a newer version replaced it and no query uses it)."""

    def forget_keys(self, key_id: str) -> None:
        """Drop every copy of these keys (deleted or expired)."""

    def close(self) -> None:
        """Release workers and memory."""
