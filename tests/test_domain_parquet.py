"""Parquet catalogs (issue 11, "the formats embedding pipelines write"): real files
written with pyarrow, served through a real server, every refusal naming its row, and
the reader's peak memory near the array it fills."""

from __future__ import annotations

import builtins
import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import serving

from heserve.domain import parquet
from heserve.domain.catalog import CatalogError, load_catalog, repeated_rows, unit_rows
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import FloatArray
from heserve_client import Client

ITEMS = 300
DIMENSION = 24


def fixed_lists(rows: npt.NDArray[np.floating[Any]], value_type: Any = None) -> Any:
    """rows as a fixed-size list column (what most pipelines write)."""
    value_type = pa.float32() if value_type is None else value_type
    flat = pa.array(np.ascontiguousarray(rows).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])


def write(path: Path, columns: Mapping[str, Any], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(dict(columns)), path, row_group_size=row_group_size)
    return path


def item_ids(count: int) -> list[str]:
    return [f"book-{i:04d}" for i in range(count)]


@pytest.fixture(scope="module")
def rows() -> FloatArray:
    return unit_rows(ITEMS, DIMENSION, seed=1101)


# --- what loads ------------------------------------------------------------------------


def test_fixed_size_list_loads_the_same_catalog_as_the_npz(
    tmp_path: Path, rows: FloatArray
) -> None:
    ids = item_ids(ITEMS)
    popularity = np.arange(ITEMS, dtype=np.float64)[::-1] * 0.5
    np.savez(tmp_path / "books.npz", embeddings=rows, ids=np.asarray(ids), popularity=popularity)
    write(
        tmp_path / "books.parquet",
        {"id": ids, "embedding": fixed_lists(rows), "popularity": popularity},
        row_group_size=70,  # several row groups, batches that straddle them
    )

    from_npz = load_catalog("books", tmp_path / "books.npz")
    from_parquet = load_catalog("books", tmp_path / "books.parquet")

    assert from_parquet.embeddings.dtype == np.float32
    np.testing.assert_array_equal(from_parquet.embeddings, from_npz.embeddings)
    assert from_parquet.ids == from_npz.ids == tuple(ids)
    assert from_parquet.popularity == from_npz.popularity
    assert from_parquet.version == from_npz.version  # same content, same version


def test_small_batches_fill_the_array_in_file_order(tmp_path: Path, rows: FloatArray) -> None:
    path = write(tmp_path / "c.parquet", {"id": item_ids(ITEMS), "embedding": fixed_lists(rows)})

    read = parquet.read_parquet(path, batch_rows=7)  # 300 = 42 × 7 + 6: a short last batch

    np.testing.assert_array_equal(read.embeddings, rows.astype(np.float32))
    assert read.ids == tuple(item_ids(ITEMS))
    assert read.popularity is None


def test_plain_lists_of_doubles_and_integer_ids_load(tmp_path: Path, rows: FloatArray) -> None:
    # what pandas writes for a column of numpy arrays: list<double>; ids as int64
    path = write(
        tmp_path / "c.parquet",
        {"id": pa.array(range(1000, 1000 + ITEMS), pa.int64()), "embedding": list(rows)},
    )
    assert pa.types.is_list(pq.read_schema(path).field("embedding").type)

    catalog = load_catalog("c", path)

    np.testing.assert_array_equal(catalog.embeddings, rows.astype(np.float32))
    assert catalog.ids[:2] == ("1000", "1001")


