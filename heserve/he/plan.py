"""Slot layouts of the diagonal (Halevi-Shoup) packing with baby-step giant-step.

The math is in docs/engine.md; the query and result layouts, which clients
share, are in heserve.protocol.slots. In short, with S slots and the dimension padded to a
power of two d' that divides S:

- the query holds u (zero-padded to d') repeated across all S slots;
- a chunk of 2S catalog rows is stored as d' diagonals of complex slots,
  D[j][i] = W[i, (i+j) mod d'] + 1j * (-1)^i * W[S+i, (i+j) mod d']: CKKS slots
  are complex and the query is real, so one product scores two rows per slot, the
  first S in the real parts and the next S (signed, see `imaginary_signs`) in the
  imaginary parts: half the multiplications, chunks and response bytes;
- with j = g*b + k, diagonal j is pre-rotated right by g*b, so that
  scores = sum_g rot( sum_k D'[g*b+k] * rot(q, k), g*b ).

Baby rotations rot(q, k) are made one step at a time and giant rotations are folded
Horner-style, so the keys need only two rotation steps: 1 and b.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from heserve.he.rows import Rows
from heserve.protocol.slots import (
    ComplexArray,
    FloatArray,
    RowArray,
    ceil_div,
    imaginary_signs,
    next_power_of_two,
    query_slots,
)


@dataclass(frozen=True)
class DiagonalPlan:
    """How one catalog is laid out in slots: padding, chunking and the BSGS split."""

    dimension: int
    slot_count: int
    baby_step: int

    def __post_init__(self) -> None:
        if not 1 <= self.dimension <= self.slot_count:
            raise ValueError(
                f"dimension must be between 1 and the slot count {self.slot_count}, "
                f"got {self.dimension}"
            )
        if self.padded_dimension % self.baby_step:
            raise ValueError("baby_step must divide the padded dimension")

    @classmethod
    def for_catalog(
        cls, dimension: int, item_count: int, slot_count: int, shards: int = 1
    ) -> DiagonalPlan:
        """Choose the baby step that minimises rotations for this catalog's shape.

        A query costs each shard (b - 1) baby rotations, shared by its C chunks,
        plus C * (d'/b - 1) giant rotations; shards run in parallel, so C is the
        chunks per shard. Ties go to the larger b (fewer per-chunk rotations).
        """
        padded = next_power_of_two(dimension)
        chunks = max(1, ceil_div(item_count, 2 * slot_count * max(1, shards)))
        candidates = [1 << e for e in range(padded.bit_length())]
        best = min(candidates, key=lambda b: ((b - 1) + chunks * (padded // b - 1), -b))
        return cls(dimension=dimension, slot_count=slot_count, baby_step=best)

    @property
    def padded_dimension(self) -> int:
        """d rounded up to a power of two, d'."""
        return next_power_of_two(self.dimension)

    @property
    def items_per_chunk(self) -> int:
        """Rows per output ciphertext: S in the real parts and S in the imaginary parts."""
        return 2 * self.slot_count

    def chunk_count(self, item_count: int) -> int:
        """Output ciphertexts for `item_count` items: ceil(n / 2S)."""
        return ceil_div(item_count, self.items_per_chunk)

    def chunk_rows(self, embeddings: Rows, indices: Sequence[int] | None = None) -> list[RowArray]:
        """The rows of each chunk (all of them, or those at `indices`), as views."""
        size = self.items_per_chunk
        chosen = range(self.chunk_count(embeddings.shape[0])) if indices is None else indices
        return [embeddings[c * size : (c + 1) * size] for c in chosen]

    @property
    def giant_count(self) -> int:
        """Number of giant steps, d' / b."""
        return self.padded_dimension // self.baby_step

    @property
    def rotation_steps(self) -> tuple[int, ...]:
        """The rotate_vector steps the evaluation keys must cover."""
        steps = []
        if self.baby_step > 1:
            steps.append(1)
        if self.giant_count > 1:
            steps.append(self.baby_step)
        return tuple(steps)

    def rotations_per_query(self, chunk_count: int) -> int:
        """Key switches one query over `chunk_count` chunks costs."""
        return (self.baby_step - 1) + chunk_count * (self.giant_count - 1)

    def query_slots(self, vector: npt.ArrayLike) -> FloatArray:
        """The query layout for this plan's dimension; see `query_slots`."""
        return query_slots(vector, self.dimension, self.slot_count)

    def diagonals(self, rows: RowArray) -> ComplexArray:
        """The d' pre-rotated complex diagonals of up to 2S rows, as a (d', S) array.

        Row j of the result is D[j] rotated right by (j // b) * b, ready to encode:
        rows 0 .. S-1 in the real parts, rows S .. 2S-1 in the imaginary parts;
        slots past the last row are zero.
        """
        count = rows.shape[0]
        if count > self.items_per_chunk or rows.shape[1] != self.dimension:
            raise ValueError(
                f"expected at most {self.items_per_chunk} rows of dimension {self.dimension}"
            )
        d_pad = self.padded_dimension
        block = np.zeros((self.items_per_chunk, d_pad))
        block[:count, : self.dimension] = rows
        block[self.slot_count :] *= imaginary_signs(self.slot_count)[:, None]
        slot = np.arange(self.slot_count)[None, :]
        j = np.arange(d_pad)[:, None]
        columns = (slot + j) % d_pad
        diagonals: ComplexArray = block[slot, columns] + 1j * block[self.slot_count + slot, columns]
        for g in range(1, self.giant_count):
            start = g * self.baby_step
            diagonals[start : start + self.baby_step] = np.roll(
                diagonals[start : start + self.baby_step], start, axis=1
            )
        return diagonals
