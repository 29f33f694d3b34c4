"""A catalog's next version from upserts and deletes (issue 11, incremental updates):
the rows and ids it holds are what the change says, the rows it reports as changed are
exactly those that differ, and a change that fails its checks is refused whole."""

from __future__ import annotations

import numpy as np
import pytest

from heserve.domain.catalog import (
    MAX_ROW_NORM,
    Catalog,
    CatalogError,
    UnknownItemError,
    changed_catalog,
    unit_rows,
)

DIMENSION = 8


def _catalog(items: int = 10, popularity: bool = False) -> Catalog:
    return Catalog(
        "shop",
        unit_rows(items, DIMENSION, 1),
        tuple(f"i{n}" for n in range(items)),
        tuple(float(n) for n in range(items)) if popularity else None,
    )


def _by_id(catalog: Catalog) -> dict[str, np.ndarray]:
    return {item: catalog.embeddings[row] for row, item in enumerate(catalog.ids)}


def _differing_rows(before: Catalog, after: Catalog) -> set[int]:
    """Positions whose (id, row) differ between two versions, or exist in one only."""
    longest = max(before.item_count, after.item_count)
    differ = set()
    for row in range(longest):
        gone = row >= before.item_count or row >= after.item_count
        same = not gone and before.ids[row] == after.ids[row]
        if not (same and np.array_equal(before.embeddings[row], after.embeddings[row])):
            differ.add(row)
    return differ


def test_upserts_replace_in_place_and_append_deletes_fill_from_the_end() -> None:
    base = _catalog()
    new_rows = unit_rows(3, DIMENSION, 2)
    changes = changed_catalog(base, ["i3", "new-a", "new-b"], new_rows, ["i0", "i9", "i5"])
    after = changes.catalog

    expected = _by_id(base)
    for item in ("i0", "i9", "i5"):
        del expected[item]
    expected.update(zip(["i3", "new-a", "new-b"], new_rows.astype(np.float32), strict=True))
    got = _by_id(after)
    assert sorted(got) == sorted(expected)
    for item, row in expected.items():
        np.testing.assert_array_equal(got[item], row)
    assert after.item_count == 10 + 2 - 3
    assert len(set(after.ids)) == after.item_count
    assert set(changes.changed_rows.tolist()) == _differing_rows(base, after)
    assert (changes.upserted, changes.deleted) == (3, 3)
    assert after.positions_of(["new-b", "i3"]) == [
        after.ids.index("new-b"),
        after.ids.index("i3"),
    ]
    with pytest.raises(KeyError):
        after.positions_of(["i0"])
    # the base still serves as it was: its rows, ids and map are untouched
    assert base.item_count == 10 and base.positions_of(["i9"]) == [9]
    np.testing.assert_array_equal(base.embeddings, _catalog().embeddings)


def test_a_change_gets_a_new_version_that_depends_on_the_change() -> None:
    base = _catalog()
    one = changed_catalog(base, ["i1"], unit_rows(1, DIMENSION, 3)).catalog
    same = changed_catalog(base, ["i1"], unit_rows(1, DIMENSION, 3)).catalog
    other = changed_catalog(base, ["i1"], unit_rows(1, DIMENSION, 4)).catalog
    assert one.version == same.version
    assert len({base.version, one.version, other.version}) == 3


def test_only_the_rows_that_change_are_reported() -> None:
    base = _catalog(items=100)
    changes = changed_catalog(base, ["i50"], unit_rows(1, DIMENSION, 5))
    assert changes.changed_rows.tolist() == [50]
    changes = changed_catalog(base, [], np.empty((0, DIMENSION)), ["i99"])
    assert changes.changed_rows.tolist() == [99]  # the last row: nothing moves
    changes = changed_catalog(base, [], np.empty((0, DIMENSION)), ["i10"])
    assert changes.changed_rows.tolist() == [10, 99]  # the last row moves into 10


def test_popularity_follows_its_item() -> None:
    base = _catalog(popularity=True)
    after = changed_catalog(
        base, ["i2", "fresh"], unit_rows(2, DIMENSION, 6), ["i4"], popularity=[20.0, 30.0]
    ).catalog
    assert after.popularity is not None
    values = dict(zip(after.ids, after.popularity, strict=True))
    assert values["i2"] == 20.0 and values["fresh"] == 30.0 and values["i9"] == 9.0
    assert "i4" not in values
    deleted = changed_catalog(base, [], np.empty((0, DIMENSION)), ["i3"]).catalog
    assert deleted.popularity is not None and "i3" not in deleted.ids  # deletes need none
    assert dict(zip(deleted.ids, deleted.popularity, strict=True))["i9"] == 9.0
    with pytest.raises(CatalogError, match="one value per upserted item"):
        changed_catalog(base, ["i2"], unit_rows(1, DIMENSION, 6))
    with pytest.raises(CatalogError, match="publishes no popularity"):
        changed_catalog(_catalog(), ["i2"], unit_rows(1, DIMENSION, 6), popularity=[1.0])


@pytest.mark.parametrize(
    ("ids", "rows", "deletes", "error", "match"),
    [
        (["x"], np.full((1, DIMENSION), np.nan), [], CatalogError, "NaN"),
        (["x"], np.full((1, DIMENSION), MAX_ROW_NORM), [], CatalogError, "norm"),
        (["x"], np.ones((1, DIMENSION + 1)), [], CatalogError, "k × 8"),
        (["x", "y"], unit_rows(1, DIMENSION, 7), [], CatalogError, "2 ids for 1"),
        (["x", "x"], unit_rows(2, DIMENSION, 7), [], CatalogError, "listed twice"),
        ([""], unit_rows(1, DIMENSION, 7), [], CatalogError, "1 to 256 bytes"),
        (["x" * 257], unit_rows(1, DIMENSION, 7), [], CatalogError, "1 to 256 bytes"),
        (["new "], unit_rows(1, DIMENSION, 7), [], CatalogError, "blanks"),
        ([], np.empty((0, DIMENSION)), [" i1"], CatalogError, "blanks"),
        (["i1"], unit_rows(1, DIMENSION, 7), ["i1"], CatalogError, "both upserted and deleted"),
        ([], np.empty((0, DIMENSION)), ["nope"], UnknownItemError, "holds no item 'nope'"),
        ([], np.empty((0, DIMENSION)), ["i1", "i1"], CatalogError, "listed twice"),
        ([], np.empty((0, DIMENSION)), [f"i{n}" for n in range(10)], CatalogError, "every"),
        ([], np.empty((0, DIMENSION)), [], CatalogError, "nothing"),
    ],
)
def test_a_change_that_fails_its_checks_is_refused_and_the_base_is_untouched(
    ids: list[str], rows: np.ndarray, deletes: list[str], error: type[Exception], match: str
) -> None:
    base = _catalog()
    before = (base.version, base.ids, base.embeddings.copy())
    with pytest.raises(error, match=match):
        changed_catalog(base, ids, rows, deletes)
    assert (base.version, base.ids) == before[:2]
    np.testing.assert_array_equal(base.embeddings, before[2])
    assert base.positions_of(["i1"]) == [1]


def test_a_catalog_refuses_an_id_that_a_file_of_ids_could_not_name() -> None:
    with pytest.raises(CatalogError, match="row 1's id begins or ends with blanks"):
        Catalog("shop", unit_rows(2, DIMENSION, 1), ["a", "b "])
