"""Catalog loader messages an operator can act on (issue 12, item 9): real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from heserve.domain.catalog import Catalog, CatalogError, load_catalog, unit_rows


def test_ids_of_object_dtype_are_refused_with_what_to_do(tmp_path: Path) -> None:
    rows = unit_rows(3, 4, seed=161)
    ids = np.array(["a", "b", "c"], dtype=object)  # what pandas' .values gives
    np.savez(tmp_path / "c.npz", embeddings=rows, ids=ids)

    with pytest.raises(CatalogError) as refused:
        load_catalog("c", tmp_path / "c.npz")

    message = str(refused.value)
    assert "allow_pickle" in message  # numpy's own words, kept
    assert "pandas" in message and "np.asarray(ids, dtype=str)" in message

    np.savez(tmp_path / "ok.npz", embeddings=rows, ids=ids.astype(str))  # the advice works
    assert load_catalog("c", tmp_path / "ok.npz").ids == ("a", "b", "c")


def test_bad_rows_and_ids_are_named(tmp_path: Path) -> None:
    rows = unit_rows(6, 4, seed=162)
    large = rows.copy()
    large[4] *= 100.0
    large[5] *= 70.0
    with pytest.raises(CatalogError, match=r"row 4 \(0-based\) has norm 100, above 64.0; 2 row"):
        Catalog("c", large, tuple("abcdef"))

    nan = rows.copy()
    nan[3, 2] = np.nan
    with pytest.raises(CatalogError, match=r"NaN or infinity \(first in row 3\)"):
        Catalog("c", nan, tuple("abcdef"))

    with pytest.raises(CatalogError, match=r"not unique \('b' repeats\)"):
        Catalog("c", rows, ("a", "b", "c", "b", "e", "f"))

    with pytest.raises(CatalogError, match=r"row 2's has 0"):
        Catalog("c", rows, ("a", "b", "", "d", "e", "f"))
