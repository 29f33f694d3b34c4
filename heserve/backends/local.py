"""The in-process backend: every chunk of every catalog in this process, on one core.

No start-up cost and nothing to ship: the default for small catalogs and tests.
Its one shard computes with the same Engine the Scorer loads queries with, and
with the loaded keys of the Scorer's key store, so nothing is parsed twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from heserve.backends.base import ScoreCall, ShardBudget, shard_changes
from heserve.backends.shard import Shard
from heserve.he.engine import Engine, Progress
from heserve.he.plan import DiagonalPlan
from heserve.he.rows import Rows
from heserve.protocol.params import CkksParameters
from heserve.protocol.slots import RowArray


class LocalBackend:
    """Every chunk in this process: no start-up cost, one core."""

    shard_count = 1

    def __init__(self, params: CkksParameters, memory_budget: int | None = None) -> None:
        self.engine = Engine(params)
        self._budget = ShardBudget(memory_budget, self.shard_count)
        self._shard = Shard(self.engine)

    def add_catalog(
        self, name: str, plan: DiagonalPlan, embeddings: Rows, progress: Progress | None
    ) -> None:
        rows = plan.chunk_rows(embeddings)
        budget = self._budget.take(self.engine.params, plan, len(rows), name)
        self._shard.load_catalog(name, plan, rows, budget, progress)

    def update_catalog(
        self, name: str, base: str, plan: DiagonalPlan, embeddings: Rows, chunks: Sequence[int]
    ) -> None:
        count, changed = shard_changes(0, 1, plan, embeddings, chunks)
        self._shard.derive_catalog(name, base, count, changed)
        self._budget.inherit(name, base)

    def remove_catalog(self, name: str) -> None:
        self._shard.remove_catalog(name)
        self._budget.release(name)

    def score(self, call: ScoreCall) -> Iterator[list[bytes]]:
        queries = [query.value for query in call.queries]
        return self._shard.score(call.catalog, queries, call.keys.value)

    def score_rows(self, call: ScoreCall, rows: RowArray) -> Iterator[list[bytes]]:
        chunks = self._shard.plan(call.catalog).chunk_rows(rows)
        queries = [query.value for query in call.queries]
        return self._shard.score(call.catalog, queries, call.keys.value, chunks)

    def forget_keys(self, key_id: str) -> None:
        """Nothing to do: the loaded keys live in the Scorer's key store only."""

    def close(self) -> None:
        self._shard = Shard(self.engine)
