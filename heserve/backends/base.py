"""Where the encoded catalog lives and is scored: the backend interface.

The Scorer validates requests and owns the key store; a backend holds the
catalogs' encoded chunks and computes. `LocalBackend` does it in this process;
`heserve.backends.pool.PoolBackend` spreads the chunks of each catalog over worker
processes (shard = the chunks with index ≡ shard mod shard count). Backends take
keys and queries both as bytes (what a remote shard needs) and as loaded SEAL
objects (what an in-process one uses), so neither is parsed twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import tenseal.sealapi as seal

from heserve.he.engine import Progress, encoded_chunk_bytes
from heserve.he.plan import DiagonalPlan
from heserve.protocol.params import CkksParameters
from heserve.protocol.slots import FloatArray

T = TypeVar("T")


class ShardUnavailableError(RuntimeError):
    """A shard (worker process, remote actor) failed while it held part of a request."""


@dataclass(frozen=True)
class Sealed(Generic[T]):
    """A SEAL object together with the (validated) bytes it was loaded from."""

    blob: bytes
    value: T


def shard_chunks(shard: int, shard_count: int, chunk_count: int) -> list[int]:
    """The chunks of shard `shard`: c with c ≡ shard (mod shard_count), round robin.

    Round robin keeps every shard busy on its part of the same stretch of the
    catalog, so results can stream in catalog order with little buffering.
    """
    return list(range(shard, chunk_count, shard_count))


class ShardBudget:
    """A memory budget for encoded chunks, split evenly over shards, spent catalog by catalog."""

    def __init__(self, total_bytes: int | None, shard_count: int) -> None:
        self._per_shard = None if total_bytes is None else total_bytes // shard_count
        self._spent = 0

    def take(self, params: CkksParameters, plan: DiagonalPlan, chunks_per_shard: int) -> int | None:
        """Bytes each shard may encode for the next catalog (None: no limit), then charge them."""
        if self._per_shard is None:
            return None
        left = max(0, self._per_shard - self._spent)
        chunk_bytes = encoded_chunk_bytes(params, plan)
        self._spent += min(chunks_per_shard, left // chunk_bytes) * chunk_bytes
        return left


class Backend(Protocol):
    """Holds encoded catalogs and scores queries against them."""

    shard_count: int

    def add_catalog(
        self, name: str, plan: DiagonalPlan, embeddings: FloatArray, progress: Progress | None
    ) -> None:
        """Encode and keep a catalog's chunks."""

    def score(
        self,
        name: str,
        key_id: str,
        keys: Sealed[seal.GaloisKeys],
        query: Sealed[seal.Ciphertext],
    ) -> Iterator[bytes]:
        """Serialized score ciphertexts, one per chunk, in catalog order."""
        ...

    def forget_keys(self, key_id: str) -> None:
        """Drop every copy of these keys (deleted or expired)."""

    def close(self) -> None:
        """Release workers and memory."""
