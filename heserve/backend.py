"""Where the encoded catalog lives and is scored: the backend interface.

The Scorer validates requests and owns the key store; a backend holds the
catalogs' encoded chunks and computes. `LocalBackend` does it in this process;
`heserve.workers.ProcessBackend` spreads the chunks of each catalog over worker
processes (shard = the chunks with index ≡ shard mod shard count). Backends take
keys and queries both as bytes (what a remote shard needs) and as loaded SEAL
objects (what an in-process one uses), so neither is parsed twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import tenseal.sealapi as seal

from heserve import seal_io
from heserve.engine import (
    Chunk,
    EncodedChunk,
    Progress,
    ScoringEngine,
    encoded_chunk_bytes,
)
from heserve.packing import DiagonalPlan, FloatArray
from heserve.params import CkksParameters

T = TypeVar("T")


class ShardUnavailableError(RuntimeError):
    """A shard (worker process, remote actor) failed while it held part of a request."""


@dataclass(frozen=True)
class Sealed(Generic[T]):
    """A SEAL object together with the (validated) bytes it was loaded from."""

    blob: bytes
    value: T


class ScoringBackend(Protocol):
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


class LocalBackend:
    """Every chunk in this process: no start-up cost, one core."""

    shard_count = 1

    def __init__(self, params: CkksParameters, memory_budget: int | None = None) -> None:
        self.engine = ScoringEngine(params)
        self.memory_budget = memory_budget
        self._catalogs: dict[str, tuple[DiagonalPlan, list[Chunk]]] = {}
        self._bytes_encoded = 0

    def add_catalog(
        self, name: str, plan: DiagonalPlan, embeddings: FloatArray, progress: Progress | None
    ) -> None:
        budget = None if self.memory_budget is None else self.memory_budget - self._bytes_encoded
        chunks = self.engine.encode_catalog(plan, embeddings, progress, budget)
        encoded = sum(1 for chunk in chunks if isinstance(chunk, EncodedChunk))
        self._bytes_encoded += encoded * encoded_chunk_bytes(self.engine.params, plan)
        self._catalogs[name] = (plan, chunks)

    def score(
        self,
        name: str,
        key_id: str,
        keys: Sealed[seal.GaloisKeys],
        query: Sealed[seal.Ciphertext],
    ) -> Iterator[bytes]:
        plan, chunks = self._catalogs[name]
        for scores in self.engine.score(plan, chunks, query.value, keys.value):
            yield seal_io.to_bytes(scores)

    def forget_keys(self, key_id: str) -> None:
        """Nothing to do: the loaded keys live in the Scorer's key store only."""

    def close(self) -> None:
        self._catalogs.clear()
