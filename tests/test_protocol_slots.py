"""heserve.protocol.slots: the query's slot layout and how complex score slots unpack."""

from __future__ import annotations

import numpy as np
import pytest

from heserve.protocol.slots import imaginary_signs, query_slots, unpack_complex


def test_imaginary_signs_and_unpack_complex() -> None:
    np.testing.assert_array_equal(imaginary_signs(6), [1, -1, 1, -1, 1, -1])
    slots = np.array([1 + 5j, 2 + 6j, 3 + 7j, 4 + 8j])
    np.testing.assert_array_equal(unpack_complex(slots, 8), [1, 2, 3, 4, 5, -6, 7, -8])
    np.testing.assert_array_equal(unpack_complex(slots, 6), [1, 2, 3, 4, 5, -6])
    np.testing.assert_array_equal(unpack_complex(slots, 3), [1, 2, 3])
    assert unpack_complex(slots, 0).shape == (0,)
    for count in (-1, 9):
        with pytest.raises(ValueError):
            unpack_complex(slots, count)


def test_query_layout_repeats_the_zero_padded_vector() -> None:
    u = np.arange(1.0, 6.0)
    slots = query_slots(u, 5, 32)
    np.testing.assert_array_equal(slots, np.tile([1, 2, 3, 4, 5, 0, 0, 0], 4))
    with pytest.raises(ValueError):
        query_slots(u, 6, 32)
    with pytest.raises(ValueError):
        query_slots(np.ones(16), 16, 24)  # d' = 16 does not divide 24 slots
