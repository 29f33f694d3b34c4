"""Slot layouts the client and the server agree on: the query and the scores.

The query holds u (zero-padded to a power of two d') repeated across all S slots;
a chunk's result holds 2S scores in complex slots, the first S in the real parts
and the next S, signed by `imaginary_signs`, in the imaginary parts. How the
server arranges its catalog to get there is its own business (`heserve.he.plan`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
ComplexArray = npt.NDArray[np.complex128]
RowArray = npt.NDArray[np.floating[Any]]
"""Catalog rows: float32 as catalogs hold them, or float64 as callers may pass them."""


def next_power_of_two(value: int) -> int:
    """The smallest power of two at least `value` (1 for 0 and 1): the padded dimension d'."""
    return 1 << max(0, value - 1).bit_length()


def ceil_div(numerator: int, denominator: int) -> int:
    """⌈numerator / denominator⌉ for non-negative integers, without floats."""
    return -(-numerator // denominator)


def query_slots(vector: npt.ArrayLike, dimension: int, slot_count: int) -> FloatArray:
    """The query layout: `vector` zero-padded to d' and repeated over every slot.

    This is all a client needs of the packing: the server's baby/giant split does
    not change the query.
    """
    u = np.asarray(vector, dtype=np.float64)
    if u.shape != (dimension,):
        raise ValueError(f"expected a vector of dimension {dimension}, got shape {u.shape}")
    padded_dimension = next_power_of_two(dimension)
    if slot_count % padded_dimension:
        raise ValueError(f"dimension {dimension} does not fit {slot_count} slots")
    padded = np.zeros(padded_dimension)
    padded[:dimension] = u
    return np.tile(padded, slot_count // padded_dimension)


def imaginary_signs(slot_count: int) -> FloatArray:
    """(-1)^i: the sign the imaginary half of the scores carries in slot i.

    In SEAL's slot order the monomial X^(N/2) is the slot vector i * (-1)^j, so
    with this sign on the imaginary half, splitting a complex result into two real
    ones takes one multiplication by an exact monomial (no scale, no precision).
    """
    signs: FloatArray = 1.0 - 2.0 * (np.arange(slot_count, dtype=np.float64) % 2)
    return signs


def unpack_complex(slots: ComplexArray, count: int) -> FloatArray:
    """The `count` scores of a complex-slot result: real parts, then signed imaginary parts."""
    half = slots.shape[0]
    if not 0 <= count <= 2 * half:
        raise ValueError(f"a complex result holds at most {2 * half} scores, not {count}")
    rest = max(0, count - half)
    scores: FloatArray = np.concatenate(
        [slots.real[: min(count, half)], slots.imag[:rest] * imaginary_signs(half)[:rest]]
    )
    return scores
