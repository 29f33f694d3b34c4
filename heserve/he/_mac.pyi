"""Types of the native multiply-accumulate kernel (heserve/he/_mac.c)."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

def inner_sums(
    diagonals: npt.NDArray[np.uint64],
    index: npt.NDArray[np.int64],
    babies: Sequence[npt.NDArray[np.uint64]],
    out: Sequence[npt.NDArray[np.uint64]],
    moduli: Sequence[int],
    baby_step: int,
    impl: int = 0,
) -> None: ...
def reduce128(x: int, q: int) -> int: ...
def has_ifma() -> bool: ...
