"""Rows in blocks (heserve.he.rows): a chunk's rows are a view, a gather is exact, and the
next version copies only the blocks a change writes, sharing every other with the base."""

from __future__ import annotations

import numpy as np
import pytest

from heserve.domain.catalog import Catalog, changed_catalog, unit_rows
from heserve.he.plan import DiagonalPlan
from heserve.he.rows import BLOCK_ROWS, RowBlocks, RowEditor
from heserve.protocol.params import PRESETS

DIMENSION = 4


def _rows(count: int) -> np.ndarray:
    return np.arange(count * DIMENSION, dtype=np.float32).reshape(count, DIMENSION)


def test_blocks_read_like_the_array_they_were_made_of() -> None:
    array = _rows(2 * BLOCK_ROWS + 10)
    rows = RowBlocks.of(array)
    assert len(rows) == array.shape[0] and rows.shape == array.shape
    assert [block.shape[0] for block in rows.blocks] == [BLOCK_ROWS, BLOCK_ROWS, 10]
    for start, stop in [(0, 5), (BLOCK_ROWS - 3, BLOCK_ROWS + 4), (5, 2 * BLOCK_ROWS + 10)]:
        np.testing.assert_array_equal(rows[start:stop], array[start:stop])
    np.testing.assert_array_equal(rows[2 * BLOCK_ROWS + 5 : 10**9], array[2 * BLOCK_ROWS + 5 :])
    picks = [BLOCK_ROWS + 1, 0, 2 * BLOCK_ROWS + 9, 7]
    np.testing.assert_array_equal(rows.take(picks), array[picks])
    np.testing.assert_array_equal(rows.array(), array)
    with pytest.raises(ValueError, match="step"):
        rows[0:10:2]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_chunk_of_every_preset_is_a_view_inside_one_block(preset: str) -> None:
    plan = DiagonalPlan.for_catalog(DIMENSION, 3 * BLOCK_ROWS, PRESETS[preset].slot_count)
    array = _rows(3 * BLOCK_ROWS - 1)
    rows = RowBlocks.of(array)
    chunks = plan.chunk_rows(rows)
    assert BLOCK_ROWS % plan.items_per_chunk == 0
    for index, chunk in enumerate(chunks):
        assert np.shares_memory(chunk, array)  # a view of the catalog's own array
        expected = array[index * plan.items_per_chunk : (index + 1) * plan.items_per_chunk]
        np.testing.assert_array_equal(chunk, expected)


def test_an_editor_copies_only_the_blocks_it_writes() -> None:
    array = _rows(3 * BLOCK_ROWS - 2)
    base = RowBlocks.of(array)
    editor = RowEditor(base)
    editor.write(BLOCK_ROWS + 3, np.full(DIMENSION, -1, dtype=np.float32))
    editor.write(len(base), np.full(DIMENSION, -2, dtype=np.float32))  # append: last block
    editor.write(len(base) + 1, np.full(DIMENSION, -3, dtype=np.float32))
    editor.write(len(base) + 2, np.full(DIMENSION, -4, dtype=np.float32))  # a new block
    after = editor.finish()

    assert len(after) == len(base) + 3 and len(after.blocks) == 4
    assert after.blocks[0] is base.blocks[0]  # untouched: shared, not copied
    assert after.blocks[1] is not base.blocks[1] and after.blocks[2] is not base.blocks[2]
    expected = np.vstack([array, np.full((3, DIMENSION), [[-2], [-3], [-4]], dtype=np.float32)])
    expected[BLOCK_ROWS + 3] = -1
    np.testing.assert_array_equal(after.array(), expected)
    np.testing.assert_array_equal(base.array(), array)  # the base is as it was

    editor = RowEditor(after)
    editor.write(5, editor.row(len(after) - 1))  # a delete: the last row fills the hole
    editor.truncate(len(after) - 1)
    shrunk = editor.finish()
    assert len(shrunk) == len(after) - 1 and len(shrunk.blocks) == 3
    np.testing.assert_array_equal(shrunk[5:6], expected[-1:])
    with pytest.raises(IndexError):
        RowEditor(base).write(len(base) + 1, np.zeros(DIMENSION, dtype=np.float32))


def test_a_changed_catalog_shares_the_rows_it_does_not_change() -> None:
    items = 3 * BLOCK_ROWS
    base = Catalog("shop", unit_rows(items, DIMENSION, 1), [f"i{n}" for n in range(items)])
    after = changed_catalog(base, ["i7", "new"], unit_rows(2, DIMENSION, 2)).catalog
    assert after.rows.blocks[1] is base.rows.blocks[1]
    assert after.rows.blocks[2] is base.rows.blocks[2]
    assert after.rows.blocks[0] is not base.rows.blocks[0]  # i7's block, copied
    assert len(after.rows.blocks) == 4  # "new" opened a block of its own
