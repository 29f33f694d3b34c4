"""A catalog's plaintext rows in fixed blocks, which the versions of a catalog share.

A served catalog keeps its float32 rows beside its encoded chunks (re-ranking encodes
candidates' rows per query; a restarted shard encodes its chunks again). When a few
items change, the next version must not copy all of them: at 1,000,000 × 128 that is
0.5 GB for a change of a few KB. So rows live in blocks of `BLOCK_ROWS`; a version made
from another shares every block it does not write (`RowEditor`), and writes a copy of
each block it does.

`BLOCK_ROWS` is a multiple of every preset's chunk (2S rows, at most 16,384), so the rows
of one chunk always lie in one block, and slicing them out is a view, never a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from heserve.protocol.slots import RowArray, ceil_div

BLOCK_ROWS = 16_384
"""Rows per block: 8 MiB at d = 128, the unit a change copies."""


class RowBlocks:
    """n × d float32 rows, held as blocks of `BLOCK_ROWS` rows (the last one shorter).

    Read like a 2-D array where the engine reads rows: `len`, `shape`, and slices of
    rows (`rows[start:stop]`, a view when it stays inside one block, as a chunk's
    rows do). Not changed once made: `RowEditor` makes the next version.
    """

    def __init__(self, blocks: Sequence[RowArray], dimension: int) -> None:
        self._blocks = tuple(blocks)
        self._count = int(sum(block.shape[0] for block in self._blocks))
        self.dimension = dimension
        if any(b.shape[0] != BLOCK_ROWS for b in self._blocks[:-1]):
            raise ValueError(f"every block but the last holds {BLOCK_ROWS} rows")

    @classmethod
    def of(cls, rows: RowArray) -> RowBlocks:
        """Blocks that are views of a contiguous n × d array (no copy)."""
        blocks = [rows[start : start + BLOCK_ROWS] for start in range(0, rows.shape[0], BLOCK_ROWS)]
        return cls(blocks, int(rows.shape[1]))

    def __len__(self) -> int:
        return self._count

    @property
    def shape(self) -> tuple[int, int]:
        return self._count, self.dimension

    @property
    def blocks(self) -> tuple[RowArray, ...]:
        return self._blocks

    def __getitem__(self, rows: slice) -> RowArray:
        """Rows start:stop (step 1): a view inside one block, else a copy."""
        start, stop, step = rows.indices(self._count)
        if step != 1:
            raise ValueError("row slices of RowBlocks take no step")
        if stop <= start:
            return np.empty((0, self.dimension), dtype=np.float32)
        first, last = start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS
        if first == last:
            offset = first * BLOCK_ROWS
            return self._blocks[first][start - offset : stop - offset]
        return np.concatenate(
            [
                self._blocks[b][max(start - b * BLOCK_ROWS, 0) : stop - b * BLOCK_ROWS]
                for b in range(first, last + 1)
            ]
        )

    def take(self, positions: Sequence[int] | npt.NDArray[np.int64]) -> RowArray:
        """The rows at `positions`, in that order (a copy)."""
        at = np.asarray(positions, dtype=np.int64)
        result: RowArray = np.empty((at.size, self.dimension), dtype=np.float32)
        for index, position in enumerate(at.tolist()):
            result[index] = self._blocks[position // BLOCK_ROWS][position % BLOCK_ROWS]
        return result

    def array(self) -> RowArray:
        """All rows as one contiguous array: the block itself when there is one, else a
        copy (for small catalogs and checks; serving never needs it)."""
        if len(self._blocks) == 1:
            return self._blocks[0]
        if not self._blocks:
            return np.empty((0, self.dimension), dtype=np.float32)
        return np.concatenate(self._blocks)


class RowEditor:
    """Writes the next version of `RowBlocks`: a block is copied the first time one of
    its rows is written; the others stay the base's own."""

    def __init__(self, base: RowBlocks) -> None:
        self._blocks = list(base.blocks)
        self._owned: set[int] = set()
        self.dimension = base.dimension
        self.count = len(base)

    def _own(self, block: int) -> RowArray:
        """Block `block`, as a full-size copy this editor may write."""
        while block >= len(self._blocks):
            self._blocks.append(np.zeros((0, self.dimension), dtype=np.float32))
        if block not in self._owned:
            mine = np.zeros((BLOCK_ROWS, self.dimension), dtype=np.float32)
            held = self._blocks[block]
            mine[: held.shape[0]] = held
            self._blocks[block] = mine
            self._owned.add(block)
        return self._blocks[block]

    def row(self, position: int) -> RowArray:
        block: RowArray = self._blocks[position // BLOCK_ROWS][position % BLOCK_ROWS]
        return block

    def write(self, position: int, row: RowArray) -> None:
        """Set row `position`; one past the last appends."""
        if position > self.count:
            raise IndexError(f"row {position} is past the end ({self.count} rows)")
        self._own(position // BLOCK_ROWS)[position % BLOCK_ROWS] = row
        self.count = max(self.count, position + 1)

    def truncate(self, count: int) -> None:
        """Keep the first `count` rows."""
        self.count = min(self.count, count)

    def finish(self) -> RowBlocks:
        used = ceil_div(self.count, BLOCK_ROWS)
        blocks = self._blocks[:used]
        if blocks:
            blocks[-1] = blocks[-1][: self.count - (used - 1) * BLOCK_ROWS]
        return RowBlocks(blocks, self.dimension)


Rows = RowArray | RowBlocks
"""Rows the engine and backends read: one array, or a catalog's blocks."""