def test_other_column_names_follow_the_path(tmp_path: Path, rows: FloatArray) -> None:
    score = np.linspace(1.0, 2.0, ITEMS)
    write(
        tmp_path / "c.parquet",
        {"item_id": item_ids(ITEMS), "vector": fixed_lists(rows), "score": score},
    )

    catalog = load_catalog("c", tmp_path / "c.parquet#item_id:vector:score")
    assert catalog.ids == tuple(item_ids(ITEMS))
    assert catalog.popularity == tuple(score.tolist())
    np.testing.assert_array_equal(catalog.embeddings, rows.astype(np.float32))

    without = load_catalog("c", tmp_path / "c.parquet#item_id:vector")
    assert without.popularity is None  # 'score' is not the default popularity column

    with pytest.raises(CatalogError, match=r"no column 'popularity'; the file's columns are"):
        load_catalog("c", tmp_path / "c.parquet#item_id:vector:popularity")


def test_served_parquet_catalog_scores_like_the_npy_one(tmp_path: Path, rows: FloatArray) -> None:
    ids = item_ids(ITEMS)
    np.save(tmp_path / "books.npy", rows)
    (tmp_path / "books.txt").write_text("\n".join(ids) + "\n")
    write(tmp_path / "books.parquet", {"id": ids, "embedding": fixed_lists(rows, pa.float64())})
    from_npy = load_catalog("npy", tmp_path / "books.npy", tmp_path / "books.txt")
    from_parquet = load_catalog("parquet", tmp_path / "books.parquet")
    user = unit_rows(1, DIMENSION, seed=1102)[0]

    with (
        serving(Scorer(DEFAULT_PARAMETERS, [from_npy, from_parquet])) as running,
        Client(f"127.0.0.1:{running.port}") as client,
    ):
        npy_scores = client.score(user, catalog="npy")
        parquet_scores = client.score(user, catalog="parquet")
        top = client.recommend(user, catalog="parquet", k=5)
        assert client.item_ids("parquet") == ids

    plain = rows.astype(np.float32).astype(np.float64) @ user
    np.testing.assert_allclose(parquet_scores, plain, atol=1e-3)
    np.testing.assert_allclose(parquet_scores, npy_scores, atol=1e-3)
    assert [item for item, _ in top] == [ids[i] for i in np.argsort(-plain, kind="stable")[:5]]


# --- what is refused, by row -----------------------------------------------------------


def refusal(path: Path) -> str:
    with pytest.raises(CatalogError) as refused:
        load_catalog("c", path)
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_a_row_of_the_wrong_length_is_named(tmp_path: Path, rows: FloatArray) -> None:
    vectors: list[Sequence[float]] = list(rows[:20])
    vectors[13] = rows[13][:-1]
    path = write(tmp_path / "c.parquet", {"id": item_ids(20), "embedding": vectors})

    assert refusal(path).endswith(
        f"row 13 (id 'book-0013'): the embedding has {DIMENSION - 1} values, "
        f"the rows before it {DIMENSION}"
    )


def test_a_wrong_length_in_a_later_batch_is_named_by_its_file_row(
    tmp_path: Path, rows: FloatArray
) -> None:
    vectors: list[FloatArray] = list(rows)
    vectors[250] = np.concatenate([rows[250], [0.0]])
    path = write(tmp_path / "c.parquet", {"id": item_ids(ITEMS), "embedding": vectors})

    with pytest.raises(CatalogError, match=r"row 250 \(id 'book-0250'\): the embedding has 25"):
        parquet.read_parquet(path, batch_rows=64)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_named(tmp_path: Path, rows: FloatArray, bad: float) -> None:
    broken = rows[:40].copy()
    broken[31, 5] = bad
    path = write(tmp_path / "c.parquet", {"id": item_ids(40), "embedding": fixed_lists(broken)})

    assert refusal(path).endswith("row 31 (id 'book-0031'): the embedding holds NaN or infinity")


