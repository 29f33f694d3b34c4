"""The in-process backend: every chunk of every catalog in this process, on one core.

No start-up cost and nothing to ship: the default for small catalogs and tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import tenseal.sealapi as seal

from heserve.backends.base import Sealed, ShardBudget
from heserve.he.engine import Chunk, Engine, Progress
from heserve.he.plan import DiagonalPlan
from heserve.protocol import wire
from heserve.protocol.params import CkksParameters
from heserve.protocol.slots import FloatArray


class LocalBackend:
    """Every chunk in this process: no start-up cost, one core."""

    shard_count = 1

    def __init__(self, params: CkksParameters, memory_budget: int | None = None) -> None:
        self.engine = Engine(params)
        self._budget = ShardBudget(memory_budget, 1)
        self._catalogs: dict[str, tuple[DiagonalPlan, list[Chunk]]] = {}

    def add_catalog(
        self, name: str, plan: DiagonalPlan, embeddings: FloatArray, progress: Progress | None
    ) -> None:
        budget = self._budget.take(self.engine.params, plan, plan.chunk_count(len(embeddings)))
        chunks = self.engine.encode_catalog(plan, embeddings, progress, budget)
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
            yield wire.to_bytes(scores)

    def forget_keys(self, key_id: str) -> None:
        """Nothing to do: the loaded keys live in the Scorer's key store only."""

    def close(self) -> None:
        self._catalogs.clear()
