"""One shard: an engine, its part of every catalog encoded once, and keys by key_id.

The unit of computing every backend is made of: `LocalBackend` holds one in the
front process, each `PoolBackend` worker process holds one, each Ray
`ShardActor` holds one. A remote shard receives queries as a `ShardQuery` (bytes
the Scorer bounded already) and keeps the evaluation keys it was sent until the
front tells it to forget them; an in-process one is handed loaded SEAL objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as seal

from heserve.backends.base import BOUNDED_OBJECT_BYTES
from heserve.he.engine import Chunk, Engine, Progress, encoded_chunk_bytes
from heserve.he.plan import DiagonalPlan
from heserve.protocol import wire
from heserve.protocol.slots import RowArray


@dataclass(frozen=True)
class ShardQuery:
    """A query as a remote shard receives it.

    `keys` comes along the first time this shard sees `key_id` (None after that);
    `rows`, when set, are the chunks of re-ranking candidates this shard scores
    under the catalog's layout, instead of its own chunks of the catalog.
    """

    catalog: str
    key_id: str
    queries: tuple[bytes, ...]
    keys: bytes | None = None
    rows: tuple[RowArray, ...] | None = None


class Shard:
    """Encoded chunks of catalogs by name, and Galois keys by key_id, over one Engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._catalogs: dict[str, tuple[DiagonalPlan, list[Chunk]]] = {}
        self._keys: dict[str, seal.GaloisKeys] = {}

    def load_catalog(
        self,
        name: str,
        plan: DiagonalPlan,
        rows: Sequence[RowArray],
        memory_budget: int | None,
        progress: Progress | None = None,
        first: int = 0,
    ) -> None:
        """Encode this shard's chunks of a catalog (each entry of `rows`: one chunk's rows).

        A catalog may arrive a batch of chunks at a time, so that neither the sender
        nor this shard ever holds all of its rows: `first` is the position of the
        batch's first chunk in this shard (0 starts the catalog afresh), and
        `memory_budget` is the shard's budget for the whole catalog.
        """
        if memory_budget is not None:
            memory_budget -= first * encoded_chunk_bytes(self.engine.params, plan)
        chunks = self.engine.encode_chunks(plan, rows, memory_budget, progress)
        if first == 0:
            self._catalogs[name] = (plan, chunks)
        else:
            self._catalogs[name][1].extend(chunks)

    def derive_catalog(
        self,
        name: str,
        base: str,
        count: int,
        changed: Mapping[int, RowArray],
        more: bool = False,
    ) -> None:
        """Make catalog `name` of `count` chunks (positions in this shard) from catalog
        `base`: the chunks at the positions in `changed` are encoded from their new rows,
        every other one is `base`'s own object, shared and not copied, so the new version
        costs only the chunks it rewrites. A rewritten chunk takes the form its place had
        in `base` (encoded, or rows past the memory budget); a new place, its last one's.

        The changed chunks may come in several calls (`more` for all but the first), so
        that no message holds them all; the catalog is not served before the last.
        """
        plan, chunks = self._catalogs[base]
        if more:
            derived = self._catalogs[name][1]
        else:
            # Places past `base`'s end are all in `changed`, this call's or a later one's;
            # until then they hold an empty chunk.
            empty = np.empty((0, plan.dimension), dtype=np.float32)
            derived = [chunks[p] if p < len(chunks) else empty for p in range(count)]
        for position, rows in changed.items():
            like = chunks[min(position, len(chunks) - 1)] if chunks else None
            if isinstance(like, np.ndarray):
                derived[position] = np.ascontiguousarray(rows)
            else:
                derived[position] = self.engine.encode_rows(plan, rows)
        self._catalogs[name] = (plan, derived)

    def remove_catalog(self, name: str) -> None:
        """Drop a catalog's chunks; a query already scoring them keeps its reference."""
        self._catalogs.pop(name, None)

    def holds_catalog(self, name: str) -> bool:
        return name in self._catalogs

    def plan(self, catalog: str) -> DiagonalPlan:
        """The slot layout of a catalog this shard holds."""
        return self._catalogs[catalog][0]

    def score(
        self,
        catalog: str,
        queries: Sequence[seal.Ciphertext],
        keys: seal.GaloisKeys,
        rows: Iterable[RowArray] | None = None,
    ) -> Iterator[list[bytes]]:
        """Per chunk in order, one serialized score ciphertext per query: of this shard's
        chunks of `catalog`, or of `rows` (chunks of candidates, encoded on the fly) in
        its layout. The queries share one pass over the chunks."""
        plan, chunks = self._catalogs[catalog]
        source = chunks if rows is None else rows
        for results in self.engine.score_many(plan, source, queries, keys):
            yield [self.engine.serialize(scores) for scores in results]

    def answer(self, request: ShardQuery) -> Iterator[list[bytes]]:
        """`score` for queries that arrived as bytes, keeping the keys they brought."""
        if request.keys is not None:
            self.add_keys(request.key_id, request.keys)
        keys = self._keys[request.key_id]
        queries = [
            wire.load_ciphertext(self.engine.context, blob, BOUNDED_OBJECT_BYTES)
            for blob in request.queries
        ]
        return self.score(request.catalog, queries, keys, request.rows)

    def add_keys(self, key_id: str, blob: bytes) -> None:
        """Load and keep keys the Scorer already validated."""
        self._keys[key_id] = wire.load_galois_keys(self.engine.context, blob, BOUNDED_OBJECT_BYTES)

    def holds_keys(self, key_id: str) -> bool:
        return key_id in self._keys

    def held_keys(self) -> list[str]:
        return sorted(self._keys)

    def forget_keys(self, key_id: str) -> None:
        self._keys.pop(key_id, None)