def test_null_ids_and_embeddings_are_named(tmp_path: Path, rows: FloatArray) -> None:
    ids: list[str | None] = list(item_ids(10))
    ids[6] = None
    null_id = write(tmp_path / "id.parquet", {"id": ids, "embedding": list(rows[:10])})
    assert refusal(null_id).endswith("row 6: the id is null")

    vectors: list[Sequence[float] | None] = list(rows[:10])
    vectors[4] = None
    null_row = write(tmp_path / "row.parquet", {"id": item_ids(10), "embedding": vectors})
    assert refusal(null_row).endswith("row 4 (id 'book-0004'): the embedding is null")

    with_null_value: list[list[float | None]] = [list(map(float, row)) for row in rows[:10]]
    with_null_value[8][3] = None
    null_value = write(
        tmp_path / "value.parquet", {"id": item_ids(10), "embedding": with_null_value}
    )
    assert refusal(null_value).endswith("row 8 (id 'book-0008'): the embedding holds a null value")


def test_repeated_rows_finds_the_earliest_repeat() -> None:
    assert repeated_rows(["a", "b", "c", "b", "a"]) == (1, 3)
    assert repeated_rows(["a", "b", "c", "d"]) is None
    assert repeated_rows([f"id-{i}" for i in range(100_000)] + ["id-70000"]) == (70_000, 100_000)
    assert repeated_rows([]) is None


def test_a_duplicate_id_names_both_rows(tmp_path: Path, rows: FloatArray) -> None:
    ids = item_ids(ITEMS)
    ids[270] = ids[9]
    path = write(tmp_path / "c.parquet", {"id": ids, "embedding": fixed_lists(rows)})

    assert "id 'book-0009' is in rows 9 and 270" in refusal(path)


def test_a_missing_column_lists_the_columns_there_are(tmp_path: Path, rows: FloatArray) -> None:
    path = write(tmp_path / "c.parquet", {"item_id": item_ids(5), "vector": fixed_lists(rows[:5])})

    message = refusal(path)
    assert "no column 'id'; the file's columns are ['item_id', 'vector']" in message
    assert "PATH#id_column:embedding_column" in message


def test_wrong_column_types_and_files_are_refused(tmp_path: Path, rows: FloatArray) -> None:
    strings = write(tmp_path / "s.parquet", {"id": item_ids(3), "embedding": ["a", "b", "c"]})
    assert "column 'embedding' holds string; an embedding is a list of floats" in refusal(strings)

    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("id,embedding\n")
    assert "not a readable Parquet file" in refusal(not_parquet)

    assert "not a readable Parquet file" in refusal(tmp_path / "missing.parquet")

    empty = write(
        tmp_path / "empty.parquet",
        {"id": pa.array([], pa.string()), "embedding": fixed_lists(rows[:0])},
    )
    assert refusal(empty).endswith("the file holds no rows")

    with pytest.raises(CatalogError, match=r"a \.parquet carries its own ids"):
        load_catalog("c", empty, tmp_path / "ids.txt")


def test_norms_and_id_lengths_are_still_checked_by_the_catalog(
    tmp_path: Path, rows: FloatArray
) -> None:
    path = write(tmp_path / "c.parquet", {"id": item_ids(6), "embedding": list(rows[:6] * 100)})
    assert "row 0 (0-based) has norm 100" in refusal(path)


def test_serve_refuses_a_bad_parquet_row_in_one_line_named_through_the_environment(
    tmp_path: Path, rows: FloatArray
) -> None:
    # the PATH#id:embedding form passes through the settings (here HESERVE_CATALOG) as it is
    write(
        tmp_path / "books.parquet",
        {"item_id": ["a", "b", "c", "b"], "vector": fixed_lists(rows[:4])},
    )
    environment = {**os.environ, "HESERVE_CATALOG": "books=books.parquet#item_id:vector"}

    result = subprocess.run(
        [sys.executable, "-m", "heserve.ops.cli", "serve", "--port", "0"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 2
    assert result.stderr == (
        "heserve: error: books.parquet: id 'b' is in rows 1 and 3; ids must be unique\n"
    )


# --- pyarrow is optional ---------------------------------------------------------------


def test_a_missing_pyarrow_says_how_to_install_it(
    tmp_path: Path, rows: FloatArray, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "c.parquet", {"id": item_ids(3), "embedding": fixed_lists(rows[:3])})
    real_import = builtins.__import__

    def no_pyarrow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)

    message = refusal(path)
    assert message == (
        f"{path}: Parquet catalogs need pyarrow, which is not installed: "
        "pip install 'heserve[parquet]'"
    )
    # .npy and .npz need none of it
    np.save(tmp_path / "c.npy", rows[:3])
    assert load_catalog("c", tmp_path / "c.npy").item_count == 3


def test_heserve_imports_no_pyarrow_until_a_parquet_catalog_loads(tmp_path: Path) -> None:
    program = (
        "import sys, numpy as np\n"
        "from heserve.domain.catalog import load_catalog\n"
        "import heserve.ops.cli\n"
        f"np.save({str(tmp_path / 'c.npy')!r}, np.eye(3))\n"
        f"load_catalog('c', __import__('pathlib').Path({str(tmp_path / 'c.npy')!r}))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyarrow'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


# --- memory ----------------------------------------------------------------------------

LARGE_ROWS = 200_000
LARGE_DIMENSION = 64
LARGE_BATCH = 8_192

# Run in a fresh interpreter: Arrow's memory pool reports its peak since the process
# started (it cannot be reset), and tracemalloc's peak then holds nothing of other tests.
_MEASURE = """
import json, sys, tracemalloc
from pathlib import Path
import pyarrow as pa
from heserve.domain import parquet
tracemalloc.start()
read = parquet.read_parquet(Path(sys.argv[1]), batch_rows=int(sys.argv[2]))
python_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({
    "shape": list(read.embeddings.shape),
    "dtype": str(read.embeddings.dtype),
    "last_id": read.ids[-1],
    "sum": float(read.embeddings.sum(dtype="float64")),
    "python_peak": python_peak,
    "arrow_peak": pa.default_memory_pool().max_memory(),
}))
"""


def test_the_reader_peaks_near_the_array_it_fills(tmp_path: Path) -> None:
    rng = np.random.default_rng(1103)
    path = tmp_path / "large.parquet"
    rows = (rng.standard_normal((LARGE_ROWS, LARGE_DIMENSION)) * 0.1).astype(np.float32)
    total = float(rows.sum(dtype=np.float64))
    ids = [f"item-{i:06d}" for i in range(LARGE_ROWS)]
    # one row group, as pyarrow writes up to 1,048,576 rows by default: the reader must
    # not hold a whole row group's embeddings either
    pq.write_table(pa.table({"id": ids, "embedding": fixed_lists(rows)}), path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    del rows, ids
    array_bytes = LARGE_ROWS * LARGE_DIMENSION * 4  # 51.2 MB

    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), str(LARGE_BATCH)],
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    )
    measured = json.loads(result.stdout)

    assert measured["shape"] == [LARGE_ROWS, LARGE_DIMENSION]
    assert measured["dtype"] == "float32"
    assert measured["last_id"] == f"item-{LARGE_ROWS - 1:06d}"
    assert measured["sum"] == pytest.approx(total, abs=1e-3)  # every row landed
    python_peak, arrow_peak = measured["python_peak"], measured["arrow_peak"]
    print(
        f"\nparquet reader, {LARGE_ROWS:,} × {LARGE_DIMENSION}: array {array_bytes / 1e6:.1f} MB; "
        f"peak numpy+Python {python_peak / 1e6:.1f} MB ({python_peak / array_bytes:.2f} × the "
        f"array: the array, the ids, one batch), Arrow {arrow_peak / 1e6:.1f} MB"
    )
    # numpy and Python: the array, the ids as Python strings (~14 MB) and one batch; a
    # whole-table read would add the 51 MB of embeddings again
    assert python_peak < 1.5 * array_bytes
    # Arrow: a buffered stream of pages and one batch at a time, never the whole column
    assert arrow_peak < 0.5 * array_bytes
